"""Shared test helpers. Every checkpoint a test needs is made here with random weights."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

from owl_jax.models.config import AbstractorConfig, LlamaConfig, OwlConfig, VisionConfig

jax.config.update("jax_default_matmul_precision", "highest")


def small_owl_config(**overrides) -> OwlConfig:
    """A few-layer owl with every feature the 7B one has (GQA off: the release has none)."""
    cfg = OwlConfig(
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, mlp_size=128),
        abstractor=AbstractorConfig(
            hidden_size=64, num_layers=2, num_heads=4, ffn_size=88, num_queries=8, encoder_hidden_size=64
        ),
        llm=LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_size=128,
                        max_position_embeddings=256),
    )
    import dataclasses

    return dataclasses.replace(cfg, **overrides)


def perturb(params, seed: int = 0, scale: float = 0.05):
    """Random offsets on every leaf, so norms, biases and zero-initialised tensors are tested too."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(x) + rng.normal(0, scale, np.shape(x)).astype(np.asarray(x).dtype) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def randomize_torch_(model, seed: int = 0, scale: float = 0.05):
    """Random values for every torch parameter (norm weights around 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            is_norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(noise + (1.0 if is_norm_weight else 0.0))
    return model


@pytest.fixture
def rng():
    return np.random.default_rng(0)
