"""Batched decoding with the KV cache (owl_jax.inference.engine): cache vs full forward (LoRA unmerged,
dropout rates set), batch vs alone, sampling, per-sample EOS, buckets (no recompilation), and a
data x fsdp x tensor = 2 x 2 x 2 mesh of the suite's 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.batch import IMAGE_PLACEHOLDER_ID
from owl_jax.inference.api import shard_params
from owl_jax.inference.engine import Generator, Sampling, bucket_length, decode, make_batch, prefill, sample_token
from owl_jax.models.config import LoraConfig
from owl_jax.models.owl import MplugOwl, is_decode_layout
from owl_jax.sharding import DEFAULT_RULES, make_mesh

from conftest import peaked_params, small_owl_config


@pytest.fixture(scope="module")
def owl():
    """The small owl with unmerged LoRA adapters (lora_b non-zero) and the configs' dropout rates
    (abstractor attention 0.1, LoRA 0.05), which generation must not apply."""
    cfg = small_owl_config(
        lora=LoraConfig(rank=4, alpha=8.0, dropout=0.05, target_modules=("q_proj", "v_proj", "up_proj"))
    )
    assert cfg.abstractor.attention_dropout == 0.1 and cfg.lora.dropout == 0.05
    return cfg, jax.device_put(peaked_params(cfg, seed=5))


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
def test_cached_decoding_matches_the_deterministic_full_forward(owl, rng, decode_layout):
    """Every step's logits with the KV cache equal a forward without one, deterministic: the LoRA
    adapters applied beside the frozen weights (not merged into them), no dropout though the config
    has rates; two runs give the same tokens and logits."""
    cfg, params = owl
    prompts, images, counts = _prompts(cfg, rng)
    batch = make_batch(prompts, images, counts, cfg)
    steps = 6
    gen = Generator(params, cfg, decode_layout=decode_layout)
    assert is_decode_layout(gen.params) == decode_layout
    out = gen.generate(batch, Sampling(max_new_tokens=steps), return_logits=True, disable_eos=True)
    assert out["length"].tolist() == [steps] * 3
    expected = _forward_step_logits(cfg, params, batch, out["tokens"])
    np.testing.assert_allclose(out["logits"], expected, atol=1e-4, rtol=0)
    assert (out["tokens"] == expected.argmax(-1)).all()
    again = gen.generate(batch, Sampling(max_new_tokens=steps), return_logits=True, disable_eos=True)
    assert (again["tokens"] == out["tokens"]).all() and (again["logits"] == out["logits"]).all()
    # The adapters count: lora_b is non-zero, and without it the same forward gives other logits.
    lora_b = params["language_model"]["model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
    assert np.abs(np.asarray(lora_b)).min() > 0
    no_lora = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path[-1].key == "lora_b" else x, params
    )
    assert np.abs(_forward_step_logits(cfg, no_lora, batch, out["tokens"]) - expected).max() > 0.1


def _forward_step_logits(cfg, params, batch, tokens):
    """The logits each generated token was drawn from, by a deterministic forward without a cache over
    prompt + tokens float[n, steps, V]: one forward over the whole sequence, whose causal mask gives
    at each position what a forward over the sequence grown up to it gives."""
    n, steps = tokens.shape
    b, p = batch.input_ids.shape
    ids = np.concatenate([batch.input_ids, np.zeros((b, steps), np.int32)], 1)
    ids[:n, p:] = tokens
    mask = np.concatenate([batch.prompt_mask, np.ones((b, steps), bool)], 1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    videos = None if batch.videos is None else jax.tree_util.tree_map(jnp.asarray, batch.videos)
    full = jax.jit(MplugOwl(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(batch.pixel_values),
                                        jnp.asarray(batch.num_images), jnp.asarray(mask), jnp.asarray(positions),
                                        videos=videos)
    return np.asarray(full)[:n, p - 1:p - 1 + steps]


def test_batch_equals_one_at_a_time_and_stops_per_sample(owl, rng):
    cfg, params = owl
    prompts, images, counts = _prompts(cfg, rng)
    steps = 8
    free = Generator(params, cfg).generate(make_batch(prompts, images, counts, cfg), Sampling(max_new_tokens=steps),
                                           return_logits=True, disable_eos=True)  # compiled by the test above
    # Make the first token of sample 1 from its third on that it has not emitted before the EOS: it
    # stops there, the others run on (unless they emit it too).
    row = free["tokens"][1].tolist()
    k = next(k for k in range(2, steps - 1) if row[k] not in row[:k])
    eos = row[k]
    gen = Generator(params, cfg, eos_id=eos)
    together = gen.generate(make_batch(prompts, images, counts, cfg), Sampling(max_new_tokens=steps))
    assert together["length"][1] == k + 1 and together["done"][1]
    assert (together["tokens"][1, k + 1:] == cfg.llm.pad_token_id).all()
    # The loop ends when the real samples are done; rows padding the batch do not hold it up.
    padded = gen.generate(make_batch([prompts[1]], images[:1], [1], cfg, min_batch=2), Sampling(max_new_tokens=steps))
    assert padded["step"] == k + 1 and padded["tokens"][0, :k + 1].tolist() == together["tokens"][1, :k + 1].tolist()
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
    from owl_jax.inference.sampling import _top_k_filter, _top_p_filter

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


@pytest.fixture(scope="module")
def on_mesh(owl):
    """The owl's params placed by their logical axes (the training rules) on data x fsdp x tensor =
    2 x 2 x 2 devices: the batch over data and fsdp (a batch of 4: one row a shard), weights over fsdp
    and tensor."""
    cfg, params = owl
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    sharded = shard_params(params, cfg, mesh, DEFAULT_RULES)
    return sharded, Generator(sharded, cfg, mesh=mesh, rules=DEFAULT_RULES)


def test_params_sharded_on_a_mesh_give_the_same_tokens_per_prompt_as_alone(owl, on_mesh, rng):
    """Greedy decoding of a batch sharded over `data` (and fsdp) with weights sharded over fsdp and
    tensor: the tokens of one device, and of each prompt decoded alone."""
    cfg, params = owl
    sharded, gen = on_mesh
    kernel = sharded["language_model"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel.sharding, jax.sharding.NamedSharding)
    # Split 4 ways (fsdp x tensor), each quarter on 2 devices (data).
    assert (
        len({s.device for s in kernel.addressable_shards}) == 8
        and kernel.addressable_shards[0].data.size * 4 == kernel.size
    )
    # The decode layout keeps the sharding: per-layer weights less the layers axis, the LM head transposed.
    layer_kernel = gen.params["language_model"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert tuple(layer_kernel.sharding.spec) == tuple(kernel.sharding.spec)[1:], (
        layer_kernel.sharding,
        kernel.sharding,
    )
    assert layer_kernel.addressable_shards[0].data.size * 4 == layer_kernel.size
    head, head_t = sharded["language_model"]["lm_head"]["kernel"], gen.params["language_model"]["lm_head"]["kernel"]
    assert head_t.shape == head.shape[::-1] and tuple(head_t.sharding.spec) == tuple(head.sharding.spec)[::-1], (
        head_t.sharding
    )

    prompts, images, counts = _prompts(cfg, rng)
    batch = make_batch(prompts, images, counts, cfg)
    assert batch.input_ids.shape[0] == 4  # one row per (data, fsdp) shard
    sampling = Sampling(max_new_tokens=8)
    got = gen.generate(batch, sampling, disable_eos=True)["tokens"]
    want = Generator(params, cfg).generate(batch, sampling, disable_eos=True)["tokens"]
    assert (got == want).all(), (got, want)
    one = Generator(params, cfg)
    for i, imgs in enumerate(_split_images(images, counts)):
        alone = one.generate(make_batch([prompts[i]], imgs, [counts[i]], cfg), sampling, disable_eos=True)["tokens"]
        assert got[i].tolist() == alone[0].tolist(), i
    assert len({tuple(row) for row in got.tolist()}) == 3  # the prompts' answers differ: a row mix-up shows


def test_sampling_on_a_mesh_draws_what_one_device_draws(owl, on_mesh, rng):
    """Temperature, top-k and top-p sampling with one seed: the same tokens on the 2 x 2 x 2 mesh as on
    one device (one random stream for the whole batch, whatever the sharding)."""
    cfg, params = owl
    _, gen = on_mesh
    prompts, images, counts = _prompts(cfg, rng)
    batch = make_batch(prompts, images, counts, cfg)
    # The settings of test_sampling_is_seeded_and_top_k_1_is_greedy: one device's program is compiled.
    sampling = Sampling(max_new_tokens=8, do_sample=True, seed=1, temperature=0.7, top_k=20, top_p=0.9)
    want = Generator(params, cfg).generate(batch, sampling, disable_eos=True)["tokens"]
    got = gen.generate(batch, sampling, disable_eos=True)["tokens"]
    assert (got == want).all(), (got, want)
    greedy = Generator(params, cfg).generate(batch, Sampling(max_new_tokens=8), disable_eos=True)["tokens"]
    assert (got != greedy).any()  # it did sample
