"""Lossless conversion between owl_jax parameters and PyTorch checkpoints.

from_torch: the released mPLUG-Owl HF layout -> owl_jax; or transformers `CLIPVisionModel` and/or
`LlamaForCausalLM` weights -> the matching towers, with every part no checkpoint provides (e.g. the
abstractor and query tokens at the start of stage 1) freshly initialised and reported.
to_torch: owl_jax -> the released HF layout (LoRA merged), loadable by the released code.

Both stream tensor by tensor: the output is allocated once and filled from memory-mapped inputs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import traverse_util

from owl_jax.convert import hf_config
from owl_jax.convert.layouts import (
    IGNORED_TORCH_KEYS,
    LORA_LEAVES,
    Path,
    TensorMap,
    clip_vision_layout,
    llama_layout,
    released_layout,
)
from owl_jax.convert.torch_io import WEIGHT_FILE, TorchCheckpointReader, write_safetensors
from owl_jax.models.config import OwlConfig
from owl_jax.models.owl import init_missing, param_shapes


@dataclasses.dataclass
class ConversionReport:
    loaded: dict[str, int] = dataclasses.field(default_factory=dict)  # source dir -> tensors read
    initialised: list[str] = dataclasses.field(default_factory=list)  # owl_jax paths freshly initialised
    unused: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # source dir -> torch keys not used

    def __str__(self) -> str:
        lines = [f"read {n} tensors from {d}" for d, n in self.loaded.items()]
        if self.initialised:
            lines.append(f"initialised {len(self.initialised)} parameters fresh (no checkpoint provides them):")
            lines += [f"  {p}" for p in self.initialised]
        for d, keys in self.unused.items():
            if keys:  # a CLIPModel's text tower alone is ~200 tensors: the first few say what they are
                lines.append(f"{len(keys)} tensors in {d} match no owl_jax parameter (not converted):")
                lines += [f"  {k}" for k in keys[:SHOWN]] + (
                    [f"  ... and {len(keys) - SHOWN} more"] if len(keys) > SHOWN else []
                )
        return "\n".join(lines)


SHOWN = 10  # tensor names listed in reports and errors before "and N more"


def name_some(names: list[str]) -> str:
    """The first SHOWN names and how many more: one line however long the list."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# CLIPModel's text tower and contrastive heads: a CLIP dir legitimately holds them beside the vision
# tower we take.
CLIP_TEXT_TOWER = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def _fill(out: dict[Path, np.ndarray], shapes, maps: list[TensorMap], reader: TorchCheckpointReader, dtype) -> set[str]:
    """Copies every mapped tensor from `reader` into `out`; returns the torch keys used."""
    used = set()
    for m in maps:
        arrays = []
        for key, expected in m.sources:
            if key not in reader:
                raise KeyError(f"{reader.directory}: missing tensor {key!r} (for owl_jax parameter {'/'.join(m.path)})")
            a = reader.get_float(key)
            if tuple(a.shape) != tuple(expected):
                raise ValueError(
                    f"{reader.directory}: tensor {key!r} has shape {tuple(a.shape)}, expected {tuple(expected)} "
                    f"(owl_jax parameter {'/'.join(m.path)})"
                )
            arrays.append(a)
            used.add(key)
        value = m.from_torch(*arrays)
        if m.path not in out:
            out[m.path] = np.empty(shapes[m.path], dtype or value.dtype)
        if m.layer is None:
            out[m.path][...] = value
        else:
            out[m.path][m.layer] = value
    return used


def _unused(reader: TorchCheckpointReader, maps: list[TensorMap]) -> list[str]:
    """Torch keys no map reads (known buffers aside). Known from the maps alone, so a checkpoint
    whose weights would be dropped is refused before any tensor is read."""
    used = {key for m in maps for key, _ in m.sources}
    return sorted(k for k in reader.keys() if k not in used and not k.endswith(IGNORED_TORCH_KEYS))


