"""File patterns and files through etils.epath, so gs:// paths work wherever local ones do."""
from __future__ import annotations

import glob as globlib
from typing import Iterable

from etils import epath


def expand_pattern(pattern: str, suffix: str) -> list[epath.Path]:
    """The files `pattern` names: brace lists and ranges (`shards/{00000..01023}.tar`, via
    braceexpand), globs (`shards/*.tar`), or a folder (its `*{suffix}` files, sorted)."""
    from braceexpand import braceexpand

    if not pattern:
        raise ValueError(f"data.path is empty: name the {suffix} files (a folder, a glob or a brace "
                         "pattern like shards/{00000..00099}" + suffix + ")")
    out: list[epath.Path] = []
    for p in braceexpand(pattern):
        if globlib.has_magic(p):
            out += _glob(p)
        elif "{" not in pattern and epath.Path(p).is_dir():
            out += sorted(epath.Path(p).glob(f"*{suffix}"))
        else:
            out.append(epath.Path(p))
    if not out:
        raise FileNotFoundError(f"data.path={pattern!r} matches no {suffix} files")
    return out


def _glob(pattern: str) -> list[epath.Path]:
    parts = pattern.split("/")
    first = next(i for i, s in enumerate(parts) if globlib.has_magic(s))
    root = "/".join(parts[:first]) or "."
    return sorted(epath.Path(root).glob("/".join(parts[first:])))


def require_files(paths: Iterable[epath.Path], pattern: str) -> None:
    """FileNotFoundError naming the first missing files of `pattern`."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"data.path={pattern!r}: {len(missing)} files do not exist, e.g. "
                                f"{missing[:3]}")
