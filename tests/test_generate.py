"""Batched decoding with the KV cache (owl_jax.generate): cache vs full forward, batch vs alone,
sampling, per-sample EOS, buckets (no recompilation), mesh."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturb, small_owl_config
from owl_jax.generate import Generator, Sampling, bucket_length, decode, make_batch, prefill, sample_token
from owl_jax.models.config import IMAGE_PLACEHOLDER_ID
from owl_jax.models.owl import MplugOwl, init_params, is_decode_layout


def random_params(cfg, seed: int = 0, scale: float = 0.3):
    """Random weights without running init (fast): norm scales 1 + noise, everything else noise.
    Large noise gives peaked logits, so greedy choices are not near-ties."""
    abstract = nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
    base = jax.tree_util.tree_map_with_path(
        lambda path, x: np.full(x.shape, 1.0 if path[-1].key == "scale" else 0.0, x.dtype), abstract)
    return perturb(base, seed=seed, scale=scale)


@pytest.fixture(scope="module")
def owl():
    cfg = small_owl_config()
    return cfg, jax.device_put(random_params(cfg, seed=5))


def _prompts(cfg, rng):
    """Three prompts: 0, 1 and 2 images, different lengths; their images flat."""
    p = cfg.tokens_per_image
    text = lambda n: list(rng.integers(3, cfg.llm.vocab_size, size=n))
    prompts = [
        [1] + text(9),
        [1] + text(3) + [IMAGE_PLACEHOLDER_ID] * p + text(5),
        [1] + text(2) + [IMAGE_PLACEHOLDER_ID] * p + text(1) + [IMAGE_PLACEHOLDER_ID] * p + text(4),
    ]
    size = cfg.vision.image_size
    images = list(rng.normal(size=(3, size, size, 3)).astype(np.float32))
    return [np.asarray(x, np.int32) for x in prompts], images, [0, 1, 2]


def _split_images(images, counts):
    starts = np.cumsum([0] + counts)
    return [images[starts[i]:starts[i + 1]] for i in range(len(counts))]


@pytest.mark.parametrize("decode_layout", [True, False], ids=["decode_layout", "training_layout"])
def test_cached_decoding_matches_full_forward(owl, rng, decode_layout):
    cfg, params = owl
    prompts, images, counts = _prompts(cfg, rng)
    batch = make_batch(prompts, images, counts, cfg)
    steps = 6
    gen = Generator(params, cfg, decode_layout=decode_layout)
    assert is_decode_layout(gen.params) == decode_layout
    out = gen.generate(batch, Sampling(max_new_tokens=steps), return_logits=True, disable_eos=True)
    assert out["length"].tolist() == [steps] * 3
    # One full forward over prompt + generated tokens gives every step's logits at once.
    b, p = batch.input_ids.shape
    ids = np.concatenate([batch.input_ids, np.zeros((b, steps), np.int32)], 1)
    ids[:3, p:] = out["tokens"]
    mask = np.concatenate([batch.prompt_mask, np.ones((b, steps), bool)], 1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    full = jax.jit(MplugOwl(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(batch.pixel_values),
                                        jnp.asarray(batch.num_images), jnp.asarray(mask), jnp.asarray(positions))
    expected = np.asarray(full)[:3, p - 1:p - 1 + steps]
    np.testing.assert_allclose(out["logits"], expected, atol=1e-4, rtol=0)
    assert (out["tokens"] == expected.argmax(-1)).all()


def test_batch_equals_one_at_a_time_and_stops_per_sample(owl, rng):
    cfg, params = owl
    prompts, images, counts = _prompts(cfg, rng)
    steps = 8
    free = Generator(params, cfg).generate(make_batch(prompts, images, counts, cfg), Sampling(max_new_tokens=steps),
                                           return_logits=True, disable_eos=True)  # compiled by the test above
    # Make sample 1's third token the EOS: it stops there, the others run on (unless they emit it too).
    eos = int(free["tokens"][1, 2])
    gen = Generator(params, cfg, eos_id=eos)
    together = gen.generate(make_batch(prompts, images, counts, cfg), Sampling(max_new_tokens=steps))
    assert together["length"][1] == 3 and together["done"][1]
    assert (together["tokens"][1, 3:] == cfg.llm.pad_token_id).all()
    # The loop ends when the real samples are done; rows padding the batch do not hold it up.
    padded = gen.generate(make_batch([prompts[1]], images[:1], [1], cfg, min_batch=2), Sampling(max_new_tokens=steps))
    assert padded["step"] == 3 and padded["tokens"][0, :3].tolist() == together["tokens"][1, :3].tolist()
    for i, imgs in enumerate(_split_images(images, counts)):
        alone = gen.generate(make_batch([prompts[i]], imgs, [counts[i]], cfg), Sampling(max_new_tokens=steps))
        assert alone["tokens"][0].tolist() == together["tokens"][i].tolist(), i
        assert alone["length"][0] == together["length"][i]
        n = int(together["length"][i])
        expect_stop = eos in free["tokens"][i].tolist()
        assert n == (free["tokens"][i].tolist().index(eos) + 1 if expect_stop else steps)
        assert together["tokens"][i, :n].tolist() == free["tokens"][i, :n].tolist()


def test_sampling_is_seeded_and_top_k_1_is_greedy(owl, rng):
    cfg, params = owl
    prompts, images, counts = _prompts(cfg, rng)
    batch = make_batch(prompts, images, counts, cfg)
    gen = Generator(params, cfg)
    run = lambda **kw: gen.generate(batch, Sampling(max_new_tokens=8, **kw), disable_eos=True)["tokens"]
    greedy = run()
    a, b, c = run(do_sample=True, seed=1), run(do_sample=True, seed=1), run(do_sample=True, seed=2)
    assert (a == b).all() and (a != c).any() and (a != greedy).any()
    assert (run(do_sample=True, top_k=1, seed=3) == greedy).all()
    assert (run(do_sample=True, top_p=1e-6, seed=4) == greedy).all()
    # Chunked (streamed) decoding draws the same samples as one shot.
    chunks = list(gen.stream(batch, Sampling(max_new_tokens=8, do_sample=True, seed=1, temperature=0.7, top_k=20,
                                             top_p=0.9), chunk=3, disable_eos=True))
    assert [c["step"] for c in chunks] == [1, 4, 7, 8]
    assert (chunks[-1]["tokens"] == run(do_sample=True, seed=1, temperature=0.7, top_k=20, top_p=0.9)).all()


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.2, 0.05]] * 2000))
    key = jax.random.PRNGKey(0)
    draw = lambda k, p, t=1.0: np.asarray(sample_token(logits, key, t, k, p, greedy=False))
    assert set(draw(2, 1.0).tolist()) == {1, 2}
    assert set(draw(0, 0.65).tolist()) == {1, 2}  # 0.4 < 0.65 <= 0.4 + 0.3
    assert set(draw(0, 0.75).tolist()) == {1, 2, 3}
    assert set(draw(0, 1.0).tolist()) == {0, 1, 2, 3, 4}
    freq = np.bincount(draw(0, 1.0, 0.5), minlength=5) / 2000  # temperature 0.5 sharpens
    assert freq[1] > 0.5
    greedy = np.asarray(sample_token(logits, key, 1.0, 0, 1.0, greedy=True, vocab_limit=1))
    assert (greedy == 0).all()  # ids >= vocab_limit are banned


def test_filters_keep_what_a_sort_keeps():
    """The bisection top-k / top-p cut-offs equal the sort-based definitions."""
    from owl_jax.generate import _top_k_filter, _top_p_filter

    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 1000)) * 3
    logits = logits.at[:, -10:].set(-jnp.inf)  # banned ids (vocab_limit)
    x = np.asarray(logits, np.float64)
    desc = -np.sort(-x, axis=-1)
    for k in [1, 2, 37, 990, 1000]:
        kept = np.isfinite(np.asarray(_top_k_filter(logits, jnp.int32(k))))
        assert (kept == ((x >= desc[:, k - 1:k]) & np.isfinite(x))).all(), k
    probs = np.exp(desc - desc[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    mass_before = np.cumsum(probs, -1) - probs
    for p in [1e-6, 0.3, 0.9, 0.999]:
        last = (mass_before < p).sum(-1) - 1  # the smallest prefix of the sorted row reaching p
        cut = np.take_along_axis(desc, last[:, None], -1)
        kept = np.isfinite(np.asarray(_top_p_filter(logits, jnp.float32(p))))
        assert (kept == (x >= cut)).all(), p


def test_buckets_compile_once(owl, rng):
    cfg, params = owl
    gen = Generator(params, cfg)
    text = lambda n: np.asarray([1] + list(rng.integers(3, cfg.llm.vocab_size, size=n - 1)), np.int32)
    assert bucket_length(20) == bucket_length(30) == 32 and bucket_length(300) == 384
    gen.generate(make_batch([text(20)], None, [0], cfg, min_batch=4), Sampling(max_new_tokens=4))
    sizes = (prefill._cache_size(), decode._cache_size())
    gen.generate(make_batch([text(30), text(17), text(25)], None, [0, 0, 0], cfg, min_batch=4),
                 Sampling(max_new_tokens=4, seed=3))
    gen.generate(make_batch([text(27), text(19)], None, [0, 0], cfg, min_batch=4),
                 Sampling(max_new_tokens=4, do_sample=False, temperature=0.3, top_k=5))
    assert (prefill._cache_size(), decode._cache_size()) == sizes  # compiled once for all three


def test_sharded_params_on_a_mesh(owl, rng):
    """Params placed by their logical axes (the training rules) on a mesh give the same tokens."""
    from owl_jax.api import shard_params
    from owl_jax.sharding import DEFAULT_RULES, make_mesh

    cfg, params = owl
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    sharded = shard_params(params, cfg, mesh, DEFAULT_RULES)
    assert isinstance(jax.tree_util.tree_leaves(sharded)[0].sharding, jax.sharding.NamedSharding)
    prompts, images, counts = _prompts(cfg, rng)
    batch = make_batch(prompts, images, counts, cfg)
    want = Generator(params, cfg).generate(batch, Sampling(max_new_tokens=5), disable_eos=True)["tokens"]
    got = Generator(sharded, cfg, mesh=mesh, rules=DEFAULT_RULES).generate(batch, Sampling(max_new_tokens=5),
                                                                           disable_eos=True)
    assert (got["tokens"] == want).all()


MULTI_DEVICE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from conftest import small_owl_config
from test_generate import _prompts, random_params
from owl_jax.api import shard_params
from owl_jax.generate import Generator, Sampling, make_batch
from owl_jax.sharding import DEFAULT_RULES, make_mesh
cfg = small_owl_config()
params = random_params(cfg, seed=5)
prompts, images, counts = _prompts(cfg, np.random.default_rng(0))
batch = make_batch(prompts, images, counts, cfg)
want = Generator(jax.device_put(params, jax.devices()[0]), cfg).generate(batch, Sampling(max_new_tokens=5))
mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
sharded = shard_params(params, cfg, mesh, DEFAULT_RULES)
kernel = sharded["language_model"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
assert len({s.device for s in kernel.addressable_shards}) == 4 and kernel.addressable_shards[0].data.size * 4 == kernel.size
gen = Generator(sharded, cfg, mesh=mesh, rules=DEFAULT_RULES)
# The decode layout keeps the sharding: per-layer weights less the layers axis, the LM head transposed.
layer_kernel = gen.params["language_model"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
assert tuple(layer_kernel.sharding.spec) == tuple(kernel.sharding.spec)[1:], (layer_kernel.sharding, kernel.sharding)
assert len({s.device for s in layer_kernel.addressable_shards}) == 4 and layer_kernel.addressable_shards[0].data.size * 4 == layer_kernel.size
head, head_t = sharded["language_model"]["lm_head"]["kernel"], gen.params["language_model"]["lm_head"]["kernel"]
assert head_t.shape == head.shape[::-1] and tuple(head_t.sharding.spec) == tuple(head.sharding.spec)[::-1], head_t.sharding
got = gen.generate(batch, Sampling(max_new_tokens=5))
assert (got["tokens"] == want["tokens"]).all(), (got["tokens"], want["tokens"])
print("OK")
"""


def test_params_sharded_over_four_devices_give_the_same_tokens():
    """fsdp x tensor = 2 x 2 host devices (a fresh process: the device count is fixed at start-up)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE, here], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
