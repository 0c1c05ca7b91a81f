"""Fresh weights: each tower's initializer_range, the ViT's sine-cosine position embedding, and the
LLM's mimetic q/k."""
import dataclasses

import numpy as np
import pytest
from flax import traverse_util

from conftest import random_owl_params, small_owl_config
from owl_jax.models.config import LlamaConfig, VisionConfig
from owl_jax.models.vision import sincos2d_position_code

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


def _mimetic(**llm) -> tuple[dict, LlamaConfig]:
    cfg = small_owl_config()
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, attention_init="mimetic", **llm))
    return random_owl_params(cfg), cfg.llm


def _qk_heads(params, llm: LlamaConfig):
    """Per layer, the q and k kernels split by head: float[L, H, D, Dh] and float[L, K, D, Dh]."""
    attn = params["language_model"]["model"]["layers"]["self_attn"]
    q, k = (np.asarray(attn[n]["kernel"]) for n in ("q_proj", "k_proj"))
    layers, d, dh = q.shape[0], llm.hidden_size, llm.head_dim
    return (q.reshape(layers, d, llm.num_heads, dh).transpose(0, 2, 1, 3),
            k.reshape(layers, d, llm.num_kv_heads, dh).transpose(0, 2, 1, 3))


def test_mimetic_qk_matches_tokens_with_themselves():
    params, llm = _mimetic()
    q, k = _qk_heads(params, llm)
    x = np.random.default_rng(0).normal(size=(512, llm.hidden_size))  # RMS 1, as after the input norm
    for layer in range(q.shape[0]):
        for h in range(llm.num_heads):
            qh, kh = x @ q[layer, h], x @ k[layer, h]  # [N, Dh]
            scores = qh @ kh.T / np.sqrt(llm.head_dim)
            self_score, cross = np.diag(scores).mean(), scores[~np.eye(len(x), dtype=bool)]
            # Defaults at D = 64, Dh = 16: ~2.4 for itself, 0 +- 0.8 for others (normal(0.02): ~0 for both).
            assert self_score > 1.5 and abs(cross.mean()) < 0.1, (layer, h, self_score, cross.mean())
    # q and k are the two halves of one SVD: equal column norms (sqrt of the singular values).
    np.testing.assert_allclose(np.linalg.norm(q, axis=2), np.linalg.norm(k, axis=2), rtol=1e-4)
    # Every (layer, head) draws its own noise; v, o and the MLP keep normal(initializer_range).
    flat = q.reshape(-1, *q.shape[2:])
    assert all(np.abs(flat[0] - f).max() > 1e-3 for f in flat[1:])
    assert abs(float(np.std(params["language_model"]["model"]["layers"]["self_attn"]["v_proj"]["kernel"])) - 0.02) < 0.004


def test_mimetic_identity_alone_makes_q_equal_k():
    params, llm = _mimetic(mimetic_noise=0.0, mimetic_identity=1.0)
    q, k = _qk_heads(params, llm)
    np.testing.assert_allclose(q, k, atol=1e-5)
    gram = np.einsum("lhdi,lhdj->lhij", q, q)  # orthonormal columns: W_q W_k^T is a projection
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(llm.head_dim), gram.shape), atol=1e-5)


def test_mimetic_with_grouped_kv_heads():
    params, llm = _mimetic(num_heads=4, num_kv_heads=2)
    q, k = _qk_heads(params, llm)
    assert q.shape[1] == 4 and k.shape[1] == 2
    np.testing.assert_array_equal(q[:, 0], q[:, 1])  # the query heads of a group share its key head's factors
    assert np.abs(q[:, 0] - q[:, 2]).max() > 1e-3


def test_default_attention_init_is_normal_and_bad_values_name_the_field():
    assert LlamaConfig().attention_init == "normal"
    with pytest.raises(ValueError, match="llm.attention_init='identity'"):
        LlamaConfig(attention_init="identity")
