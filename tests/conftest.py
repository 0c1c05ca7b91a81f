"""Shared test helpers. Every checkpoint a test needs is made here with random weights."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT tests compile for TPU in several processes
# A compile cache shared by the test processes (xdist workers, subprocess tests): many tests compile
# the same tiny programs, and a hit takes ~1 s where a compile takes ~15.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "owl_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Eight fake CPU devices for the sharding tests; everything else runs on device 0 as usual.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

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


# configs/tiny.py shrunk for tests: the same code paths, seconds per compile. One table, used both
# in-process (tiny_train_config) and on command lines (TINY_TRAIN_FLAGS).
TINY_OVERRIDES = {
    "model.vision.image_size": 28, "model.vision.hidden_size": 32, "model.vision.num_layers": 2,
    "model.vision.num_heads": 2, "model.vision.mlp_size": 64,
    "model.abstractor.hidden_size": 32, "model.abstractor.num_layers": 1, "model.abstractor.num_heads": 2,
    "model.abstractor.ffn_size": 48, "model.abstractor.num_queries": 4, "model.abstractor.encoder_hidden_size": 32,
    "model.llm.vocab_size": 64, "model.llm.hidden_size": 32, "model.llm.num_layers": 2, "model.llm.num_heads": 4,
    "model.llm.num_kv_heads": 2, "model.llm.mlp_size": 64,
    "batch_size": 8, "seq_len": 24, "max_images_per_batch": 8, "log_every_steps": 1, "optim.warmup_steps": 1,
}
TINY_TRAIN_FLAGS = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]


def tiny_train_config(stage: str = "stage1", **overrides):
    """The tiny config with TINY_OVERRIDES, 4 steps, synchronous checkpoints every 2, then
    `overrides` ("a.b": value)."""
    from owl_jax.configs import load_config_file

    config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", f"tiny.py:{stage}"))
    defaults = {"num_steps": 4, "checkpoint.every_steps": 2, "checkpoint.async_save": False}
    for key, value in {**TINY_OVERRIDES, **defaults, **overrides}.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


@pytest.fixture
def rng():
    return np.random.default_rng(0)
