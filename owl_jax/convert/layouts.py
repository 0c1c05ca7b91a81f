"""Where each owl_jax parameter lives in the PyTorch checkpoints we read and write.

Our parameter tree mirrors the released module names, with three differences handled here:
scanned layers are stacked on a leading axis (torch: `...layers.{i}...`), Dense kernels are
[in, out] (torch Linear weights are [out, in]) and conv kernels are [kh, kw, in, out] (torch:
[out, in, kh, kw]). Leaf names: kernel / scale / embedding -> weight.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import numpy as np

Path = tuple[str, ...]
LORA_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One torch-side tensor group <-> one (layer of an) owl_jax leaf."""

    path: Path  # owl_jax param path
    layer: int | None  # index on the stacked layer axis; None for unstacked leaves
    sources: tuple[tuple[str, tuple[int, ...]], ...]  # (torch key, torch shape), in from_torch's argument order
    from_torch: Callable[..., np.ndarray]  # torch arrays -> our (per-layer) array
    to_torch: Callable[[np.ndarray], np.ndarray] | None = None  # our array -> the single torch array

    @property
    def key(self) -> str:
        return self.sources[0][0]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _linear(x: np.ndarray) -> np.ndarray:  # [in, out] <-> [out, in]
    return x.T


def _conv_from_torch(w: np.ndarray) -> np.ndarray:  # [out, in, kh, kw] -> [kh, kw, in, out]
    return w.transpose(2, 3, 1, 0)


def _conv_to_torch(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1)


def _pointwise_from_torch(w: np.ndarray) -> np.ndarray:  # Conv3d [out, in, 1, 1, 1] -> [in, out]
    return w[:, :, 0, 0, 0].T


def _pointwise_to_torch(w: np.ndarray) -> np.ndarray:
    return w.T[:, :, None, None, None]


def _time_conv_from_torch(w: np.ndarray) -> np.ndarray:  # depthwise Conv3d [C, 1, 3, 1, 1] -> [3, C]
    return w[:, 0, :, 0, 0].T


def _time_conv_to_torch(w: np.ndarray) -> np.ndarray:
    return w.T[:, None, :, None, None]


def _released_key(path: Path, layer: int | None) -> str:
    parts = list(path)
    if parts[-1] in ("kernel", "scale", "embedding"):
        parts[-1] = "weight"
    if layer is not None:
        parts.insert(parts.index("layers") + 1, str(layer))
    return ".".join(parts)


def _leaves(shapes: Mapping[Path, tuple[int, ...]]) -> Iterator[tuple[Path, int | None, tuple[int, ...]]]:
    """(path, layer, per-layer shape) for every leaf; stacked leaves once per layer."""
    for path, shape in shapes.items():
        if "layers" in path:
            for i in range(shape[0]):
                yield path, i, tuple(shape[1:])
        else:
            yield path, None, tuple(shape)


def released_layout(shapes: Mapping[Path, tuple[int, ...]]) -> list[TensorMap]:
    """The released mPLUG-Owl HF layout (`query_tokens`, `vision_model.*`, `abstractor.*`,
    `language_model.*`). LoRA leaves have no place in it (the release ships LoRA merged)."""
    maps = []
    for path, layer, shape in _leaves(shapes):
        if path[-1] in LORA_LEAVES:
            continue
        if path[-1] == "kernel" and "temporal" in path:  # the video model's Conv3d modules
            frm, to = ((_time_conv_from_torch, _time_conv_to_torch) if path[-2] == "conv"
                       else (_pointwise_from_torch, _pointwise_to_torch))
        elif path[-1] == "kernel" and len(shape) == 4:
            frm, to = _conv_from_torch, _conv_to_torch
        elif path[-1] == "kernel":
            frm, to = _linear, _linear
        else:
            frm, to = _identity, _identity
        torch_shape = to(np.empty(shape, np.int8)).shape
        maps.append(TensorMap(path, layer, ((_released_key(path, layer), torch_shape),), frm, to))
    return maps


def llama_layout(shapes: Mapping[Path, tuple[int, ...]]) -> list[TensorMap]:
    """transformers `LlamaForCausalLM`: the released `language_model.*` keys without the prefix."""
    prefix = "language_model."
    return [
        dataclasses.replace(m, sources=tuple((k[len(prefix):], s) for k, s in m.sources))
        for m in released_layout(shapes)
        if m.path[0] == "language_model"
    ]


# Released vision key fragment -> transformers CLIPVisionModel key fragment.
_CLIP_RENAMES = (
    ("embeddings.patch_embed.", "embeddings.patch_embedding."),
    ("embeddings.pre_layernorm.", "pre_layrnorm."),
    (".input_layernorm.", ".layer_norm1."),
    (".post_attention_layernorm.", ".layer_norm2."),
    (".self_attn.dense.", ".self_attn.out_proj."),
)


def interleave_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int) -> np.ndarray:
    """Separate q/k/v ([D_out, D_in] weights or [D_out] biases) -> the released fused tensor whose
    output axis is ordered (head, {q, k, v}, head_dim)."""
    d = q.shape[0]
    per_head = [x.reshape((num_heads, d // num_heads) + x.shape[1:]) for x in (q, k, v)]
    return np.stack(per_head, axis=1).reshape((3 * d,) + q.shape[1:])


def clip_vision_layout(shapes: Mapping[Path, tuple[int, ...]], num_heads: int) -> list[TensorMap]:
    """transformers `CLIPVisionModel` (separate q/k/v, class_embedding [D], position_embedding as an
    Embedding [S, D], `pre_layrnorm`) -> the vision encoder."""
    maps = []
    for m in released_layout(shapes):
        if m.path[0] != "vision_model":
            continue
        key, torch_shape = m.sources[0]
        if key.endswith("embeddings.cls_token"):
            d = torch_shape[-1]
            maps.append(
                TensorMap(
                    m.path, None, (("vision_model.embeddings.class_embedding", (d,)),), lambda w: w.reshape(1, 1, -1)
                )
            )
        elif key.endswith("embeddings.position_embedding"):
            s = (torch_shape[1], torch_shape[2])
            maps.append(
                TensorMap(m.path, None, (("vision_model.embeddings.position_embedding.weight", s),), lambda w: w[None])
            )
        elif ".query_key_value." in key:
            d = torch_shape[0] // 3
            kind = key.rsplit(".", 1)[1]  # weight | bias
            sources = tuple((key.replace("query_key_value", f"{p}_proj"), (d,) + torch_shape[1:]) for p in "qkv")
            if kind == "weight":
                frm = lambda q, k, v: interleave_qkv(q, k, v, num_heads).T
            else:
                frm = lambda q, k, v: interleave_qkv(q, k, v, num_heads)
            maps.append(TensorMap(m.path, m.layer, sources, frm))
        else:
            for old, new in _CLIP_RENAMES:
                key = key.replace(old, new)
            maps.append(dataclasses.replace(m, sources=((key, torch_shape),), to_torch=None))
    return maps


# Buffers that torch checkpoints may carry and that hold no weights.
IGNORED_TORCH_KEYS = ("position_ids", "rotary_emb.inv_freq")
