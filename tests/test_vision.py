"""Vision encoder vs transformers' CLIPVisionModel, through the CLIP -> released-layout converter."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from owl_jax.convert import from_torch
from owl_jax.convert.layouts import interleave_qkv
from owl_jax.models.vision import VisionEncoder

from conftest import randomize_torch_, small_owl_config


def test_vision_encoder_matches_clip(tmp_path, rng):
    clip_cfg = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
        patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu", attn_implementation="eager",
    )
    clip = randomize_torch_(CLIPVisionModel(clip_cfg), seed=1).eval()
    clip.save_pretrained(tmp_path)
    cfg = small_owl_config()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layer_norm_eps=1e-5))
    params, report = from_torch(cfg, clip=str(tmp_path))
    assert report.unused[str(tmp_path)] == []
    assert any(p.startswith("abstractor") for p in report.initialised) and "query_tokens" in report.initialised
    assert not any(p.startswith("vision_model") for p in report.initialised)

    pixels = rng.normal(size=(3, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        hidden = clip(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).last_hidden_state
        # CLIP applies post_layernorm to the pooled token only; the released encoder to every token.
        expected = clip.post_layernorm(hidden).numpy()
    ours = VisionEncoder(cfg.vision).apply({"params": params["vision_model"]}, jnp.asarray(pixels))
    assert ours.shape == (3, 17, 64)
    assert np.abs(np.asarray(ours) - expected).max() <= 1e-4


def test_qkv_interleave_is_per_head():
    heads, hd, din = 2, 3, 4
    q, k, v = (np.full((heads * hd, din), c, np.float32) for c in (0, 1, 2))
    q[hd:] += 10  # second head
    fused = interleave_qkv(q, k, v, heads)
    # Rows ordered (head, {q,k,v}, head_dim): head 0 q, k, v, then head 1 q, k, v.
    assert fused[:, 0].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [10] * 3 + [1] * 3 + [2] * 3
