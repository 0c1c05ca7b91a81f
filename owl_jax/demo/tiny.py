"""A few-million-parameter owl that trains in minutes on 2 CPU cores (ShapesWorld, the main job).

Same architecture as the released model, small widths: ViT 4 x 128 on 112 x 112 images (patch 14,
65 patches), abstractor 2 x 128 with 16 queries (17 tokens per image), LLaMA 4 x 256 (8 heads of 32),
vocab 1024.
`--config=configs/tiny.py:stage2_lora` (or owl_jax/demo/tiny.py) picks the stage (default stage1).
"""
import ml_collections

from owl_jax.configs import base_config
from owl_jax.models.config import AbstractorConfig, LlamaConfig, LoraConfig, OwlConfig, VisionConfig


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
    model = OwlConfig(
        # Trained from scratch, the narrow towers need two init changes for the image to reach the
        # abstractor's output (owl_jax/demo/vision_probe.py, docs/notes/research_log.md "Initialisation"):
        # the patches' positions as a 2-D sine-cosine code, and abstractor weights of std
        # 1/sqrt(128) instead of 0.02 (with 0.02 its image branch is ~5% of the residual of
        # normalised queries it adds to).
        vision=VisionConfig(image_size=112, patch_size=14, hidden_size=128, num_layers=4, num_heads=4, mlp_size=512,
                            position_embedding_init="sincos2d"),
        abstractor=AbstractorConfig(
            hidden_size=128, num_layers=2, num_heads=4, ffn_size=352, num_queries=16, encoder_hidden_size=128,
            initializer_range=0.088,
        ),
        # 8 heads of 32 rather than 4 of 64: same FLOPs, and the tiny LLM learns to read its context
        # sooner (docs/notes/research_log.md, "Heads": shape from a told scene 17-34% -> 51-69% in
        # 1000 steps).
        llm=LlamaConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, mlp_size=688,
                        max_position_embeddings=1024),
        lora=LoraConfig(rank=8, alpha=32.0, dropout=0.05) if stage == "stage2_lora" else LoraConfig(),
        # 2-4 layers a tower, run on CPU: the layers unrolled over their stacked params are faster
        # than the scan, and compile time hardly grows at this depth (the 7B recipes keep the scan).
        scan_unroll=0,
        # The LLM's causal attention in query blocks of <= 128 rows (no work on the masked triangle).
        causal_query_block=128,
    )
    config = base_config(model)
    config.stage = stage
    config.num_steps = 200
    config.batch_size = 8
    config.seq_len = 128
    config.max_images_per_batch = 16
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.01
    config.checkpoint.every_steps = 100
    return config
