"""Decoding settings and drawing a token from logits (greedy, temperature, top-k, top-p) under jit."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding settings. `do_sample=False` (or temperature <= 0) is greedy; top_k 0 and top_p 1.0
    switch those filters off."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_token(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, *, greedy: bool,
                 vocab_limit: int | None = None) -> jax.Array:
    """One token per row from logits float[B, V]. temperature/top_k/top_p are (traced) scalars.

    top-k keeps the k largest logits (0: all); top-p keeps the smallest set of the largest logits
    (after top-k) whose mass reaches p (always at least one token); ties at a cut-off are kept.
    `vocab_limit` bans ids >= it (a tokenizer smaller than the model's vocabulary)."""
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if vocab_limit is not None and vocab_limit < v:
        logits = jnp.where(jnp.arange(v) < vocab_limit, logits, -jnp.inf)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    # The filters only run when asked (lax.cond: the flags are traced, one compiled program).
    logits = jax.lax.cond((top_k > 0) & (top_k < v), _top_k_filter, lambda x, k: x, logits, top_k)
    logits = jax.lax.cond(top_p < 1.0, _top_p_filter, lambda x, p: x, logits, jnp.asarray(top_p, jnp.float32))
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# The filters find their cut-off by bisection on the float order, 32 passes of a masked count or sum
# over the row, instead of sorting it: XLA's CPU sort of float[8, 32000] takes ~50 ms, longer than a
# decoding step of the small model.


def _order_keys(x: jax.Array) -> jax.Array:
    """float32[...] -> uint32[...] in the same order (x < y <=> key(x) < key(y); NaN aside)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key_where(holds, batch: int) -> jax.Array:
    """Per row, the largest uint32 u with holds(u) (bool[B] of uint32[B]), where holds is true up to
    some u and false beyond, and holds(0): built bit by bit from the top."""
    def try_bit(i, best):
        candidate = best | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(holds(candidate), candidate, best)

    return jax.lax.fori_loop(0, 32, try_bit, jnp.zeros((batch,), jnp.uint32))


def _top_k_filter(logits: jax.Array, k) -> jax.Array:
    """float[B, V] -> the same with everything below the k-th largest of its row set to -inf."""
    keys = _order_keys(logits)
    kth = _largest_key_where(lambda u: (keys >= u[:, None]).sum(-1) >= k, logits.shape[0])
    return jnp.where(keys >= kth[:, None], logits, -jnp.inf)


def _top_p_filter(logits: jax.Array, p) -> jax.Array:
    """float[B, V] -> the same with the smallest logits set to -inf, keeping the smallest set of the
    largest whose softmax mass reaches p: the cut-off is the largest logit c with mass(>= c) >= p."""
    keys = _order_keys(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    cut = _largest_key_where(lambda u: jnp.where(keys >= u[:, None], probs, 0.0).sum(-1) >= p, logits.shape[0])
    return jnp.where(keys >= cut[:, None], logits, -jnp.inf)
