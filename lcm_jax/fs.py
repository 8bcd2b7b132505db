"""One filesystem layer for everything a run reads and writes: local paths and URLs such as
gs://bucket/run alike (etils.epath; gs:// goes through gcsfs/fsspec).

Libraries that need a local path (PIL, tensorboardX, the weight loaders) get one from
`local_copy` (a remote folder downloaded once per host) or write into a local folder that
`publish_dir` copies to its remote destination. Imports nothing of lcm_jax.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from typing import IO

import filelock
from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://", "az://")  # the object stores etils.epath routes to fsspec
COMPLETE_MARKER = ".lcm_jax_complete"          # written last into a finished local_copy


def is_remote(path: str) -> bool:
    """True for an object-store URL (gs://...), False for a local path."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def join(path: str, *parts: str) -> str:
    """os.path.join for local paths, '/'-joined for URLs."""
    if not is_remote(path):
        return os.path.join(path, *parts)
    return "/".join([os.fspath(path).rstrip("/"), *(p.strip("/") for p in parts)])


def makedirs(path: str) -> None:
    """Creates `path` and its parents (object stores have no directories: a no-op there)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def open(path: str, mode: str = "r") -> IO:  # noqa: A001 (the module is used as `fs.open`)
    """A file object for a local path or URL ('r', 'rb', 'w', 'wb'); a remote write is one object,
    uploaded when the file is closed."""
    return epath.Path(path).open(mode)


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` so that readers see the old file or the new one, never a part: a local file
    goes to a temporary name in the same folder and is renamed; an object upload is atomic."""
    if is_remote(path):
        with open(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cache_dir() -> str:
    """Where remote folders are downloaded: $LCM_JAX_CACHE_DIR/remote (else ~/.cache/lcm_jax/remote)."""
    root = os.environ.get("LCM_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "lcm_jax"))
    return os.path.join(root, "remote")


def _url_fs(url: str):
    import fsspec  # epath's own backend for object stores

    return fsspec.core.url_to_fs(url)


def local_copy(folder: str) -> str:
    """A local path holding `folder`: local paths unchanged; a remote folder is downloaded once per
    host into cache_dir()/<sha256 of the URL>. The processes of a host take turns on a file lock,
    so one downloads and the others find its finished copy; a copy without its completion
    marker (an interrupted download) is fetched again."""
    if not is_remote(folder):
        return folder
    url = os.fspath(folder).rstrip("/")
    dest = os.path.join(cache_dir(), hashlib.sha256(url.encode()).hexdigest()[:32])
    os.makedirs(cache_dir(), exist_ok=True)
    with filelock.FileLock(dest + ".lock"):
        if not os.path.exists(os.path.join(dest, COMPLETE_MARKER)):
            _download(url, dest)
    return dest


def _download(url: str, dest: str) -> None:
    ufs, root = _url_fs(url)
    files = ufs.find(root)
    if not files:
        raise FileNotFoundError(f"{url} holds no files: expected a model folder there")
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dest) + ".partial-", dir=cache_dir())
    ufs.get(files, [os.path.join(tmp, os.path.relpath(f, root)) for f in files])
    with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
        f.write(url + "\n")
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier copy
    os.rename(tmp, dest)


def publish_dir(local_dir: str, dest: str) -> str:
    """Copies the finished local folder `local_dir` to `dest` and returns `dest`: uploads every file
    for a remote dest (each object replaced whole); a local dest is left where it is when it is
    `local_dir`, else copied into."""
    if not is_remote(dest):
        if os.path.realpath(local_dir) != os.path.realpath(dest):
            shutil.copytree(local_dir, dest, dirs_exist_ok=True)
        return dest
    files = [os.path.join(d, n) for d, _, names in os.walk(local_dir) for n in names]
    ufs, root = _url_fs(dest)
    ufs.put(files, [root.rstrip("/") + "/" + os.path.relpath(f, local_dir).replace(os.sep, "/")
                    for f in files])
    return dest
