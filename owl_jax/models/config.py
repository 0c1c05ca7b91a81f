"""Model hyper-parameters as frozen dataclasses.

The ml_collections configs under `configs/` hold a `model` section with the same field names; the
dataclasses here are what the Flax modules take (hashable, so they can be module attributes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from owl_jax.cli import UserError

# "xla": our einsums with an fp32 softmax (every platform; dropout). "cudnn": cuDNN's fused attention
# where it applies, else "xla". "splash": Pallas' splash kernel (models/splash.py) for the LLM's causal
# attention where it applies, else "xla". "jax": jax.nn.dot_product_attention's own default (the call
# cuDNN gets, runnable anywhere: tests). A config may also say "auto": `platform_attention`.
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "jax")
WEIGHT_QUANTIZATIONS = ("none", "int8")


def platform_attention(platform: str) -> str:
    """What attention_impl="auto" means on a platform ("cpu", "gpu", "tpu")."""
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_size: int = 4096
    layer_norm_eps: float = 1e-6  # released weights; OpenAI CLIP uses 1e-5
    # Fresh weights: normal(initializer_range) kernels (HF's `initializer_range`). 0.02 suits widths of
    # ~1000 and more; a narrow tower trained from scratch wants about 1/sqrt(width) (see configs/tiny.py).
    initializer_range: float = 0.02
    # Fresh position embedding: "normal" (truncated normal(initializer_range), as CLIP) or "sincos2d"
    # (the patch grid's 2-D sine-cosine code, big_vision's from-scratch default; the class token's row
    # zero); either way a learned parameter in the released layout.
    position_embedding_init: str = "normal"
    # The release's video model: a local temporal module in every layer (a depthwise convolution over
    # a clip's frames at each patch position, before the layer's attention; vision.LocalTemporal).
    temporal: bool = False

    def __post_init__(self):
        if self.position_embedding_init not in ("normal", "sincos2d"):
            raise UserError(
                f"vision.position_embedding_init={self.position_embedding_init!r}: expected 'normal' or 'sincos2d'"
            )
        if self.position_embedding_init == "sincos2d" and self.hidden_size % 4:
            raise UserError(
                f"vision.position_embedding_init='sincos2d' needs hidden_size % 4 == 0, got {self.hidden_size}"
            )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class AbstractorConfig:
    """Visual abstractor."""

    hidden_size: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    ffn_size: int = 2816
    num_queries: int = 64
    encoder_hidden_size: int = 1024  # width of the vision features it attends to
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5  # norm1, normk, norm2
    ffn_layer_norm_eps: float = 1e-6  # ffn_ln
    initializer_range: float = 0.02  # fresh kernels, query tokens and vit_eos: normal(initializer_range)
    # The release's video model: a second set of queries (`temporal_query_tokens`) read a clip's frames
    # beside the first, and `temporal_visual_fc` adds their summary to the first set's.
    temporal_queries: bool = False

    def __post_init__(self):
        if self.encoder_hidden_size != self.hidden_size:
            raise UserError(
                f"abstractor.encoder_hidden_size={self.encoder_hidden_size} must equal abstractor.hidden_size="
                f"{self.hidden_size}: the queries attend to [queries; image features] concatenated"
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA decoder."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # < num_heads: grouped-query attention (LLaMA-2 70B style)
    mlp_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02  # fresh kernels and token embeddings: normal(initializer_range)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA on LLM projections (stage 2). rank 0 switches it off: no extra parameters."""

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class OwlConfig:
    vision: VisionConfig = VisionConfig()
    abstractor: AbstractorConfig = AbstractorConfig()
    llm: LlamaConfig = LlamaConfig()
    lora: LoraConfig = LoraConfig()
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Layers run under nn.scan (compile time flat in depth); remat policy per layer:
    # "none" | "full" (save nothing) | "dots" (save matmul outputs) | "dots_no_batch" |
    # "dots_no_batch_attention" (and the LLM's cuDNN attention output and softmax statistics)
    remat_policy: str = "none"
    # Layer loop: 1 runs the layers under one scanned loop body (compile time flat in depth: the 7B
    # recipes); 0 runs them as a Python loop over the same stacked params (`layers.run_stacked_layers`):
    # no loop in the program, so no stacked activation buffers (the main job's steps 3-9% faster on
    # CPU) and exact FLOP audits (XLA's cost analysis counts a loop body once), but compile time grows
    # with depth.
    scan_unroll: int = 1
    # "xla" (einsums, fp32 softmax) | "cudnn" (cuDNN's fused kernel where it applies) | "splash" (the
    # Pallas TPU kernel for the LLM) | "auto" (cudnn on GPU, splash on TPU, xla on CPU) | "jax"
    # (jax.nn.dot_product_attention's default); see models/attention.py
    attention_impl: str = "xla"
    # "xla" path only: the LLM's causal attention over a whole sequence (training, scoring; not the
    # cached decode) runs in query blocks of this many rows, each against the keys up to its last
    # row (models/attention.py); 0: one block. Skips the masked upper triangle: on 2 CPU cores the main
    # job's LLM tower step (144 tokens) 4% faster, a bench_small LLaMA layer's attention (513 tokens)
    # 92 -> 62 ms.
    causal_query_block: int = 0
    # Inference only: "int8" holds the LLM's projection and LM-head weights as int8 with per-channel
    # scales (models/quantization.py, qwix; `owl_jax.load(..., quantize="int8")` sets it on a loaded
    # model); "none": as param_dtype. Training refuses int8.
    weight_quantization: str = "none"

    def __post_init__(self):
        if self.weight_quantization not in WEIGHT_QUANTIZATIONS:
            raise UserError(f"weight_quantization={self.weight_quantization!r}: expected one of "
                            f"{WEIGHT_QUANTIZATIONS}")
        if self.attention_impl not in (*ATTENTION_IMPLS, "auto"):
            raise UserError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS} or 'auto'")
        if self.scan_unroll not in (0, 1):
            raise UserError(f"scan_unroll={self.scan_unroll}: expected 1 (the layers scanned) or 0 (a Python loop)")
        if self.vision.hidden_size != self.abstractor.encoder_hidden_size:
            raise UserError(
                f"vision.hidden_size={self.vision.hidden_size} != abstractor.encoder_hidden_size="
                f"{self.abstractor.encoder_hidden_size}: the abstractor reads the vision features as they are"
            )
        if self.vision.temporal != self.abstractor.temporal_queries:
            raise UserError(
                f"vision.temporal={self.vision.temporal} and abstractor.temporal_queries="
                f"{self.abstractor.temporal_queries}: the video model has both (set both True), the image model neither"
            )

    @property
    def video(self) -> bool:
        """Whether this is the release's video model (it reads clips beside images)."""
        return self.vision.temporal

    @property
    def tokens_per_image(self) -> int:
        return self.abstractor.num_queries + 1  # queries + vit_eos

    def run_options(self, platform: str) -> "RunOptions":
        """How the modules run on `platform` ("cpu", "gpu", "tpu"): "auto" attention resolved."""
        impl = platform_attention(platform) if self.attention_impl == "auto" else self.attention_impl
        return RunOptions(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype), attention_impl=impl,
                          remat_policy=self.remat_policy, scan_unroll=self.scan_unroll,
                          causal_query_block=self.causal_query_block)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the modules compute, not what: the same parameters give the same function under every
    choice (up to rounding). Built once per model (`OwlConfig.run_options`, where "auto" attention
    is resolved) and handed down whole; each module reads the fields it needs. Fields as OwlConfig's.
    """

    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"  # one of ATTENTION_IMPLS
    remat_policy: str = "none"
    scan_unroll: int = 1
    causal_query_block: int = 0

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:  # "auto" is resolved before (OwlConfig.run_options)
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")


def _build(cls, section: Mapping[str, Any] | None):
    if section is None:
        return cls()
    section = dict(section)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(section) - names
    if unknown:
        raise UserError(
            f"{cls.__name__}: unknown config fields {sorted(unknown)}; expected a subset of {sorted(names)}"
        )
    if "target_modules" in section:
        section["target_modules"] = tuple(section["target_modules"])
    return cls(**section)


_SUBCONFIGS = {"vision": VisionConfig, "abstractor": AbstractorConfig, "llm": LlamaConfig, "lora": LoraConfig}


# Fields that configs saved by earlier versions (a params dir's owl_config.json) hold and that no
# longer exist: each only chose how fresh weights were drawn, so a saved model is the same without it.
_RETIRED_LLM_FIELDS = ("attention_init", "mimetic_noise", "mimetic_identity")


def owl_config_from_dict(model: Mapping[str, Any]) -> OwlConfig:
    """Builds an OwlConfig from a (ml_collections or plain) mapping like `config.model`."""
    model = dict(model)
    if isinstance(model.get("llm"), Mapping):
        if model["llm"].get("attention_init", "normal") != "normal":
            raise UserError(f"llm.attention_init={model['llm']['attention_init']!r}: no longer offered (fresh q/k "
                            "kernels are normal(initializer_range)); remove the field")
        model["llm"] = {k: v for k, v in model["llm"].items() if k not in _RETIRED_LLM_FIELDS}
    if isinstance(model.get("scan_unroll"), int) and model["scan_unroll"] > 1:
        model["scan_unroll"] = 1  # a partly unrolled scan (no longer offered) computes what the scan does
    subs = {name: _build(cls, model.pop(name, None)) for name, cls in _SUBCONFIGS.items()}
    return _build(OwlConfig, {**model, **subs})


def owl_config_to_dict(cfg: OwlConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["lora"]["target_modules"] = list(d["lora"]["target_modules"])
    return d
