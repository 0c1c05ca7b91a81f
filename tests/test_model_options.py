"""Remat policies, attention implementations and bf16 compute change speed/memory, not results."""
import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.batch import IMAGE_PLACEHOLDER_ID
from owl_jax.losses import answer_loss
from owl_jax.models.owl import MplugOwl

from conftest import random_owl_params, small_owl_config


@pytest.fixture(scope="module")
def setup():
    cfg = small_owl_config()
    params = random_owl_params(cfg, perturb_seed=7)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, cfg.llm.vocab_size, size=(2, 24))
    ids[0, 2 : 2 + cfg.tokens_per_image] = IMAGE_PLACEHOLDER_ID
    batch = dict(
        input_ids=jnp.asarray(ids),
        pixel_values=jnp.asarray(rng.normal(size=(1, 56, 56, 3)), jnp.float32),
        num_images=jnp.asarray([1, 0]),
        attention_mask=jnp.ones((2, 24), jnp.int32),
    )
    loss_mask = jnp.asarray(rng.integers(0, 2, size=(2, 24)))
    return cfg, params, batch, loss_mask


def _loss_and_grad(cfg, params, batch, loss_mask):
    def loss_fn(p):
        logits = MplugOwl(cfg).apply({"params": p}, **batch)
        return answer_loss(logits, batch["input_ids"], loss_mask)[0]

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("policy", ["full", "dots_no_batch", "dots_no_batch_attention"])
def test_remat_gives_same_loss_and_gradients(setup, policy):
    cfg, params, batch, loss_mask = setup
    loss, grads = _loss_and_grad(cfg, params, batch, loss_mask)
    loss_r, grads_r = _loss_and_grad(dataclasses.replace(cfg, remat_policy=policy), params, batch, loss_mask)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert float(jnp.abs(grads["vision_model"]["embeddings"]["cls_token"]).sum()) > 0  # images get gradients


@pytest.mark.parametrize("policy", ["none", "full"])
def test_layers_unrolled_over_stacked_params_match_the_scan(setup, policy):
    """scan_unroll=0 runs the layers as a Python loop over the same stacked params: same loss and
    gradients, and no loop left in the compiled program."""
    cfg, params, batch, loss_mask = setup
    loss, grads = _loss_and_grad(cfg, params, batch, loss_mask)
    unrolled = dataclasses.replace(cfg, scan_unroll=0, remat_policy=policy)
    loss_u, grads_u = _loss_and_grad(unrolled, params, batch, loss_mask)
    np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
    assert jax.tree_util.tree_structure(grads_u) == jax.tree_util.tree_structure(grads)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_u)):
        np.testing.assert_allclose(b, a, atol=1e-6)
    hlo = jax.jit(lambda p: MplugOwl(unrolled).apply({"params": p}, **batch)).lower(params).as_text()
    assert (
        "while" not in hlo
        and "while" in jax.jit(lambda p: MplugOwl(cfg).apply({"params": p}, **batch)).lower(params).as_text()
    )


@pytest.mark.parametrize("block", [5, 7])
def test_causal_query_blocks_match_one_block(setup, block):
    """The LLM's attention in query blocks (each against the keys up to its last row): same loss and
    gradients, with a padded sample, and fewer FLOPs (the masked triangle is skipped)."""
    cfg, params, batch, loss_mask = setup
    padded = {**batch, "attention_mask": batch["attention_mask"].at[1, 19:].set(0)}
    loss, grads = _loss_and_grad(cfg, params, padded, loss_mask)
    blocked = dataclasses.replace(cfg, causal_query_block=block)
    loss_b, grads_b = _loss_and_grad(blocked, params, padded, loss_mask)
    np.testing.assert_allclose(loss_b, loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_b)):
        np.testing.assert_allclose(b, a, atol=1e-6)

    def flops(c):
        f = jax.jit(lambda p: MplugOwl(c).apply({"params": p}, **padded))
        return f.lower(params).compile().cost_analysis()["flops"]

    assert flops(blocked) < flops(cfg)


