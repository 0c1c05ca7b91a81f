"""Next-token loss on AI-answer tokens only (DESIGN 1.5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def answer_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross entropy over the batch's answer tokens.

    logits float[B, T, V]: position t predicts input_ids[:, t + 1]; loss_mask int[B, T]: 1 where the
    token is part of an AI answer (its closing EOS included). Normalised by the global count of loss
    tokens, never by zero: a batch (or sample) without any answer token contributes 0 and is counted
    in `samples_without_loss`.

    Returns (loss, metrics) with metrics: loss_tokens, correct_tokens, samples_without_loss (sums, so
    they add up across micro-batches and devices).
    """
    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    logits = logits[:, :-1].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
    num_tokens = weights.sum()
    loss = (ce * weights).sum() / jnp.maximum(num_tokens, 1.0)
    correct = ((jnp.argmax(logits, -1) == targets) * weights).sum()
    metrics = {
        "loss_tokens": num_tokens,
        "correct_tokens": correct,
        "samples_without_loss": (weights.sum(1) == 0).sum().astype(jnp.float32),
    }
    return loss, metrics
