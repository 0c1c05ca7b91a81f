"""Next-token loss on AI-answer tokens only."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import SymbolicZero

from owl_jax.models.layers import constrain, dot_accumulator


def samples_without_loss(input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """How many samples of int[B, T] carry no loss token (e.g. an answer truncated away); the batch's
    filler rows (all padding, id 0) are not samples."""
    is_sample = (input_ids != 0).any(axis=1)
    return ((loss_mask[:, 1:].sum(axis=1) == 0) & is_sample).sum().astype(jnp.float32)


def answer_loss(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
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
    label = jnp.maximum(targets, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    num_tokens = weights.sum()
    loss = (ce * weights).sum() / jnp.maximum(num_tokens, 1.0)
    picked = jnp.take_along_axis(logits, label[..., None], axis=-1)[..., 0]
    correct = (_is_top(logits, picked, targets) * weights).sum()
    metrics = {
        "loss_tokens": num_tokens,
        "correct_tokens": correct,
        "samples_without_loss": samples_without_loss(input_ids, loss_mask),
    }
    return loss, metrics


def _is_top(logits: jax.Array, picked: jax.Array, targets: jax.Array) -> jax.Array:
    """Whether each target's logit (`picked`) is the largest: the token accuracy. Not an argmax: XLA's
    CPU argmax over a [N, 32000] vocab (a two-output reduce) takes ~60 ms of a bench_small step,
    while the max is shared with the logsumexp. A tie with another token counts as a hit."""
    return (picked >= jnp.max(logits, axis=-1)) & (targets >= 0)


# ------------------------------------------------------------------ the LM head fused with the loss
# Only answer tokens carry loss, so only their rows of the LM head's [N, V] logits are needed: the
# head is about half the LLM's FLOPs, and answers are typically under half the tokens. Under jit the
# number of answer rows must be static, so the rows are sorted (answers first) and the head runs on
# the smallest of a few static budgets that holds them all (a `lax.switch`, exact for any mask).
# Gradients are computed in the forward pass (a custom VJP), so no [N, V] residual is kept and the
# switch never zero-fills the residuals of the branches not taken.


def row_budgets(num_rows: int, batch_size: int, buckets: int) -> tuple[int, ...]:
    """`buckets` increasing row budgets, the last `num_rows`; each a multiple of batch_size (so a
    batch-sharded row axis stays divisible) where it can be."""
    sizes = [min(num_rows, -(-num_rows * (i + 1) // buckets // batch_size) * batch_size) for i in range(buckets)]
    return tuple(sorted(set(sizes)))


def answer_loss_from_hidden(
    hidden: jax.Array, kernel: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *, buckets: int = 8
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`answer_loss(hidden @ kernel, input_ids, loss_mask)` without the logits of non-answer tokens.

    hidden float[B, T, D]: the LLM's final (normed) hidden states; kernel float[D, V]: the LM head
    (its training layout); input_ids, loss_mask int[B, T] as in `answer_loss`. Same loss, metrics and
    gradients (for hidden and kernel; loss_mask is data, never differentiated). The head runs on
    the smallest of `row_budgets(B * (T - 1), B, buckets)` rows that holds every answer token.
    """
    b, t, d = hidden.shape
    targets = input_ids[:, 1:].reshape(-1)
    weights = loss_mask[:, 1:].astype(jnp.float32).reshape(-1)
    rows = hidden[:, :-1].reshape(-1, d)
    # Stable: answer rows first, in order; the sort key is data, not differentiated.
    order = jnp.argsort(weights == 0, stable=True)
    budgets = row_budgets(b * (t - 1), b, buckets)
    num_tokens = weights.sum()
    branch = (jnp.asarray(budgets) < num_tokens).sum()
    ce_sum, correct = _head_cross_entropy(rows, kernel, targets, weights, order, branch, budgets)
    metrics = {
        "loss_tokens": num_tokens,
        "correct_tokens": correct,
        "samples_without_loss": samples_without_loss(input_ids, loss_mask),
    }
    return ce_sum / jnp.maximum(num_tokens, 1.0), metrics


