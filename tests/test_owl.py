"""The whole model vs a PyTorch oracle in the released layout, fed through to-torch; round trips; dropout
in training and evaluation; adjacent image tags against the release's splicing rule."""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from owl_jax.batch import IMAGE_PLACEHOLDER_ID
from owl_jax.convert import from_torch, to_torch
from owl_jax.data.text import encode_prompt
from owl_jax.models.config import LoraConfig
from owl_jax.models.owl import MplugOwl

from conftest import CharTokenizer, random_owl_params, small_owl_config
from torch_oracle import OwlOracle


def _mixed_batch(cfg, rng):
    """Samples with 0, 1 and 2 images, right padding; images flat with one unused slot."""
    p, t = cfg.tokens_per_image, 40
    ids = rng.integers(3, cfg.llm.vocab_size, size=(3, t))
    ids[:, 0] = 1
    ids[1, 3 : 3 + p] = IMAGE_PLACEHOLDER_ID  # sample 1: one image
    ids[2, 2 : 2 + p] = IMAGE_PLACEHOLDER_ID  # sample 2: two images with text between
    ids[2, 4 + p : 4 + 2 * p] = IMAGE_PLACEHOLDER_ID
    mask = np.ones((3, t), np.int64)
    mask[0, 20:] = 0
    mask[1, 30:] = 0
    ids = np.where(mask == 1, ids, 0)
    num_images = np.array([0, 1, 2])
    pixels = rng.normal(size=(4, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return ids, mask, num_images, pixels


@pytest.fixture(scope="module")
def owl_params():
    cfg = small_owl_config()
    return cfg, random_owl_params(cfg, seed=0, perturb_seed=3)


def _max_diff_vs_oracle(cfg, params, directory, rng) -> float:
    """Exports params with to_torch, loads them into the oracle, compares logits on a mixed batch."""
    to_torch(params, cfg, str(directory))
    oracle = OwlOracle.from_pretrained(str(directory))
    ids, mask, num_images, pixels = _mixed_batch(cfg, rng)
    with torch.no_grad():
        expected = oracle(
            torch.tensor(ids), torch.tensor(pixels[:3]), torch.tensor(num_images), torch.tensor(mask)
        ).numpy()
    ours = MplugOwl(cfg).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(num_images), jnp.asarray(mask)
    )
    return float(np.abs(np.asarray(ours) - expected)[mask.astype(bool)].max())


def test_logits_match_torch_oracle(owl_params, tmp_path, rng):
    cfg, params = owl_params
    assert _max_diff_vs_oracle(cfg, params, tmp_path, rng) <= 1e-4


def test_round_trip_is_bit_exact_and_shards(owl_params, tmp_path):
    cfg, params = owl_params
    files = to_torch(params, cfg, str(tmp_path), max_shard_bytes=200_000)
    assert len(files) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
    back, report = from_torch(cfg, released=str(tmp_path))
    assert report.initialised == [] and report.unused[str(tmp_path)] == []
    flat_a, flat_b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(back)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert flat_a[k].dtype == flat_b[k].dtype and np.array_equal(flat_a[k], flat_b[k]), k


def test_lora_is_merged_on_export(tmp_path, rng):
    cfg = small_owl_config(lora=LoraConfig(rank=4, alpha=8.0))
    params = random_owl_params(cfg, seed=1, perturb_seed=4)  # lora_b non-zero
    assert _max_diff_vs_oracle(cfg, params, tmp_path, rng) <= 1e-4


def test_released_config_json_round_trips(owl_params, tmp_path):
    from owl_jax.convert.hf_config import owl_from_released

    cfg, params = owl_params
    to_torch(params, cfg, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["model_type"] == "mplug-owl" and written["num_query_tokens"] == cfg.abstractor.num_queries
    assert owl_from_released(written) == dataclasses.replace(cfg, lora=cfg.lora)


# ---------------------------------------------------------------- dropout: on in training, off in evaluation


@functools.partial(jax.jit, static_argnames=("cfg", "method", "deterministic"))
def _apply(params, rng, *args, cfg, method, deterministic):
    return MplugOwl(cfg).apply({"params": params}, *args, deterministic=deterministic, rngs={"dropout": rng},
                               method=getattr(MplugOwl, method))


def test_dropout_is_on_in_training_and_off_in_evaluation():
    """The configs' rates: the abstractor's attention dropout 0.1 (AbstractorConfig.attention_dropout,
    the release's attention_probs_dropout_prob) and LoRA's 0.05 (LoraConfig.dropout, on the LoRA
    branch's input as in PEFT). Each is tested alone: the image tokens pass no LoRA, a text-only
    sample no abstractor. With deterministic=False (training) the masks come from the `dropout`
    rng: two rngs, two outputs. With deterministic=True (evaluation, generation) the output is the
    same model's with both rates 0, whatever rng is at hand."""
    cfg = small_owl_config(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.05))
    assert cfg.abstractor.attention_dropout == 0.1
    off = dataclasses.replace(cfg, abstractor=dataclasses.replace(cfg.abstractor, attention_dropout=0.0),
                              lora=dataclasses.replace(cfg.lora, dropout=0.0))
    params = random_owl_params(cfg, seed=1, perturb_seed=4)  # lora_b non-zero: the LoRA branch counts
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.normal(size=(2, cfg.vision.image_size, cfg.vision.image_size, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(3, cfg.llm.vocab_size, size=(2, 12)), jnp.int32)
    keys = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    for method, args in (("encode_images", (pixels,)), ("__call__", (ids,))):
        run = lambda c, deterministic, key: np.asarray(_apply(params, key, *args, cfg=c, method=method,
                                                              deterministic=deterministic))
        first, second = run(cfg, False, keys[0]), run(cfg, False, keys[1])
        assert np.abs(first - second).max() > 1e-3, method  # on in training
        np.testing.assert_array_equal(
            run(cfg, True, keys[0]), run(off, False, keys[0]), err_msg=method
        )  # off in evaluation
        assert np.abs(first - run(off, False, keys[0])).max() > 1e-3, method  # and on means not off


# ---------------------------------------------------------------- adjacent image tags


def _release_splice(ids, text_table, features, num_images, generate: bool):
    """The release's splicing (mPLUG-Owl/mplug_owl/modeling_mplug_owl.py): `get_media_indices` starts an
    image where an id is negative and differs from the one before; each start takes the sample's next
    image for P positions. Placeholders are embedded as id 1 (forward) or 0 (generate); the next sample's
    images start num_images later (forward) or one per start found (generate)."""
    p = features.shape[1]
    filler = 0 if generate else 1
    rows, img_idx = [], 0
    for b in range(ids.shape[0]):
        row_ids = [int(t) for t in ids[b]]
        starts = [i for i in range(len(row_ids)) if row_ids[i] < 0 and (i == 0 or row_ids[i] != row_ids[i - 1])]
        row = text_table[np.where(ids[b] < 0, filler, ids[b])].copy()
        for i, pos in enumerate(starts):
            row[pos : pos + p] = features[img_idx + i]
        img_idx += len(starts) if generate else int(num_images[b])
        rows.append(row)
    return np.stack(rows)


def test_adjacent_image_tags_each_get_their_own_image(owl_params):
    """`<image><image>`: each tag gets its own image, in order.

    Ours (`splice_images`): every `<image>` becomes P placeholders (-1; text.py), and the j-th
    placeholder of a sample takes row j % P of the sample's image j // P. Two adjacent tags, one run of
    2P placeholders, read as the sample's first and second image, exactly as two tags with text
    between would.

    The release starts an image only where the placeholder value changes (`get_media_indices`), and
    every tag's placeholders are the same -1: the 2P run is one image. Its first P positions take the
    first image, the next P keep the embedding of the id the placeholders were replaced with (1 in
    forward, 0 in generate), and the second image is never seen. generate also counts a sample's
    images by the starts it found, so every later sample of its batch reads the image before its own.
    We differ on purpose: the text has two tags and the sample two images, so both are shown; the
    release's result there is a side effect of its run detection, not a format anyone writes for.

    The expected embeddings are built here by hand from the per-image features and the embedding
    table, not with our splicing code."""
    cfg, params = owl_params
    p = cfg.tokens_per_image
    tok = CharTokenizer()
    prompts = [
        encode_prompt("Q<image><image>AI: ", tok, image_token_count=p),
        encode_prompt("<image>x", tok, image_token_count=p),
    ]
    t = max(len(x) for x in prompts)
    ids = np.zeros((2, t), np.int32)
    for b, x in enumerate(prompts):
        ids[b, : len(x)] = x
    assert (ids[0, 2 : 2 + 2 * p] == IMAGE_PLACEHOLDER_ID).all() and (ids[1, 1 : 1 + p] == IMAGE_PLACEHOLDER_ID).all()
    num_images = np.array([2, 1], np.int32)
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(3, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    key = jax.random.PRNGKey(0)
    features = np.asarray(_apply(params, key, jnp.asarray(pixels), cfg=cfg, method="encode_images", deterministic=True))
    table = np.asarray(params["language_model"]["model"]["embed_tokens"]["embedding"])

    def ours(pix):
        return np.asarray(_apply(params, key, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(num_images), cfg=cfg,
                                 method="embed", deterministic=True))

    def by_hand(f):
        """Sample 0: BOS Q | image 0 | image 1 | "AI: "; sample 1: BOS | image 2 | x, padding."""
        text = table[np.maximum(ids, 0)]
        return np.stack([np.concatenate([text[0, :2], f[0], f[1], text[0, 2 + 2 * p :]]),
                         np.concatenate([text[1, :1], f[2], text[1, 1 + p :]])])

    embeds = ours(pixels)
    np.testing.assert_allclose(embeds, by_hand(features), rtol=0, atol=1e-6)
    # The two adjacent images swapped: their positions swap, the rest stays.
    swapped = ours(pixels[[1, 0, 2]])
    np.testing.assert_allclose(swapped, by_hand(features[[1, 0, 2]]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(swapped[0, 2 : 2 + p], embeds[0, 2 + p : 2 + 2 * p], rtol=0, atol=1e-6)
    assert np.abs(swapped[0, 2 : 2 + p] - embeds[0, 2 : 2 + p]).max() > 1e-2

    # The release's rule on the same ids: ours differs exactly at the second image's P positions.
    release = _release_splice(ids, table, features, num_images, generate=False)
    differs = np.abs(release - embeds).max(axis=-1) > 1e-5
    assert sorted(zip(*np.nonzero(differs))) == [(0, i) for i in range(2 + p, 2 + 2 * p)]
    np.testing.assert_array_equal(release[0, 2 + p : 2 + 2 * p], np.broadcast_to(table[1], (p, table.shape[1])))
    # generate's count also shifts the next sample onto sample 0's unused second image.
    release_generate = _release_splice(ids, table, features, num_images, generate=True)
    np.testing.assert_array_equal(release_generate[1, 1 : 1 + p], features[1])