def _check_nothing_dropped(directory: str, unused: list[str], expected: tuple[str, ...]) -> None:
    """Weights that map to no parameter (e.g. the release's video variant's temporal modules) would be
    lost silently; only tensors the source is known to carry beside ours (`expected` prefixes) pass."""
    dropped = [k for k in unused if not k.startswith(expected)] if expected else unused
    if dropped:
        raise ValueError(
            f"{directory}: {len(dropped)} tensors match no owl_jax parameter and would be dropped: "
            f"{name_some(dropped)}; "
            "convert anyway with allow_unused=True (command line: --allow_unused_tensors)"
        )


def _strip_missing_prefix(maps: list[TensorMap], reader: TorchCheckpointReader, prefix: str) -> list[TensorMap]:
    """CLIPVisionModel saved by transformers 5 drops the `vision_model.` prefix that CLIPModel and
    older versions write; accept both."""
    if (
        not maps
        or maps[0].key in reader
        or not maps[0].key.startswith(prefix)
        or maps[0].key[len(prefix) :] not in reader
    ):
        return maps
    return [
        dataclasses.replace(m, sources=tuple((k[len(prefix):] if k.startswith(prefix) else k, s) for k, s in m.sources))
        for m in maps
    ]


def _is_video_path(path: Path) -> bool:
    return "temporal" in path or path[0] == "temporal_query_tokens" or path[-2:-1] == ("temporal_visual_fc",)


def _without_absent_video_maps(maps: list[TensorMap], reader: TorchCheckpointReader) -> list[TensorMap]:
    """A video model started from an image model or CLIP: when the source holds none of the video
    model's own tensors, they are left to fresh initialisation (all or none: a source with some of
    them is read whole, and a missing one is an error)."""
    video = [m for m in maps if _is_video_path(m.path)]
    if video and not any(key in reader for m in video for key, _ in m.sources):
        return [m for m in maps if not _is_video_path(m.path)]
    return maps


def released_is_video(directory: str) -> bool:
    """Whether a released-layout checkpoint is the release's video model: its config.json is an image
    model's, and only its weights (`temporal_query_tokens`, the vision layers' `temporal.*`) differ."""
    return "temporal_query_tokens" in TorchCheckpointReader(directory)


def from_torch(
    cfg: OwlConfig,
    *,
    released: str | None = None,
    clip: str | None = None,
    llama: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    allow_unused: bool = False,
) -> tuple[dict, ConversionReport]:
    """Builds owl_jax params (nested dict of numpy arrays) for `cfg` from torch checkpoint dirs.

    `released`: a released-layout checkpoint (every parameter but LoRA). `clip` / `llama`: stage-1
    starting points for the vision tower / the LLM. Parameters no source provides are initialised
    fresh and listed in the report. Tensors no parameter uses are an error (they would be lost), but
    for known buffers and a CLIP dir's text tower; with `allow_unused` they are only listed in the
    report. `dtype` None keeps each tensor's checkpoint dtype; integer or bool weights are refused."""
    shapes = param_shapes(cfg)
    out: dict[Path, np.ndarray] = {}
    report = ConversionReport()
    np_dtype = np.dtype(dtype) if dtype else None
    sources = []  # (dir, maps, key prefixes the dir may hold beside what we read)
    if released:
        sources.append((released, released_layout(shapes), ()))
    if clip:
        sources.append((clip, clip_vision_layout(shapes, cfg.vision.num_heads), CLIP_TEXT_TOWER))
    if llama:
        sources.append((llama, llama_layout(shapes), ()))
    if not sources:
        raise ValueError("from_torch: give at least one of released=, clip=, llama=")
    readers = []
    for directory, maps, expected in sources:  # every source checked before any tensor is read
        reader = TorchCheckpointReader(directory)
        maps = _without_absent_video_maps(_strip_missing_prefix(maps, reader, "vision_model."), reader)
        report.unused[directory] = _unused(reader, maps)
        if not allow_unused:
            _check_nothing_dropped(directory, report.unused[directory], expected)
        readers.append((directory, reader, maps))
    for directory, reader, maps in readers:
        report.loaded[directory] = len(_fill(out, shapes, maps, reader, np_dtype))
    missing = [p for p in shapes if p not in out]
    if missing:
        fresh = init_missing(cfg, missing, jax.random.PRNGKey(seed))
        out.update({p: v.astype(np_dtype) if np_dtype else v for p, v in fresh.items()})
        report.initialised = ["/".join(p) for p in missing]
    return traverse_util.unflatten_dict(out), report


