"""Reading PyTorch-format weights and mapping them strictly onto Flax parameter trees.

The Flax modules name their submodules after the PyTorch attributes (list index `i` of `name`
becomes `name_i`), so a PyTorch key maps to a Flax path mechanically:

    down_blocks.0.attentions.1.proj_in.weight  ->  down_blocks_0/attentions_1/proj_in/kernel

and the only value transforms are layout ones: conv (O, I, kh, kw) -> (kh, kw, I, O), linear
(O, I) -> (I, O), and 1x1 conv <-> linear where one side uses the other. Every mapped value is
checked against the module's `jax.eval_shape` tree; anything missing, unexpected or mis-shaped
is an error that names the key and both shapes. Reading safetensors needs neither torch nor
safetensors' torch bindings: the format is parsed here.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from lcm_jax.errors import WeightsError  # noqa: F401  (importable here, as before)

Params = Any
StateDict = dict[str, np.ndarray]

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_safetensors(path: str) -> StateDict:
    """Reads a .safetensors file into numpy arrays (bf16 via ml_dtypes), validating the layout.

    The file is memory-mapped: the arrays are read-only views, and bytes are read from disk
    (or the page cache) only when a tensor is first touched, so loading copies each byte once.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    if len(raw) < 8:
        raise WeightsError(f"{path} is not a safetensors file (only {len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise WeightsError(f"{path} is not a safetensors file or is truncated: header claims "
                           f"{n} bytes, file has {len(raw) - 8} after the length field")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path} is not a safetensors file: its header is not JSON ({e})") from e
    body = memoryview(raw)[8 + n:]
    out: StateDict = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightsError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        if end > len(body):
            raise WeightsError(f"{path} is truncated: tensor {key!r} ends at byte {end} but the "
                               f"data section has {len(body)} bytes; re-download or re-save it")
        out[key] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes numpy arrays as .safetensors atomically (temp file + rename), one tensor at a time:
    the header comes from shapes and dtypes, and each array (a view, e.g. a transposed kernel, is
    fine) is copied to a contiguous buffer only while it is written, so writing holds at most one
    tensor beyond `tensors` (safetensors' own save_file first turns every tensor into bytes)."""
    inv = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        arr = np.asarray(tensors[key])
        header[key] = {"dtype": inv[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for key in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[key]).reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)


def _read_torch_bin(path: str) -> StateDict:
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{path} is a PyTorch pickle; install torch to read it, or convert the "
                           "checkpoint to .safetensors") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()
            if hasattr(v, "numpy")}


