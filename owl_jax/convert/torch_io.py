"""Reading and writing PyTorch checkpoint directories one tensor at a time.

Reads `model.safetensors`, `pytorch_model.bin` and their sharded forms (`*.index.json`); safetensors
are memory-mapped and `.bin` files loaded with `torch.load(mmap=True)`, so a tensor is in memory only
while it is converted. Writes `model.safetensors`, or shards plus `model.safetensors.index.json`
above a size threshold.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TorchCheckpointReader:
    """Random access to the tensors of a transformers-style checkpoint directory, as numpy arrays."""

    def __init__(self, directory: str, weight_files: tuple[str, ...] = WEIGHT_FILES):
        self.directory = directory
        self._file_of: dict[str, str] = {}
        self._open: dict[str, object] = {}
        for name in weight_files:
            index = os.path.join(directory, name + ".index.json")
            single = os.path.join(directory, name)
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
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
            if path.endswith(".safetensors"):
                self._open[path] = safe_open(path, framework="numpy")
            else:
                try:
                    import torch
                except ImportError as e:  # torch is only needed for .bin checkpoints
                    raise ImportError(f"{path}: reading .bin checkpoints needs torch (pip install torch==2.13.0)") from e
                self._open[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[path]

    def _keys_of(self, path: str) -> Iterable[str]:
        handle = self._handle(path)
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
        return _torch_to_numpy(handle[key])


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

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
        for key, shape, dtype, make in shard:
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
