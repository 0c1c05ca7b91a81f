"""Reading and writing PyTorch checkpoint directories one tensor at a time.

Reads `model.safetensors`, `pytorch_model.bin` and their sharded forms (`*.index.json`); safetensors
are memory-mapped and `.bin` files loaded with `torch.load(mmap=True)`, so a tensor is in memory only
while it is converted. Writes `model.safetensors`, or shards plus `model.safetensors.index.json`
above a size threshold.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Every name a transformers checkpoint's weights take: single files, shards and their indexes.
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


class TorchCheckpointReader:
    """Random access to the tensors of a transformers-style checkpoint directory, as numpy arrays."""

    def __init__(self, directory: str, weight_files: tuple[str, ...] = WEIGHT_FILES):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such directory")
        self.directory = directory
        self._file_of: dict[str, str] = {}
        self._open: dict[str, object] = {}
        for name in weight_files:
            index = os.path.join(directory, name + ".index.json")
            single = os.path.join(directory, name)
            if os.path.exists(index):
                self._file_of = {k: os.path.join(directory, v) for k, v in _weight_map(index).items()}
                break
            if os.path.exists(single):
                self._file_of = {k: single for k in self._keys_of(single)}
                break
        else:
            raise FileNotFoundError(
                f"{directory}: no weights found; expected one of "
                + ", ".join(weight_files + tuple(n + ".index.json" for n in weight_files))
            )

    def _handle(self, path: str):
        if path not in self._open:
            self._open[path] = _open_weights(path)
        return self._open[path]

    def _keys_of(self, path: str) -> Iterable[str]:
        handle = self._handle(path)
        if not hasattr(handle, "keys"):
            raise ValueError(f"{path}: holds a {type(handle).__name__}, not a state dict of tensors")
        return list(handle.keys())

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> np.ndarray:
        path = self._file_of[key]
        handle = self._handle(path)
        if path.endswith(".safetensors"):
            return handle.get_tensor(key)
        value = handle[key]
        if not hasattr(value, "detach"):
            raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
        return _torch_to_numpy(value)

    def get_float(self, key: str) -> np.ndarray:
        """`get` for a weight: an integer or bool tensor here is a wrong or corrupted checkpoint, and
        casting it would hide that."""
        value = self.get(key)
        if not is_float(value.dtype):
            raise ValueError(f"{self.directory}: tensor {key!r} is {value.dtype}; a floating-point weight was expected")
        return value


def is_float(dtype) -> bool:
    """numpy's float kinds, plus ml_dtypes' bfloat16 (which numpy files under kind 'V')."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)


def _weight_map(index: str) -> dict[str, str]:
    """The key -> shard file table of a `*.index.json`, checked, so a damaged index is named."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a checkpoint index with a 'weight_map' ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    outside = sorted({v for v in weight_map.values() if os.path.isabs(v) or os.path.normpath(v).startswith("..")})
    if outside:  # an index must not make us read files outside its checkpoint
        raise ValueError(f"{index}: shard files {outside[:3]} lie outside the checkpoint directory")
    return weight_map


def _open_weights(path: str):
    """A safetensors handle or a torch state dict. Any failure to parse is reported with the file's
    path: the bare errors of safetensors and torch.load do not name it."""
    if path.endswith(".safetensors"):
        opener = lambda: safe_open(path, framework="numpy")
    else:
        try:
            import torch
        except ImportError as e:  # torch is only needed for .bin checkpoints
            raise ImportError(f"{path}: reading .bin checkpoints needs torch (pip install torch==2.13.0)") from e
        opener = lambda: torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (named by the checkpoint's index)")
    try:
        return opener()
    except Exception as e:  # noqa: BLE001  (untrusted files fail in many ways)
        raise ValueError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from e


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_safetensors(
    directory: str,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Writes (key, shape, dtype, make_array) tensors into `model.safetensors`, or into
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` when they exceed
    `max_shard_bytes`. Arrays are produced on demand, one shard at a time. Returns the files written."""
    tensors = list(tensors)
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        nbytes = int(np.prod(item[1])) * np.dtype(item[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    metadata = {"format": "pt", **(metadata or {})}
    os.makedirs(directory, exist_ok=True)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        arrays = {}
        for key, shape, _, make in shard:
            arr = np.ascontiguousarray(make())
            if arr.shape != tuple(shape):
                raise ValueError(f"{key}: produced shape {arr.shape}, expected {tuple(shape)}")
            arrays[key] = arr
            weight_map[key] = name
        save_file(arrays, os.path.join(directory, name), metadata=metadata)
        del arrays
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d, _ in tensors)
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