def read_weights_file(path: str) -> StateDict:
    """Reads one weights file: .safetensors, or .bin/.pt/.ckpt when torch is installed."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _read_torch_bin(path)
    raise WeightsError(f"{path}: unknown weights format (expected .safetensors or .bin)")


def load_state_dict(folder: str, weights_name: str = "diffusion_pytorch_model",
                    variant: Optional[str] = None) -> StateDict:
    """Loads `weights_name[.variant].safetensors` (single or sharded via `.index.json`) or `.bin`.

    diffusers folders use weights_name 'diffusion_pytorch_model', transformers folders 'model'.
    """
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder} is not a directory; expected a diffusers/transformers model "
                           "folder with config.json and weights")
    stem = f"{weights_name}.{variant}" if variant else weights_name
    candidates = [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin",
                  f"{stem}.bin.index.json"]
    for name in candidates:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".index.json"):
            return _load_sharded(path)
        return read_weights_file(path)
    present = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".json")))
    hint = f" (variant={variant!r}; pass variant=None for the default files)" if variant else ""
    raise WeightsError(f"no weights in {folder}: looked for {candidates}{hint}; found {present}")


def _load_sharded(index_path: str) -> StateDict:
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not weight_map:
        raise WeightsError(f"{index_path} has no 'weight_map'")
    folder = os.path.dirname(index_path)
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not os.path.exists(path):
            raise WeightsError(f"{index_path} names shard {shard} which is missing from {folder}")
        out.update(read_weights_file(path))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise WeightsError(f"{index_path} lists {len(missing)} tensors absent from its shards, "
                           f"e.g. {missing[:3]}")
    return out


def read_config(folder: str, name: str = "config.json") -> dict:
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise WeightsError(f"{path} not found: {folder} is not a diffusers/transformers model "
                           "folder") from e
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e


# ---------------------------------------------------------------------------------------------
# Names and layouts
# ---------------------------------------------------------------------------------------------


def torch_key_to_flax_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """'a.b.0.c.weight' -> (('a', 'b_0', 'c'), 'weight')."""
    parts = key.split(".")
    path: list[str] = []
    for p in parts[:-1]:
        if p.isdigit() and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    return tuple(path), parts[-1]


# PyTorch attribute names that end in `_<digits>` without being list indices.
_TORCH_NAMES_WITH_DIGIT_SUFFIX = {"linear_1", "linear_2"}


def flax_module_path_to_torch(path: Sequence[str]) -> str:
    """Inverse of `torch_key_to_flax_module_path` for the module part: ('b_0',) -> 'b.0'."""
    out = []
    for p in path:
        m = re.fullmatch(r"(.+)_(\d+)", p)
        if m and p not in _TORCH_NAMES_WITH_DIGIT_SUFFIX:
            out.append(f"{m.group(1)}.{m.group(2)}")
        else:
            out.append(p)
    return ".".join(out)


def _to_flax_layout(value: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
            value = value.transpose(2, 3, 1, 0)
            if len(target_shape) == 2 and value.shape[:2] == (1, 1):  # 1x1 conv -> linear
                value = value[0, 0]
        elif value.ndim == 2:  # linear (O, I) -> (I, O)
            value = value.T
            if len(target_shape) == 4:  # linear -> 1x1 conv
                value = value[None, None]
    return value


def _to_torch_layout(value: np.ndarray, leaf: str) -> tuple[np.ndarray, str]:
    if leaf == "kernel":
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1), "weight"
        return value.T, "weight"
    if leaf in ("scale", "embedding"):
        return value, "weight"
    return value, leaf


def _fmt(paths: Iterable, limit: int = 8) -> str:
    paths = sorted(paths)
    more = f" ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(str(p) for p in paths[:limit]) + more


def torch_to_flax(state_dict: Mapping[str, np.ndarray], shapes: Params, *, source: str,
                  ignore: Sequence[str] = (), missing_ok: Sequence[str] = (),
                  rename: Optional[Callable[[str], Optional[str]]] = None,
                  ) -> tuple[Params, list[str]]:
    """Maps a PyTorch state dict onto the Flax tree `shapes` (from `jax.eval_shape`), strictly.

    ignore:     regexes of PyTorch keys to drop (buffers such as `position_ids`).
    missing_ok: regexes of Flax paths ('a/b/kernel') that may be absent; they are returned in the
                second value for the caller to initialise (e.g. a student's new `cond_proj`).
    rename:     maps a PyTorch key to the diffusers/transformers name first (None drops it).
    Returns (params as numpy arrays in the target dtypes, sorted list of missing_ok paths absent).
    """
    flat_shapes = traverse_util.flatten_dict(shapes)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in ignore):
            continue
        name = rename(key) if rename else key
        if name is None:
            continue
        module, leaf = torch_key_to_flax_module_path(name)
        candidates = {"weight": ("kernel", "scale", "embedding")}.get(leaf, (leaf,))
        fpath = next((module + (c,) for c in candidates if module + (c,) in flat_shapes), None)
        if fpath is None:
            unexpected.append(key)
            continue
        target = flat_shapes[fpath]
        arr = _to_flax_layout(np.asarray(value), fpath[-1], tuple(target.shape))
        if tuple(arr.shape) != tuple(target.shape):
            mismatched.append(f"{key} -> {'/'.join(fpath)}: checkpoint {tuple(np.shape(value))} "
                              f"(as Flax {tuple(arr.shape)}), model expects {tuple(target.shape)}")
            continue
        out[fpath] = arr.astype(target.dtype, copy=False)  # a view when no cast is needed
    missing = ["/".join(p) for p in flat_shapes if p not in out]
    not_ok = [m for m in missing if not any(re.search(p, m) for p in missing_ok)]
    errors = []
    if mismatched:
        errors.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:8]))
    if unexpected:
        errors.append(f"{len(unexpected)} unexpected keys (not in the model built from the config): "
                      + _fmt(unexpected))
    if not_ok:
        errors.append(f"{len(not_ok)} missing keys (the model needs them, the checkpoint lacks "
                      "them): " + _fmt(not_ok))
    if errors:
        raise WeightsError(f"cannot load {source}: " + " | ".join(errors)
                           + ". Check that config.json matches the weights.")
    return traverse_util.unflatten_dict(out), sorted(set(missing) - set(not_ok))


def flax_to_torch(params: Params, prefix: str = "") -> StateDict:
    """Flax tree -> PyTorch-layout state dict with diffusers/transformers names (for export). Host
    arrays come back as views (kernels transposed, not copied); write_safetensors copies one at
    a time."""
    out: StateDict = {}
    for path, value in traverse_util.flatten_dict(params).items():
        arr, leaf = _to_torch_layout(np.asarray(jax.device_get(value)), path[-1])
        out[prefix + flax_module_path_to_torch(path[:-1]) + "." + leaf] = arr
    return out


def eval_shapes(module, *args, **kwargs) -> Params:
    """The module's parameter tree as ShapeDtypeStructs, without allocating any weights."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return variables["params"]


def to_device(params: Params, dtype: Optional[jnp.dtype] = None) -> Params:
    """numpy tree -> jax arrays, optionally cast (params in fp32 or bf16)."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype or x.dtype), params)
