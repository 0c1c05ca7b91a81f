"""LLaMA decoder vs transformers' LlamaForCausalLM, through the converter."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from owl_jax.convert import from_torch
from owl_jax.models.llama import LlamaForCausalLM, from_decode_layout, to_decode_layout

from conftest import randomize_torch_, small_owl_config


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def hf_llama(request, tmp_path_factory):
    kv_heads = request.param
    hf_cfg = HFLlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = randomize_torch_(HFLlama(hf_cfg), seed=kv_heads).eval()
    path = tmp_path_factory.mktemp(f"llama{kv_heads}")
    model.save_pretrained(path)
    owl_cfg = small_owl_config()
    owl_cfg = dataclasses.replace(owl_cfg, llm=dataclasses.replace(owl_cfg.llm, num_kv_heads=kv_heads))
    params, report = from_torch(owl_cfg, llama=str(path))
    assert report.unused[str(path)] == []
    assert all(not p.startswith("language_model") for p in report.initialised)
    return model, owl_cfg, params["language_model"]


def _batch(rng, b=3, t=12):
    ids = rng.integers(3, 128, size=(b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


def test_logits_match_transformers(hf_llama, rng):
    model, cfg, params = hf_llama
    ids, mask = _batch(rng)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = LlamaForCausalLM(cfg.llm).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(ours) - expected)[valid].max()
    assert diff <= 1e-4, diff


def test_decode_layout_matches_training_layout_and_round_trips(hf_llama, rng):
    """Layers unrolled + LM head [V, D] (the decode layout): same logits, exact conversion both ways."""
    model, cfg, params = hf_llama
    decode_params = to_decode_layout(params)
    decoder = LlamaForCausalLM(cfg.llm, scan_layers=False, lm_head_vocab_major=True)
    # The layout the decode-layout model itself creates.
    ids, mask = _batch(rng)
    created = jax.eval_shape(lambda: nn.unbox(decoder.init(jax.random.PRNGKey(0), ids)))
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(created["params"]) == shapes(decode_params)
    assert sorted(decode_params["model"]) == ["embed_tokens", "layers_0", "layers_1", "norm"]
    # Round trip: same tree, bit for bit.
    back = from_decode_layout(decode_params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    # Same logits.
    trained = LlamaForCausalLM(cfg.llm).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask, bool)
    )
    ours = decoder.apply({"params": decode_params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    assert np.abs(np.asarray(ours) - np.asarray(trained))[valid].max() <= 1e-5


@pytest.mark.parametrize("decode_layout", [False, True], ids=["training_layout", "decode_layout"])
def test_kv_cache_decoding_matches_full_forward_and_transformers(hf_llama, rng, decode_layout):
    """Left-padded prompts, prefill then one token a step; every step's logits equal a full forward."""
    model, cfg, params = hf_llama
    decode_params = to_decode_layout(params) if decode_layout else params
    b, prompt, steps, cache = 2, 6, 5, 16
    total = prompt + steps
    ids = rng.integers(3, 128, size=(b, total))
    mask = np.ones((b, total), np.int64)
    mask[1, :2] = 0  # sample 1 is left-padded by two
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        expected = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()

    decoder = LlamaForCausalLM(cfg.llm, decode=True, scan_layers=not decode_layout, lm_head_vocab_major=decode_layout)
    cache_vars = decoder.init(
        jax.random.PRNGKey(0), jnp.zeros((b, cache), jnp.int32), attention_mask=jnp.ones((b, cache), bool)
    )["cache"]
    cache_mask = np.zeros((b, cache), bool)
    cache_mask[:, :total] = mask.astype(bool)
    got = []
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]:
        logits, mutated = decoder.apply(
            {"params": decode_params, "cache": cache_vars},
            jnp.asarray(ids[:, start:stop]),
            positions=jnp.asarray(positions[:, start:stop]),
            attention_mask=jnp.asarray(cache_mask),
            mutable=["cache"],
        )
        cache_vars = mutated["cache"]
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    full = LlamaForCausalLM(cfg.llm).apply(
        {"params": params}, jnp.asarray(ids), positions=jnp.asarray(positions), attention_mask=jnp.asarray(mask, bool)
    )
    valid = mask.astype(bool)
    assert np.abs(got - np.asarray(full))[valid].max() <= 1e-4
    assert np.abs(got - expected)[valid].max() <= 1e-4
