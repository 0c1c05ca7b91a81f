import jax.numpy as jnp
import numpy as np
import optax

from owl_jax.losses import answer_loss


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
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    ids = jnp.zeros((2, 5), jnp.int32)
    mask = jnp.asarray([[0, 0, 0, 0, 0], [0, 0, 1, 0, 0]], jnp.int32)
    loss, m = answer_loss(logits, ids, mask)
    assert np.isfinite(loss) and m["samples_without_loss"] == 1 and m["loss_tokens"] == 1
    loss, m = answer_loss(logits, ids, jnp.zeros_like(mask))
    assert float(loss) == 0.0 and m["samples_without_loss"] == 2