def test_causal_query_blocks_with_grouped_kv_heads():
    from owl_jax.models.attention import attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 11, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 11, 2, 8)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(np.arange(11)[None, :] < np.array([[11], [8]]))
    mask = jnp.tril(jnp.ones((11, 11), bool))[None, None] & valid[:, None, None, :]
    whole = attention(q, k, v, mask)
    np.testing.assert_allclose(attention(q, k, v, mask, causal_query_block=3), whole, atol=1e-6)
    np.testing.assert_allclose(attention(q, k, v, mask, causal_query_block=11), whole, atol=0)


def test_causal_hint_keeps_the_padding_mask():
    """causal=True lets jax.nn.dot_product_attention skip the upper triangle ("jax" here; "cudnn" on
    GPU makes the same call); the padding mask still applies, left padding included."""
    from owl_jax.models.attention import attention

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 9, 4, 8)), jnp.float32) for _ in range(3))
    valid = jnp.asarray([[True] * 9, [True] * 6 + [False] * 3, [False] * 4 + [True] * 5])  # full, right-, left-padded
    mask = jnp.tril(jnp.ones((9, 9), bool))[None, None] & valid[:, None, None, :]
    want = attention(q, k, v, mask)
    got = attention(q, k, v, mask, impl="jax", causal=True)
    rows = np.asarray(valid)  # padded query rows carry no meaning
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-5)
    # Without a mask, causal=True alone makes every path causal.
    triangle = jnp.tril(jnp.ones((9, 9), bool))[None, None]
    for impl in ("jax", "xla"):
        np.testing.assert_allclose(
            attention(q, k, v, None, impl=impl, causal=True), attention(q, k, v, triangle), atol=1e-5
        )


def test_cudnn_leaves_odd_lengths_to_xla():
    """cuDNN cannot train on odd lengths (the ViT's 257 tokens): those run the XLA path, so on this CPU
    (no cuDNN) they still compute; even lengths do ask for cuDNN."""
    from owl_jax.models.attention import attention

    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 9, 4, 8)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(attention(q, k, v, None, impl="cudnn"), attention(q, k, v, None), atol=0)
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="cuDNN is not detected"):
            attention(q[:, :8], k[:, :8], v[:, :8], None, impl="cudnn")


def test_splash_kernel_matches_xla_with_padding():
    """The TPU splash kernel (run by Pallas' interpreter here) gives the einsum path's outputs and
    gradients on the valid rows: left and right padding, 3 x 3 blocks of 128, grouped KV heads (4
    query heads on 2), alone and sharded (shard_map) over an 8-device mesh."""
    from owl_jax.models.attention import attention
    from owl_jax.sharding import DEFAULT_RULES, make_mesh

    rng = np.random.default_rng(3)
    b, t, h, kv_heads, dh = 4, 384, 4, 2, 128
    q = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, dh)), jnp.float32) for _ in range(2))
    valid = np.ones((b, t), bool)
    valid[1, 300:] = False  # right padding
    valid[2, :70] = False  # left padding
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & jnp.asarray(valid)[:, None, None, :]
    weights = jnp.asarray(rng.normal(size=(b, t, h, dh)) * valid[:, :, None, None], jnp.float32)

    def run(impl):
        def loss(q, k, v):
            out = attention(q, k, v, mask, impl=impl, causal=True)
            return (out * weights).sum(), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    want, want_grads = run("xla")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # batch over 4 devices, heads over 2
    for context in (contextlib.nullcontext(), jax.set_mesh(mesh)):
        with context, nn.logical_axis_rules(DEFAULT_RULES):
            got, got_grads = run("splash")
        np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, atol=2e-5)
    # Shapes the kernel cannot take (here: 32-wide heads) run the einsum path.
    small = [x[..., :32] for x in (q, k, v)]
    np.testing.assert_array_equal(attention(*small, mask, impl="splash", causal=True), attention(*small, mask))


