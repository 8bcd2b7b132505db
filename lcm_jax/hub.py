"""Model folders by name: a local folder, a gs:// URL (`fs.local_copy`), or a Hugging Face Hub
id "org/name" resolved through huggingface_hub's cache (`snapshot_download`).

huggingface_hub reads its own environment: HF_HOME / HF_HUB_CACHE (where the cache is) and
HF_HUB_OFFLINE (cache only: a snapshot already there is used, nothing is fetched). Only what the
loaders read is downloaded: configs, tokenizer files and the safetensors weights of `variant`
(without one, the default files: names with no variant infix, such as *.fp16.safetensors).
"""
from __future__ import annotations

import os
import re
from typing import Optional

from lcm_jax import fs

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """'org/name' that is not an existing local path."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def _patterns(variant: Optional[str]) -> tuple[list[str], list[str]]:
    """(allow, ignore) file patterns for snapshot_download."""
    if variant:
        return ["*.json", "*.txt", f"*.{variant}.safetensors"], []
    return ["*.json", "*.txt", "*.safetensors"], ["*.*.safetensors"]


def snapshot(repo_id: str, variant: Optional[str] = None) -> str:
    """The local snapshot folder of Hub repo `repo_id` (downloaded unless cached / offline)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    allow, ignore = _patterns(variant)
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=ignore or None)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and "
            f"cannot be downloaded (HF_HUB_OFFLINE or no connection): fetch it once online, or pass a "
            f"local folder") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id}: no such Hugging Face Hub model (or it is gated/private: "
                                f"log in with `huggingface-cli login`), and no such local folder") from e


def local_folder(name: str, variant: Optional[str] = None) -> str:
    """A local path holding model folder `name`: local as is, gs:// copied once, Hub ids from
    the Hub cache."""
    if fs.is_remote(name):
        return fs.local_copy(name)
    if is_hub_id(name):
        return snapshot(name, variant)
    return name
