"""A few-million-parameter owl that trains in minutes on 2 CPU cores (ShapesWorld, the main job).

Same architecture as the released model, small widths: ViT 4 x 128 on 112 x 112 images (patch 14,
65 tokens), abstractor 2 x 128 with 16 queries (17 tokens per image), LLaMA 4 x 256, vocab 1024.
"""
import ml_collections

from owl_jax.configs import model_section
from owl_jax.models.config import AbstractorConfig, LlamaConfig, OwlConfig, VisionConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_section(
        OwlConfig(
            vision=VisionConfig(image_size=112, patch_size=14, hidden_size=128, num_layers=4, num_heads=4, mlp_size=512),
            abstractor=AbstractorConfig(
                hidden_size=128, num_layers=2, num_heads=4, ffn_size=352, num_queries=16, encoder_hidden_size=128
            ),
            llm=LlamaConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_size=688,
                            max_position_embeddings=1024),
        )
    )
    return config