def merged_kernels(params: Mapping, cfg: OwlConfig) -> dict[Path, Any]:
    """Flat params with LoRA folded in: kernel + (alpha / r) lora_a @ lora_b; LoRA leaves dropped."""
    flat = traverse_util.flatten_dict(nn.unbox(params))
    result = {}
    for path, value in flat.items():
        if path[-1] in LORA_LEAVES:
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            a, b = flat[path[:-1] + ("lora_a",)], flat[path[:-1] + ("lora_b",)]
            value = (
                np.asarray(value, np.float32)
                + cfg.lora.scale * np.matmul(np.asarray(a, np.float32), np.asarray(b, np.float32))
            ).astype(value.dtype)
        result[path] = value
    return result


def check_shapes(params: Mapping, cfg: OwlConfig) -> None:
    """Params must be exactly the parameters of `cfg`'s model: a config.json written from a config
    that disagrees with the tensors describes a model the weights do not fit."""
    flat = traverse_util.flatten_dict(nn.unbox(params))
    expected = param_shapes(cfg)
    for path, shape in expected.items():
        if path not in flat:
            raise ValueError(f"parameter {'/'.join(path)} is missing; the config expects one of shape {shape}")
        if tuple(np.shape(flat[path])) != shape:
            raise ValueError(
                f"parameter {'/'.join(path)} has shape {tuple(np.shape(flat[path]))}; the config expects {shape}"
            )
    extra = sorted("/".join(p) for p in flat if p not in expected)
    if extra:
        raise ValueError(f"parameters {name_some(extra)} do not exist in the configured model")


TORCH_DTYPES = ("float32", "bfloat16", "float16")  # what the released code loads


def to_torch(
    params: Mapping, cfg: OwlConfig, out_dir: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Writes the released HF layout (config.json + model.safetensors or shards + index) to out_dir.
    Params must fit cfg (check_shapes), and out_dir must hold no weights yet: shards of an earlier
    export left beside these would be read in their place."""
    check_shapes(params, cfg)
    _check_no_weights(out_dir)
    flat = merged_kernels(params, cfg)
    shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
    tensors = []
    for m in released_layout(shapes):
        key, torch_shape = m.sources[0]
        src_dtype = np.dtype(dtype) if dtype else np.asarray(flat[m.path]).dtype

        def make(m=m, src_dtype=src_dtype):
            value = np.asarray(flat[m.path])
            value = value if m.layer is None else value[m.layer]
            return m.to_torch(value).astype(src_dtype, copy=False)

        tensors.append((key, torch_shape, src_dtype, make))
    torch_dtype = str(tensors[0][2])
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"to_torch: the parameters are {torch_dtype}; give dtype= one of {', '.join(TORCH_DTYPES)}")
    files = write_safetensors(out_dir, tensors, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config.owl_to_released(cfg, torch_dtype), f, indent=2)
    return files


def _check_no_weights(out_dir: str) -> None:
    """Refuses a directory that already holds checkpoint weights of any name."""
    if os.path.isdir(out_dir):
        old = sorted(n for n in os.listdir(out_dir) if WEIGHT_FILE.fullmatch(n))
        if old:
            raise ValueError(
                f"{out_dir}: already holds weights ({name_some(old)}); to_torch writes into a new or empty directory"
            )


__all__ = [
    "ConversionReport",
    "check_shapes",
    "from_torch",
    "to_torch",
    "param_shapes",
    "merged_kernels",
    "init_missing",
    "released_is_video",
]
