"""Attention, one switchboard for every tower: our einsums (with causal query blocks), cuDNN's fused
kernel, Pallas' splash kernel on TPU, or jax.nn.dot_product_attention; `impl` picks (models/config.py,
ATTENTION_IMPLS), and a path that does not apply to a call falls back to the einsums."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from owl_jax.models.config import ATTENTION_IMPLS


def _attention_probs(scores: jax.Array, mask: jax.Array | None, dropout_rate: float, dropout_rng) -> jax.Array:
    """fp32 softmax of float[..., T, S] scores; masked scores get the dtype's minimum (a fully masked
    row, a padding query, stays finite); then attention dropout."""
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return probs


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    impl: str = "xla",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    kv_heads_first: bool = False,
    causal_query_block: int = 0,
    causal: bool = False,
    name_residuals: bool = False,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Multi-head attention with grouped KV heads.

    q float[B, T, H, Dh], k/v float[B, S, K, Dh] (float[B, K, S, Dh] with kv_heads_first: the KV
    cache's layout, so decoding reads it without a transpose) with H % K == 0, mask bool[B, 1, T, S]
    (True = attend) or None. Returns float[B, T, H, Dh]. Softmax in fp32.

    causal: the attention is causal (T == S); a given `mask` must already hold the triangle (the
    LLM's does), a missing one stands for the triangle alone. The kernels are told (cuDNN's
    `is_causal`, splash's causal block mask) and skip the upper triangle; the mask still applies, so
    results do not depend on where the padding is.

    causal_query_block > 0 (the "xla" path, T == S, a mask that is causal): the queries run in even
    blocks of at most that many rows, each against the keys up to its own last row. That skips the
    masked upper triangle (about half the score work) and keeps each block's scores small: a
    bench_small LLaMA layer's attention, fwd+bwd on 2 CPU cores, 92 -> 62 ms at 128.

    segment_ids int[B, T] (causal self-attention): each token's sample in its row, 0 on padding; the
    mask already keeps samples apart (llama.segment_mask), the splash kernel takes the ids instead.

    name_residuals ("cudnn" only): the output and softmax statistics that cuDNN keeps for the
    backward pass are tagged ATTENTION_RESIDUALS (`with_named_residuals`), so that remat
    "dots_no_batch_attention" saves them instead of rerunning the kernel in the backward pass.
    """
    b, t, h, dh = q.shape
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    s = k.shape[2 if kv_heads_first else 1]
    if impl == "splash":  # the LLM's causal self-attention only (not the ViT, abstractor or decode steps)
        from owl_jax.models import splash  # Pallas' TPU kernels: imported only when asked for

        if causal and s == t and not kv_heads_first and dropout_rate == 0.0 and splash.supports(b, t, h, dh):
            if segment_ids is None:  # the last query's row of a causal mask is every key's validity
                segment_ids = jnp.ones((b, t), bool) if mask is None else jnp.broadcast_to(mask[:, 0, -1, :], (b, t))
            return splash.causal_attention(q, k, v, segment_ids)
        impl = "xla"
    # cuDNN's flash attention trains on even lengths only (jax 0.11: "Unsupported sequence length Q
    # 257, KV 257", raised when the gradient is built) and has no dropout here: the ViT's 257 tokens,
    # the abstractor while it trains and one-token decode steps take the einsum path.
    if (impl == "cudnn" and (t % 2 or s % 2)) or (impl in ("cudnn", "jax") and dropout_rate > 0.0):
        impl = "xla"
    if impl == "xla" and causal and s == t and mask is None:  # the einsums see causality only through the mask
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if 0 < causal_query_block < t and impl == "xla" and not kv_heads_first and s == t:
        return _causal_blocks(q, k, v, mask, causal_query_block, dropout_rate, dropout_rng)
    if impl in ("cudnn", "jax"):
        if kv_heads_first:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        fused = functools.partial(jax.nn.dot_product_attention, is_causal=causal and s == t,
                                  implementation="cudnn" if impl == "cudnn" else None)
        if impl == "cudnn" and name_residuals:
            fused = with_named_residuals(fused, ATTENTION_RESIDUALS)
        return fused(q, k, v, mask=mask)
    kv_heads = k.shape[1] if kv_heads_first else k.shape[2]
    kv = "bksd" if kv_heads_first else "bskd"
    groups = h // kv_heads
    if groups == 1 and not kv_heads_first:
        # Ungrouped heads: plain 4-D einsums. XLA CPU runs the grouped 5-D form with its size-1 group
        # axis ~40% slower (a bench_small LLaMA layer's attention, fwd+bwd: 406 vs 240 ms).
        q_spec, kv, scores_spec = "bthd", "bshd", "bhts"
    else:
        q, mask = q.reshape(b, t, kv_heads, groups, dh), None if mask is None else mask[:, :, None]
        q_spec, scores_spec = "btkgd", "bkgts"
    scores = jnp.einsum(f"{q_spec},{kv}->{scores_spec}", q, k, preferred_element_type=jnp.float32) * (dh**-0.5)
    probs = _attention_probs(scores, mask, dropout_rate, dropout_rng)  # mask bool[B, 1, (1,) T, S]
    out = jnp.einsum(f"{scores_spec},{kv}->{q_spec}", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, dh)