def _head_rows(rows, kernel, targets, weights, order, budget: int, kernel_grad: bool):
    """The head and cross entropy on the first `budget` rows of `order`.

    rows float[N, D], kernel float[D, V], targets int[N], weights float[N], order int[N] ->
    (ce_sum float[], correct float[], d_rows float[N, D], d_kernel float[D, V] or None): the weighted
    CE sum, the weighted count of argmax hits, and the CE sum's gradients.
    """
    idx = order[:budget]
    h = constrain(rows[idx], ("batch", None))  # [n, D]
    w, tgt = weights[idx], targets[idx]
    acc = dot_accumulator(h.dtype)
    logits = constrain(jnp.dot(h, kernel.astype(h.dtype), preferred_element_type=acc).astype(jnp.float32),
                       ("batch", "vocab"))  # [n, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    label = jnp.maximum(tgt, 0)  # padding targets (< 0) are never weighted; clamp like answer_loss
    picked = jnp.take_along_axis(logits, label[:, None], axis=-1)[:, 0]
    ce_sum = ((lse - picked) * w).sum()
    correct = (_is_top(logits, picked, tgt) * w).sum()
    # d ce_sum / d logits = w * (softmax - onehot); the one-hot compare fuses into the exp pass.
    onehot = label[:, None] == jnp.arange(logits.shape[-1])[None, :]
    d_logits = (w[:, None] * (jnp.exp(logits - lse[:, None]) - onehot)).astype(h.dtype)
    d_h = jax.lax.dot_general(d_logits, kernel.astype(h.dtype), (((1,), (1,)), ((), ())),
                              preferred_element_type=acc)  # [n, D]
    d_rows = jnp.zeros_like(rows).at[idx].set(d_h.astype(rows.dtype), unique_indices=True)
    d_kernel = jnp.dot(h.T, d_logits, preferred_element_type=acc).astype(kernel.dtype) if kernel_grad else None
    return ce_sum, correct, d_rows, d_kernel


def _switch_head(rows, kernel, targets, weights, order, branch, budgets, kernel_grad: bool):
    """`_head_rows` with the budget `budgets[branch]` (a traced index)."""
    branches = [
        (lambda r, k, tg, w, o, n=n: _head_rows(r, k, tg, w, o, n, kernel_grad)) for n in budgets
    ]
    return jax.lax.switch(branch, branches, rows, kernel, targets, weights, order)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _head_cross_entropy(rows, kernel, targets, weights, order, branch, budgets):
    """(ce_sum, correct) of the head on the answer rows; see `answer_loss_from_hidden`."""
    ce_sum, correct, _, _ = _switch_head(rows, kernel, targets, weights, order, branch, budgets, kernel_grad=False)
    return ce_sum, correct


def _head_cross_entropy_fwd(rows, kernel, targets, weights, order, branch, budgets):
    # symbolic_zeros: `perturbed` says whether the kernel is differentiated (not when it is frozen).
    kernel_grad = kernel.perturbed
    args = [x.value for x in (rows, kernel, targets, weights, order, branch)]
    ce_sum, correct, d_rows, d_kernel = _switch_head(*args, budgets, kernel_grad=kernel_grad)
    return (ce_sum, correct), (d_rows, d_kernel)


def _head_cross_entropy_bwd(budgets, residuals, cotangents):
    d_rows, d_kernel = residuals
    g = cotangents[0]  # the cotangent of ce_sum; `correct` is a metric, not differentiated
    if isinstance(g, SymbolicZero):
        return (None,) * 6
    # Cotangents keep their primal's dtype: g is fp32, the rows may be bf16.
    d_kernel = None if d_kernel is None else (g * d_kernel).astype(d_kernel.dtype)
    return (g * d_rows).astype(d_rows.dtype), d_kernel, None, None, None, None


_head_cross_entropy.defvjp(_head_cross_entropy_fwd, _head_cross_entropy_bwd, symbolic_zeros=True)