def test_unknown_remat_policy_is_a_clear_error(setup):
    cfg, params, batch, _ = setup
    with pytest.raises(ValueError, match="remat_policy 'sometimes'"):
        MplugOwl(dataclasses.replace(cfg, remat_policy="sometimes")).apply({"params": params}, **batch)


def test_dot_product_attention_impl_matches_xla(setup):
    cfg, params, batch, _ = setup
    xla = MplugOwl(cfg).apply({"params": params}, **batch)
    jax_impl = MplugOwl(dataclasses.replace(cfg, attention_impl="jax")).apply({"params": params}, **batch)
    np.testing.assert_allclose(jax_impl, xla, atol=1e-4)
    if jax.default_backend() == "cpu":
        auto = MplugOwl(dataclasses.replace(cfg, attention_impl="auto")).apply({"params": params}, **batch)
        np.testing.assert_array_equal(auto, xla)  # "auto" is the einsum path on CPU
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        MplugOwl(dataclasses.replace(cfg, attention_impl="flash")).apply({"params": params}, **batch)


# About twice the largest bf16-vs-fp32 logit error measured on `setup` (0.0164; logits up to ~1.6).
BF16_LOGITS_TOL = 0.035


def test_bf16_compute_stays_close_to_fp32(setup):
    cfg, params, batch, _ = setup
    fp32 = np.asarray(MplugOwl(cfg).apply({"params": params}, **batch))
    bf16 = MplugOwl(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, **batch)
    assert bf16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(bf16, np.float32) - fp32).max() < BF16_LOGITS_TOL
    # The tolerance tells an image from none: blanking it moves the fp32 logits by far more (measured 0.126).
    blank = {**batch, "pixel_values": jnp.zeros_like(batch["pixel_values"])}
    assert np.abs(np.asarray(MplugOwl(cfg).apply({"params": params}, **blank)) - fp32).max() > 3 * BF16_LOGITS_TOL


def test_bf16_matmuls_on_cpu_read_bf16_weights():
    """A bf16 x bf16 -> bf16 dot makes XLA's CPU backend convert the whole weight to fp32 on every
    call; Dense asks for fp32 accumulation instead (layers.dot_accumulator), which runs natively.
    The compiled program converts the [in, out] kernel nowhere, in either kernel layout."""
    from owl_jax.models.layers import Dense

    x = jnp.ones((8, 64), jnp.bfloat16)
    for out_in in (False, True):
        dense = Dense(96, ("embed", "mlp"), use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                      kernel_out_in=out_in)
        variables = dense.init(jax.random.PRNGKey(0), x)
        hlo = jax.jit(dense.apply).lower(variables, x).compile().as_text()
        kernel_f32 = "f32[96,64]" if out_in else "f32[64,96]"
        assert kernel_f32 not in hlo, hlo
        y = dense.apply(variables, x)
        assert y.dtype == jnp.bfloat16
        kernel = nn.unbox(variables["params"]["kernel"]).astype(jnp.float32)
        want = np.asarray(x, np.float32) @ np.asarray(kernel.T if out_in else kernel)
        np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2)


def _masked_scores(q, k, mask):
    s = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    return jnp.where(mask, s, -1e30)


@jax.custom_vjp
def _flash_like(q, k, v, mask):
    return _flash_like_fwd(q, k, v, mask)[0]


def _flash_like_fwd(q, k, v, mask):
    """Keeps for the backward pass what cuDNN's kernel keeps: q, k, v, the output and each row's
    log-sum-exp (the probabilities are rebuilt from those)."""
    s = _masked_scores(q, k, mask)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", jnp.exp(s - lse[..., None]), v)
    return out, (q, k, v, mask, out, lse)