def _causal_blocks(q, k, v, mask, block: int, dropout_rate: float, dropout_rng) -> jax.Array:
    """`attention` of a causal mask in query blocks (see there). q float[B, T, H, Dh], k/v float[B, T, K, Dh]."""
    b, t, h, dh = q.shape
    rows = -(-t // -(-t // block))  # even blocks of at most `block` rows
    starts = range(0, t, rows)
    rngs = [None if dropout_rng is None else jax.random.fold_in(dropout_rng, i) for i in range(len(starts))]
    if k.shape[2] != h:  # grouped KV heads: each block through the grouped path
        return jnp.concatenate([
            attention(q[:, a:a + rows], k[:, :a + rows], v[:, :a + rows],
                      None if mask is None else mask[:, :, a:a + rows, :a + rows],
                      dropout_rate=dropout_rate, dropout_rng=rng)
            for a, rng in zip(starts, rngs)
        ], axis=1)
    # Heads first once: every block then slices keys along their length, with no per-block transpose.
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, Dh]
    outs = []
    for a, rng in zip(starts, rngs):
        e = min(a + rows, t)
        scores = jnp.einsum("bhtd,bhsd->bhts", qh[:, :, a:e], kh[:, :, :e], preferred_element_type=jnp.float32)
        probs = _attention_probs(scores * dh**-0.5, None if mask is None else mask[:, :, a:e, :e], dropout_rate, rng)
        outs.append(jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), vh[:, :, :e]))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


ATTENTION_RESIDUALS = "attention_residuals"


def with_named_residuals(fn: Callable, name: str) -> Callable:
    """fn(q, k, v, mask=mask) -> out float[B, T, H, Dh] (mask bool or None, not differentiated),
    differentiated as before, with its output and the per-row statistics its backward pass keeps
    (residuals of at most B * T * H elements, e.g. cuDNN's log-sum-exp) tagged
    `checkpoint_name(., name)`. A remat policy can then save them (`save_only_these_names`)
    instead of rerunning fn in the backward pass. Anything else fn keeps is left to the enclosing
    policy: q, k, v are fn's inputs, a bias that fn builds from the mask is rebuilt from it. The
    output is matched by identity, not shape, so that copies of q, k or v (the same shape) are
    never saved by mistake. The mask is an argument, not a closure: a custom_vjp must not close
    over traced values."""

    @jax.custom_vjp
    def wrapped(q, k, v, mask):
        return fn(q, k, v, mask=mask)

    def forward(q, k, v, mask):
        out, backward = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask), q, k, v)
        # The output is named as it leaves, too: whatever reads it in the backward pass (the
        # o_proj's weight gradient) then finds it saved rather than rerunning fn.
        named_out = checkpoint_name(out, name)
        row_stats = out.size // out.shape[-1]

        def tag(x):
            if x is out:
                return named_out
            small_stats = jnp.issubdtype(x.dtype, jnp.floating) and 0 < x.size <= row_stats
            return checkpoint_name(x, name) if small_stats and x.shape != out.shape else x

        leaves, tree = jax.tree_util.tree_flatten(backward)
        return named_out, jax.tree_util.tree_unflatten(tree, [tag(x) for x in leaves])

    def backward_rule(backward, g):
        return (*backward(g), None)  # no cotangent for the mask

    wrapped.defvjp(forward, backward_rule)
    return lambda q, k, v, mask=None: wrapped(q, k, v, mask)
