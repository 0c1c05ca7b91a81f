"""Fresh weights: each tower's initializer_range and the ViT's sine-cosine position embedding."""
import dataclasses

import numpy as np
import pytest
from flax import traverse_util

from owl_jax.models.config import VisionConfig
from owl_jax.models.vision import sincos2d_position_code

from conftest import random_owl_params, small_owl_config

TOWERS = {"vision_model": "vision", "abstractor": "abstractor", "language_model": "llm"}


def _kernel_stds(params) -> dict[str, list[float]]:
    """Per tower, the std of every matmul kernel and embedding table."""
    stds = {tower: [] for tower in TOWERS}
    for path, x in traverse_util.flatten_dict(params).items():
        if path[-1] in ("kernel", "embedding") and path[0] in TOWERS:
            stds[path[0]].append(float(np.std(np.asarray(x))))
    return stds


def test_default_initializer_range_is_the_released_models():
    stds = _kernel_stds(random_owl_params(small_owl_config()))
    for tower, values in stds.items():
        assert values and all(abs(s - 0.02) < 0.004 for s in values), (tower, values)


def test_initializer_range_applies_per_tower():
    ranges = {"vision": 0.05, "abstractor": 0.2, "llm": 0.01}
    cfg = small_owl_config()
    cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), initializer_range=r)
                                      for name, r in ranges.items()})
    params = random_owl_params(cfg)
    for tower, values in _kernel_stds(params).items():
        want = ranges[TOWERS[tower]]
        assert values and all(abs(s - want) < 0.2 * want for s in values), (tower, want, values)
    # The query tokens belong to the abstractor (truncated normal: std ~0.88 of the range).
    assert 0.6 * 0.2 < float(np.std(params["query_tokens"])) < 0.2


def test_sincos2d_position_embedding():
    cfg = small_owl_config()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, position_embedding_init="sincos2d"))
    pos = np.asarray(random_owl_params(cfg)["vision_model"]["embeddings"]["position_embedding"])
    grid, width = cfg.vision.image_size // cfg.vision.patch_size, cfg.vision.hidden_size
    assert pos.shape == (1, grid * grid + 1, width)
    np.testing.assert_array_equal(pos[0, 0], 0.0)  # the class token has no place on the grid
    code = sincos2d_position_code(grid, width)
    np.testing.assert_allclose(pos[0, 1:], code, atol=1e-7)
    # Row-major patches: moving one patch right changes the x half only, one patch down the y half only.
    half = width // 2
    np.testing.assert_array_equal(code[0, half:], code[1, half:])
    np.testing.assert_array_equal(code[0, :half], code[grid, :half])
    assert np.abs(code[0, :half] - code[1, :half]).max() > 0.1
    assert np.abs(code[0, half:] - code[grid, half:]).max() > 0.1
    assert len({tuple(np.round(r, 5)) for r in code}) == grid * grid  # every patch has its own code


def test_bad_position_embedding_init_names_the_field():
    with pytest.raises(ValueError, match="vision.position_embedding_init='learned'"):
        VisionConfig(position_embedding_init="learned")
    with pytest.raises(ValueError, match="hidden_size % 4"):
        VisionConfig(hidden_size=66, position_embedding_init="sincos2d")
