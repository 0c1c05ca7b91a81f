"""The whole model vs a PyTorch oracle in the released layout, fed through to-torch; round trips."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from conftest import perturb, small_owl_config
from torch_oracle import OwlOracle
from owl_jax.convert import from_torch, to_torch
from owl_jax.models.config import IMAGE_PLACEHOLDER_ID, LoraConfig
from owl_jax.models.owl import MplugOwl, init_params
import flax.linen as nn


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
    params = perturb(nn.unbox(init_params(cfg, jax.random.PRNGKey(0))), seed=3)
    return cfg, params


def _max_diff_vs_oracle(cfg, params, directory, rng) -> float:
    """Exports params with to_torch, loads them into the oracle, compares logits on a mixed batch."""
    to_torch(params, cfg, str(directory))
    oracle = OwlOracle.from_pretrained(str(directory))
    ids, mask, num_images, pixels = _mixed_batch(cfg, rng)
    with torch.no_grad():
        expected = oracle(torch.tensor(ids), torch.tensor(pixels[:3]), torch.tensor(num_images), torch.tensor(mask)).numpy()
    ours = MplugOwl(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(num_images), jnp.asarray(mask))
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
    params = perturb(nn.unbox(init_params(cfg, jax.random.PRNGKey(1))), seed=4)  # lora_b non-zero
    assert _max_diff_vs_oracle(cfg, params, tmp_path, rng) <= 1e-4


def test_released_config_json_round_trips(owl_params, tmp_path):
    from owl_jax.convert.hf_config import owl_from_released

    cfg, params = owl_params
    to_torch(params, cfg, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["model_type"] == "mplug-owl" and written["num_query_tokens"] == cfg.abstractor.num_queries
    assert owl_from_released(written) == dataclasses.replace(cfg, lora=cfg.lora)
