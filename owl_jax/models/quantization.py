"""int8 weights for inference, by qwix's post-training quantisation (the `int8` extra).

With `OwlConfig.weight_quantization == "int8"` the LLM's projections (q/k/v/o, gate/up/down) and its LM
head hold int8 weights with one scale per output channel (absmax / 127.5, per layer); everything else
(the vision tower, the abstractor, embeddings, norms) stays as it was. A matmul dequantises its weight
to the compute dtype and multiplies: weight-only, so the bytes a decode step reads about halve against
bf16 and quarter against fp32, and the arithmetic is the float model's.

qwix intercepts the matmuls of the modules its rule names while a wrapped method runs, so every
inference entry point of `MplugOwl` is wrapped (`METHODS`). The params are quantised in the decode
layout (layers unrolled), with any LoRA adapter merged first: an adapter's own small matmuls would
otherwise be quantised too.

Why qwix: it is Google's JAX quantisation library, runs wherever XLA does (CPU, GPU, TPU) without
kernels of its own, and quantises a linen model without rewriting its modules; AQT, its predecessor,
is no longer developed.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from owl_jax.cli import UserError
from owl_jax.models.config import OwlConfig
from owl_jax.models.owl import MplugOwl, dummy_inputs

# The LLM's weight matmuls: module paths as qwix sees them ("/".join(module.path)).
INT8_MODULES = r"language_model/.*(_proj|lm_head)"
METHODS = ("__call__", "hidden_states", "embed", "prefill_logits", "step_logits")


def _qwix():
    try:
        import qwix
    except ImportError:
        raise UserError("int8 weights need qwix: pip install 'owl_jax[int8]'") from None
    return qwix


def _provider():
    qwix = _qwix()
    return qwix.PtqProvider([qwix.QuantizationRule(module_path=INT8_MODULES, weight_qtype=jnp.int8)])


def model(cfg: OwlConfig, **kwargs) -> MplugOwl:
    """`MplugOwl(cfg, **kwargs)`, its LLM matmuls on int8 weights when cfg.weight_quantization says so."""
    module = MplugOwl(cfg, **kwargs)
    if cfg.weight_quantization == "none":
        return module
    return _qwix().quantize_model(module, _provider(), methods=METHODS)


def abstract_params(cfg: OwlConfig) -> Any:
    """The int8 model's params (decode layout) as shapes and dtypes, boxed with their logical axes:
    nothing is allocated (how a 7B model's bytes are counted)."""
    qmodel = model(cfg, decode_layout=True)
    return jax.eval_shape(lambda: qmodel.init(jax.random.PRNGKey(0), **dummy_inputs(cfg))["params"])


def quantize(params: Any, cfg: OwlConfig) -> Any:
    """Float params of `cfg`'s model (decode layout, no LoRA) -> the int8 model's params."""
    if cfg.weight_quantization != "int8":
        raise ValueError(f"weight_quantization={cfg.weight_quantization!r}: nothing to quantise")
    if cfg.lora.rank:
        raise ValueError("merge the LoRA adapters into the kernels before quantising")
    abstract = abstract_params(cfg)
    return jax.jit(lambda p: _qwix().quantize_params(p, abstract))(params)
