import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from owl_jax.losses import answer_loss, answer_loss_from_hidden, row_budgets


def test_loss_counts_only_answer_tokens_and_matches_manual_ce(rng):
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, size=(2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], jnp.int32)
    loss, m = answer_loss(logits, ids, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    expected = (ce[0, 1] + ce[0, 2] + ce[1, 3] + ce[1, 4]) / 4
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert m["loss_tokens"] == 4
    assert m["samples_without_loss"] == 0


def test_sample_without_answer_tokens_gives_finite_loss_and_is_counted(rng):
    logits = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    ids = jnp.asarray([[1, 4, 5, 0, 0], [1, 3, 2, 0, 0], [0, 0, 0, 0, 0]], jnp.int32)  # the last: a filler row
    mask = jnp.asarray([[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], jnp.int32)
    for loss_fn in (answer_loss, lambda h, i, m: answer_loss_from_hidden(h, jnp.eye(7), i, m)):
        loss, m = loss_fn(logits, ids, mask)
        assert np.isfinite(loss) and m["samples_without_loss"] == 1 and m["loss_tokens"] == 1
        loss, m = loss_fn(logits, ids, jnp.zeros_like(mask))
        assert float(loss) == 0.0 and m["samples_without_loss"] == 2  # filler rows are not samples


@pytest.mark.parametrize("mask_kind", ["random", "all", "none", "one_row"])
def test_loss_from_hidden_matches_loss_on_full_logits(rng, mask_kind):
    """The LM head on answer rows only (sorted, a static budget chosen by switch, gradients in a
    custom VJP) gives answer_loss's loss, metrics and gradients, for any mask."""
    b, t, d, v = 3, 9, 5, 13
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    ids = jnp.asarray(rng.integers(-1, v, size=(b, t)), jnp.int32)
    mask = {"random": rng.integers(0, 2, size=(b, t)), "all": np.ones((b, t)), "none": np.zeros((b, t)),
            "one_row": np.eye(b, t)}[mask_kind]
    mask = jnp.asarray(mask, jnp.int32)
    full = jax.value_and_grad(lambda h, k: answer_loss(h @ k, ids, mask), argnums=(0, 1), has_aux=True)
    fused = jax.jit(
        jax.value_and_grad(lambda h, k: answer_loss_from_hidden(h, k, ids, mask), argnums=(0, 1), has_aux=True)
    )
    (loss, metrics), grads = full(hidden, kernel)
    (loss_f, metrics_f), grads_f = fused(hidden, kernel)
    np.testing.assert_allclose(loss_f, loss, rtol=1e-6, atol=1e-7)
    for k in metrics:
        assert float(metrics_f[k]) == float(metrics[k]), k
    for a, e in zip(grads_f, grads):
        np.testing.assert_allclose(a, e, atol=1e-6)
    # A frozen head (only the hidden states differentiated) gives the same hidden-state gradient.
    grad_h = jax.jit(jax.grad(lambda h: answer_loss_from_hidden(h, kernel, ids, mask)[0]))(hidden)
    np.testing.assert_allclose(grad_h, grads[0], atol=1e-6)


def test_loss_from_hidden_keeps_bf16_gradients_bf16(rng):
    """bf16 hidden states and head (model.dtype=bfloat16): the custom VJP hands back cotangents in
    the primals' dtype (an fp32 one breaks the model's backward pass) and agrees with the full head."""
    b, t, d, v = 2, 7, 8, 11
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(d, v)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, size=(b, t)), jnp.int32)
    full = jax.grad(lambda h, k: answer_loss(h @ k, ids, mask)[0], argnums=(0, 1))(hidden, kernel)
    fused = jax.jit(jax.grad(lambda h, k: answer_loss_from_hidden(h, k, ids, mask)[0], argnums=(0, 1)))(hidden, kernel)
    for a, e in zip(fused, full):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), atol=0.02, rtol=0.02)


def test_row_budgets_end_at_all_rows_and_are_batch_multiples():
    assert row_budgets(2048, 4, 8) == (256, 512, 768, 1024, 1280, 1536, 1792, 2048)
    assert row_budgets(24, 3, 8) == (3, 6, 9, 12, 15, 18, 21, 24)
    assert row_budgets(10, 4, 8)[-1] == 10
