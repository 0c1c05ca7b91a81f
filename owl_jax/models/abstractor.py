"""Visual abstractor: 64 learned queries summarise the image features."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.models.attention import attention
from owl_jax.models.config import AbstractorConfig, RunOptions
from owl_jax.models.layers import Dense, LayerNorm, Stack, constrain, partitioned


class AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm over the FFN width: w2(ffn_ln(silu(w1 x) * w3 x))."""

    cfg: AbstractorConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.run.dtype, param_dtype=self.run.param_dtype,
                  kernel_init=nn.initializers.normal(self.cfg.initializer_range))
        f = self.cfg.ffn_size
        h = nn.silu(Dense(f, ("embed", "mlp"), name="w1", **kw)(x)) * Dense(f, ("embed", "mlp"), name="w3", **kw)(x)
        h = LayerNorm(self.cfg.ffn_layer_norm_eps, self.run.param_dtype, name="ffn_ln")(h)
        return Dense(self.cfg.hidden_size, ("mlp", "embed"), name="w2", **kw)(h)


class CrossAttentionOutput(nn.Module):
    cfg: AbstractorConfig
    run: RunOptions

    @nn.compact
    def __call__(self, attn: jax.Array, q: jax.Array) -> jax.Array:
        d = self.cfg.hidden_size
        h = q + Dense(d, ("heads", "embed"), dtype=self.run.dtype, param_dtype=self.run.param_dtype,
                      kernel_init=nn.initializers.normal(self.cfg.initializer_range), name="out_proj")(attn)
        norm2 = LayerNorm(self.cfg.layer_norm_eps, self.run.param_dtype, name="norm2")
        return h + AbstractorMLP(self.cfg, self.run, name="mlp")(norm2(h))


class AbstractorAttention(nn.Module):
    """Multi-head attention with separate query/key/value projections (bias), no mask."""

    cfg: AbstractorConfig
    run: RunOptions

    @nn.compact
    def __call__(self, q: jax.Array, kv: jax.Array, deterministic: bool) -> jax.Array:
        """q float[N, Q, D], kv float[N, Q + S, D] -> float[N, Q, D]. With `intermediates` mutable, sows
        the attention probabilities (keys: the Q queries, then the S image tokens) as `attention_probs`."""
        d, heads = self.cfg.hidden_size, self.cfg.num_heads
        kw = dict(dtype=self.run.dtype, param_dtype=self.run.param_dtype,
                  kernel_init=nn.initializers.normal(self.cfg.initializer_range))
        split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d // heads)
        dropout = 0.0 if deterministic else self.cfg.attention_dropout
        qh = split(Dense(d, ("embed", "heads"), name="query", **kw)(q))
        kh = split(Dense(d, ("embed", "heads"), name="key", **kw)(kv))
        if self.is_mutable_collection("intermediates"):  # inspection only (plots): float32[N, H, Q, Q + S]
            scores = jnp.einsum("nqhd,nkhd->nhqk", qh, kh, preferred_element_type=jnp.float32) * (d // heads) ** -0.5
            self.sow("intermediates", "attention_probs", jax.nn.softmax(scores, axis=-1))
        out = attention(
            qh,
            kh,
            split(Dense(d, ("embed", "heads"), name="value", **kw)(kv)),
            None,
            impl=self.run.attention_impl,
            dropout_rate=dropout,
            dropout_rng=self.make_rng("dropout") if dropout > 0 else None,
        )
        return out.reshape(q.shape[0], q.shape[1], d)


class CrossAttention(nn.Module):
    """Queries attend to [themselves; the image]; the residual starts from the *normalised* queries."""

    cfg: AbstractorConfig
    run: RunOptions

    @nn.compact
    def __call__(self, h: jax.Array, img: jax.Array, deterministic: bool) -> jax.Array:
        """h float[N, Q, D], img float[N, S, E] -> float[N, Q, D]."""
        cfg = self.cfg
        q = LayerNorm(cfg.layer_norm_eps, self.run.param_dtype, name="norm1")(h)
        kv = jnp.concatenate([q, LayerNorm(cfg.layer_norm_eps, self.run.param_dtype, name="normk")(img)], axis=1)
        a = AbstractorAttention(cfg, self.run, name="attention")(q, kv, deterministic)
        return CrossAttentionOutput(cfg, self.run, name="output")(a, q)


class AbstractorLayer(nn.Module):
    cfg: AbstractorConfig
    run: RunOptions

    @nn.compact
    def __call__(self, h: jax.Array, img: jax.Array, deterministic: bool) -> tuple[jax.Array, None]:
        h = CrossAttention(self.cfg, self.run, name="crossattention")(h, img, deterministic)
        return constrain(h, ("batch", "length", "embed")), None


class VisualAbstractor(nn.Module):
    """Owns the `abstractor.*` weights: the layer stack, visual_fc and vit_eos. The query tokens live
    one level up (`query_tokens`), as in the released checkpoint."""

    cfg: AbstractorConfig
    llm_hidden_size: int
    run: RunOptions = RunOptions()

    @nn.compact
    def __call__(self, queries: jax.Array, img: jax.Array, deterministic: bool = True) -> jax.Array:
        """queries float[N, Q, D], img float[N, S, E] -> float[N, Q + 1, llm_hidden] (vit_eos appended)."""
        dtype, param_dtype = self.run.dtype, self.run.param_dtype
        h = Stack(AbstractorLayer, self.cfg.num_layers, self.run, dict(cfg=self.cfg, run=self.run), name="encoder")(
            queries.astype(dtype), img.astype(dtype), deterministic
        )
        h = Dense(self.llm_hidden_size, (None, "embed"), dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(self.cfg.initializer_range), name="visual_fc")(h)
        vit_eos = self.param(
            "vit_eos",
            partitioned(nn.initializers.truncated_normal(self.cfg.initializer_range), (None, None, "embed")),
            (1, 1, self.llm_hidden_size),
            param_dtype,
        )
        eos = jnp.broadcast_to(vit_eos.astype(h.dtype), (h.shape[0], 1, self.llm_hidden_size))
        return jnp.concatenate([h, eos], axis=1)
