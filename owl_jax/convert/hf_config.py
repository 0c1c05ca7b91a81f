"""transformers-style config.json <-> owl_jax model config."""
from __future__ import annotations

import json
import os
from typing import Any

from owl_jax.models.config import AbstractorConfig, LlamaConfig, OwlConfig, VisionConfig

# The released code's defaults, used for fields a config.json leaves out.
_RELEASED_VISION_DEFAULTS = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, layer_norm_eps=1e-6,
)
_RELEASED_ABSTRACTOR_DEFAULTS = dict(
    hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, intermediate_size=4096,
    attention_probs_dropout_prob=0.1, layer_norm_eps=1e-6, encoder_hidden_size=1024,
)


def read_json(directory: str) -> dict[str, Any]:
    """A checkpoint dir's config.json."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory")
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing; a transformers checkpoint directory needs its config.json")
    return load_json(path)


def load_json(path: str) -> dict[str, Any]:
    """A JSON object from a file, with the path in every error (json's own errors give only a line)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: holds a JSON {type(d).__name__}; a JSON object was expected")
    return d


def vision_from_hf(d: dict[str, Any], default_eps: float, video: bool = False) -> VisionConfig:
    d = {**_RELEASED_VISION_DEFAULTS, "layer_norm_eps": default_eps, **d}
    return VisionConfig(
        image_size=d["image_size"], patch_size=d["patch_size"], hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"], mlp_size=d["intermediate_size"],
        layer_norm_eps=d["layer_norm_eps"], initializer_range=d.get("initializer_range", 0.02), temporal=video,
    )


# The release's video model sizes its abstractor FFN from `intermediate_size` as LLaMA does (its image
# model takes it as the width): 2816 as it is, else 2I/3 rounded up to a multiple of 256 (4096 -> 2816).
VIDEO_FFN_MULTIPLE, VIDEO_FFN_KEPT = 256, 2816


def video_ffn_width(intermediate_size: int) -> int:
    if intermediate_size == VIDEO_FFN_KEPT:
        return intermediate_size
    m = VIDEO_FFN_MULTIPLE
    return m * ((int(2 * intermediate_size / 3) + m - 1) // m)


def video_intermediate_size(ffn_size: int) -> int:
    """The `intermediate_size` that the release's video model turns into `ffn_size` (video_ffn_width)."""
    if ffn_size == VIDEO_FFN_KEPT:
        return ffn_size
    if ffn_size % VIDEO_FFN_MULTIPLE:
        raise ValueError(f"abstractor.ffn_size={ffn_size}: the released video model's abstractor FFN is 2816 or a "
                         f"multiple of {VIDEO_FFN_MULTIPLE} wide (it derives the width from intermediate_size)")
    return 3 * ffn_size // 2


def abstractor_from_hf(d: dict[str, Any], num_queries: int, video: bool = False) -> AbstractorConfig:
    d = {**_RELEASED_ABSTRACTOR_DEFAULTS, **d}
    ffn = video_ffn_width(d["intermediate_size"]) if video else d["intermediate_size"]
    return AbstractorConfig(
        hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        ffn_size=ffn, num_queries=num_queries, encoder_hidden_size=d["encoder_hidden_size"],
        attention_dropout=d["attention_probs_dropout_prob"], ffn_layer_norm_eps=d["layer_norm_eps"],
        initializer_range=d.get("initializer_range", 0.02), temporal_queries=video,
    )


def llama_from_hf(d: dict[str, Any]) -> LlamaConfig:
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"text_config.model_type={d.get('model_type')!r}: only LLaMA language models are supported")
    if d.get("rope_scaling"):
        raise ValueError(f"text_config.rope_scaling={d['rope_scaling']!r}: rotary scaling is not supported")
    rope_theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return LlamaConfig(
        vocab_size=d.get("vocab_size", 32000), hidden_size=d.get("hidden_size", 4096),
        num_layers=d.get("num_hidden_layers", 32), num_heads=d.get("num_attention_heads", 32),
        num_kv_heads=d.get("num_key_value_heads") or d.get("num_attention_heads", 32),
        mlp_size=d.get("intermediate_size", 11008), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta), max_position_embeddings=d.get("max_position_embeddings", 2048),
        bos_token_id=d.get("bos_token_id", 1) or 1, eos_token_id=d.get("eos_token_id", 2) or 2,
        pad_token_id=d.get("pad_token_id") or 0, initializer_range=d.get("initializer_range", 0.02),
    )


def owl_from_released(d: dict[str, Any], video: bool = False) -> OwlConfig:
    """video: the release's video model, whose config.json is that of an image model (its weights tell
    them apart: `convert.released_is_video`)."""
    num_queries = d.get("num_query_tokens", 64)
    return OwlConfig(
        vision=vision_from_hf(d.get("vision_config") or {}, default_eps=1e-6, video=video),
        abstractor=abstractor_from_hf(d.get("visual_abstractor_config") or {}, num_queries, video),
        llm=llama_from_hf(d.get("text_config") or {}),
    )


def llama_to_hf(c: LlamaConfig, dtype: str) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.mlp_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": dtype,
        "initializer_range": c.initializer_range,
    }


def owl_to_released(cfg: OwlConfig, dtype: str) -> dict[str, Any]:
    v, a = cfg.vision, cfg.abstractor
    return {
        "model_type": "mplug-owl",
        "architectures": ["MplugOwlForConditionalGeneration"],
        "num_query_tokens": a.num_queries,
        "torch_dtype": dtype,
        "vision_config": {
            "model_type": "mplug_owl_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.mlp_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": "quick_gelu",
            "num_channels": 3, "initializer_range": v.initializer_range,
        },
        "visual_abstractor_config": {
            "model_type": "mplug_owl_visual_abstract", "hidden_size": a.hidden_size, "num_hidden_layers": a.num_layers,
            "num_attention_heads": a.num_heads,
            "intermediate_size": video_intermediate_size(a.ffn_size) if cfg.video else a.ffn_size,
            "attention_probs_dropout_prob": a.attention_dropout, "layer_norm_eps": a.ffn_layer_norm_eps,
            "encoder_hidden_size": a.encoder_hidden_size, "initializer_range": a.initializer_range,
        },
        "text_config": llama_to_hf(cfg.llm, dtype),
    }
