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
    """Multi-head attention with separate query/key/value projections (bias)."""

    cfg: AbstractorConfig
    run: RunOptions

    @nn.compact
    def __call__(self, q: jax.Array, kv: jax.Array, key_valid: jax.Array | None, deterministic: bool) -> jax.Array:
        """q float[N, Q, D], kv float[N, Q + S, D], key_valid bool[N, Q + S] or None (every key) ->
        float[N, Q, D]. With `intermediates` mutable, sows
        the attention probabilities (keys: the Q queries, then the S image tokens) as `attention_probs`."""
        d, heads = self.cfg.hidden_size, self.cfg.num_heads
        kw = dict(dtype=self.run.dtype, param_dtype=self.run.param_dtype,
                  kernel_init=nn.initializers.normal(self.cfg.initializer_range))
        split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d // heads)
        dropout = 0.0 if deterministic else self.cfg.attention_dropout
        qh = split(Dense(d, ("embed", "heads"), name="query", **kw)(q))
        kh = split(Dense(d, ("embed", "heads"), name="key", **kw)(kv))
        # Every query's row of the mask spelt out: cuDNN's fused kernel takes no broadcast query axis.
        mask = None if key_valid is None else jnp.broadcast_to(
            key_valid[:, None, None, :], (q.shape[0], 1, q.shape[1], kv.shape[1]))
        if self.is_mutable_collection("intermediates"):  # inspection only (plots): float32[N, H, Q, Q + S]
            scores = jnp.einsum("nqhd,nkhd->nhqk", qh, kh, preferred_element_type=jnp.float32) * (d // heads) ** -0.5
            if mask is not None:
                scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            self.sow("intermediates", "attention_probs", jax.nn.softmax(scores, axis=-1))
        out = attention(
            qh,
            kh,
            split(Dense(d, ("embed", "heads"), name="value", **kw)(kv)),
            mask,
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
    def __call__(self, h: jax.Array, img: jax.Array, key_valid: jax.Array | None, deterministic: bool) -> jax.Array:
        """h float[N, Q, D], img float[N, S, E], key_valid bool[N, Q + S] or None -> float[N, Q, D]."""
        cfg = self.cfg
        q = LayerNorm(cfg.layer_norm_eps, self.run.param_dtype, name="norm1")(h)
        kv = jnp.concatenate([q, LayerNorm(cfg.layer_norm_eps, self.run.param_dtype, name="normk")(img)], axis=1)
        a = AbstractorAttention(cfg, self.run, name="attention")(q, kv, key_valid, deterministic)
        return CrossAttentionOutput(cfg, self.run, name="output")(a, q)


class AbstractorLayer(nn.Module):
    cfg: AbstractorConfig
    run: RunOptions

    @nn.compact
    def __call__(self, h: jax.Array, img: jax.Array, key_valid: jax.Array | None,
                 deterministic: bool) -> tuple[jax.Array, None]:
        h = CrossAttention(self.cfg, self.run, name="crossattention")(h, img, key_valid, deterministic)
        return constrain(h, ("batch", "length", "embed")), None


class VisualAbstractor(nn.Module):
    """Owns the `abstractor.*` weights: the layer stack, visual_fc and vit_eos (and the video model's
    temporal_visual_fc). The query tokens live one level up (`query_tokens`, `temporal_query_tokens`),
    as in the released checkpoint."""

    cfg: AbstractorConfig
    llm_hidden_size: int
    run: RunOptions = RunOptions()

    @nn.compact
    def __call__(self, queries: jax.Array, img: jax.Array, deterministic: bool = True,
                 temporal_queries: jax.Array | None = None, frame_valid: jax.Array | None = None) -> jax.Array:
        """queries float[N, Q, D] and images img float[N, S, E], or clips img float[N, T, S, E] with
        frame_valid bool[N, T] (default all) -> float[N, Q + 1, llm_hidden] (vit_eos appended).

        A clip's queries attend to all its frames' tokens, frame after frame. With temporal_queries
        float[N, Q, D] (the video model), a clip of more than one frame is read by both sets of queries at
        once (each attending to the other too) and gives visual_fc(first) + temporal_visual_fc(second); a
        clip of one frame is read as an image."""
        dtype, param_dtype = self.run.dtype, self.run.param_dtype
        q, key_valid, multi_frame = queries.shape[1], None, None
        if img.ndim == 4:
            n, t, s, e = img.shape
            valid = jnp.ones((n, t), bool) if frame_valid is None else frame_valid
            img = img.reshape(n, t * s, e)
            query_keys = jnp.ones((n, q), bool)
            if temporal_queries is not None and t > 1:
                multi_frame = jnp.sum(valid, axis=1) > 1  # [N]
                queries = jnp.concatenate([queries, temporal_queries], axis=1)
                query_keys = jnp.concatenate([query_keys, jnp.broadcast_to(multi_frame[:, None], (n, q))], axis=1)
            key_valid = jnp.concatenate([query_keys, jnp.repeat(valid, s, axis=1)], axis=1)
        h = Stack(AbstractorLayer, self.cfg.num_layers, self.run, dict(cfg=self.cfg, run=self.run), name="encoder")(
            queries.astype(dtype), img.astype(dtype), key_valid, deterministic
        )
        fc = lambda name: Dense(self.llm_hidden_size, (None, "embed"), dtype=dtype, param_dtype=param_dtype,
                                kernel_init=nn.initializers.normal(self.cfg.initializer_range), name=name)
        out = fc("visual_fc")(h[:, :q])
        if self.cfg.temporal_queries and (multi_frame is not None or self.is_initializing()):
            temporal = fc("temporal_visual_fc")(h[:, q:] if multi_frame is not None else h)
            if multi_frame is not None:
                out = out + jnp.where(multi_frame[:, None, None], temporal, 0)
        vit_eos = self.param(
            "vit_eos",
            partitioned(nn.initializers.truncated_normal(self.cfg.initializer_range), (None, None, "embed")),
            (1, 1, self.llm_hidden_size),
            param_dtype,
        )
        eos = jnp.broadcast_to(vit_eos.astype(out.dtype), (out.shape[0], 1, self.llm_hidden_size))
        return jnp.concatenate([out, eos], axis=1)