def _flash_like_bwd(res, g):
    q, k, v, mask, out, lse = res
    p = jnp.exp(_masked_scores(q, k, mask) - lse[..., None])
    dp = jnp.einsum("bthd,bshd->bhts", g, v)
    ds = p * (dp - jnp.einsum("bthd,bthd->bht", g, out)[..., None]) * q.shape[-1] ** -0.5
    dq, dk = jnp.einsum("bhts,bshd->bthd", ds, k), jnp.einsum("bhts,bthd->bshd", ds, q)
    return dq, dk, jnp.einsum("bhts,bthd->bshd", p, g), np.zeros(mask.shape, jax.dtypes.float0)


_flash_like.defvjp(_flash_like_fwd, _flash_like_bwd)


def test_dots_no_batch_attention_does_not_rerun_the_attention_forward():
    """Remat "dots_no_batch_attention" saves the output and row statistics of an attention wrapped
    by layers.with_named_residuals (as the LLM's cuDNN call is under that policy), so the backward
    pass only rebuilds the probabilities (one `exp`) instead of rerunning the forward too (its two
    and the backward's one); nothing else output-shaped is saved (not q, k, v); the gradients stay
    those of the unwrapped attention. Here a stand-in that keeps what cuDNN keeps (q, k, v, output,
    log-sum-exp; a bool mask where cuDNN keeps a bias made from it), and an o_proj whose weight
    gradient reads the attention output."""
    from owl_jax.models.attention import ATTENTION_RESIDUALS, with_named_residuals
    from owl_jax.models.config import RunOptions
    from owl_jax.models.layers import _REMAT_POLICIES
    from owl_jax.models.llama import LlamaModel

    b, t, h, dh = 2, 8, 2, 4
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, h * dh, h * dh)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(b, t, h * dh)), jnp.float32)

    def loss(w, x, attend):
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & (x[:, None, None, :, 0] > -5)  # traced
        q, k, v = (jnp.dot(x, w[i]).reshape(b, t, h, dh) for i in range(3))
        out = attend(jnp.sin(q), k, v, mask=mask)  # sin: rotary's stand-in, not a saved matmul
        return jnp.square(jnp.dot(out.reshape(b, t, h * dh), w[3])).sum()

    plain = lambda q, k, v, mask: _flash_like(q, k, v, mask)
    want = jax.grad(loss)(w, x, plain)
    wrapped = functools.partial(loss, attend=with_named_residuals(plain, ATTENTION_RESIDUALS))
    exps, saved_outputs = {}, {}
    for policy in ("dots_no_batch", "dots_no_batch_attention"):
        step = jax.grad(jax.checkpoint(wrapped, policy=_REMAT_POLICIES[policy]))
        np.testing.assert_allclose(jax.jit(step)(w, x), want, rtol=1e-4, atol=1e-4)
        (remat,) = [e for e in jax.make_jaxpr(step)(w, x).jaxpr.eqns if e.primitive.name == "remat2"]
        exps[policy] = str(remat.params["jaxpr"]).count(" exp ")
        # What the backward pass receives, output-shaped: the attention output alone (the saved
        # q/k/v projections are [B, T, H * Dh] matmul outputs).
        saved_outputs[policy] = sum(getattr(v.aval, "shape", None) == (b, t, h, dh) for v in remat.invars)
    assert exps == {"dots_no_batch": 3, "dots_no_batch_attention": 1}, exps
    assert saved_outputs == {"dots_no_batch": 0, "dots_no_batch_attention": 1}, saved_outputs

    # The LLM asks for the tags under this policy only.
    cfg = small_owl_config().llm
    for policy, named in (("dots_no_batch_attention", True), ("dots_no_batch", False)):
        assert LlamaModel(cfg, run=RunOptions(remat_policy=policy))._layer_kwargs()["name_attention_residuals"] is named

    # Gradients pass through the wrapper with another residual layout too (jax's XLA attention).
    fused = functools.partial(jax.nn.dot_product_attention, is_causal=True)
    want = jax.grad(loss)(w, x, fused)
    got = jax.grad(functools.partial(loss, attend=with_named_residuals(fused, ATTENTION_RESIDUALS)))(w, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
