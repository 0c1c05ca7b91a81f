"""mPLUG-Owl with LLaMA-7B: the released shapes (7,123,068,928 parameters) and the paper's
two recipes. `--config=configs/mplug_owl_llama7b.py:stage1` (default) or `:stage2_lora`
or `:full_ft`.

ViT-L/14 24 x 1024 (LN eps 1e-6), abstractor 6 x 1024 with FFN 2816 and 64 queries, LLaMA-7B.
"""
import ml_collections

from owl_jax.configs import base_config
from owl_jax.models.config import LlamaConfig, LoraConfig, OwlConfig


def recipe(stage: str, llm: LlamaConfig = LlamaConfig()) -> ml_collections.ConfigDict:
    lora = LoraConfig(rank=8, alpha=32.0, dropout=0.05) if stage == "stage2_lora" else LoraConfig()
    # attention "auto": cuDNN on GPU (1.5x the stage-2 step on an H100), splash on TPU, einsums on CPU
    config = base_config(
        OwlConfig(llm=llm, lora=lora, dtype="bfloat16", remat_policy="dots_no_batch", attention_impl="auto")
    )
    config.stage = stage
    config.frozen_dtype = "bfloat16"
    # The AOT memory/FLOP figures of BENCHMARKS.md were measured with the head on every token; the
    # answer-rows head gathers rows across the batch-sharded devices: not yet measured at 7B.
    config.lm_head_rows = "all"
    o = config.optim
    if stage == "stage1":
        # 50k steps x ~4096 pairs; AdamW (0.9, 0.98) eps 1e-6, lr 1e-4, wd 0.1, warmup 2k. A pair (65
        # image tokens, the template and a web caption) is ~120 tokens: packed, a 512-token row holds
        # about four, so 4 micro-batches of 256 rows and 1024 images carry the paper's 4096 pairs a
        # step in a quarter of the padded rows (fits v5e-256 and v5p-128, see BENCHMARKS.md).
        config.num_steps, config.batch_size, config.seq_len, config.max_images_per_batch = 50_000, 256, 512, 1024
        config.data.packing = True
        o.grad_accum_steps = 4
        o.update(lr=1e-4, end_lr=0.0, warmup_steps=2000, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, clip_norm=1.0)
        config.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    else:
        # 2k steps x 256 (128 text + 128 image); AdamW (0.9, 0.999) eps 1e-6, lr 2e-5 -> 1e-6, wd 1e-4,
        # warmup 50, clip 1.0, bf16, max len 2048 (release; paper 1024). Half the samples carry an image.
        # Packed, a 2048-token row holds ~4 of the mix's conversations (~440 tokens on average): 4
        # micro-batches of 16 rows carry ~280 samples a step, with 40 image slots each (~35 used; 32
        # slots would leave the rows 84% full instead of 94%). Full remat: fits v4-8 and v5e-16
        # (BENCHMARKS.md).
        config.num_steps, config.batch_size, config.seq_len, config.max_images_per_batch = 2000, 16, 2048, 40
        config.data.packing = True
        o.grad_accum_steps = 4
        config.model.remat_policy = "full"
        o.update(lr=2e-5, end_lr=1e-6, warmup_steps=50, b1=0.9, b2=0.999, eps=1e-6, weight_decay=1e-4, clip_norm=1.0)
        config.train_abstractor = True  # paper; the release froze it (set False to match the release)
        if stage == "full_ft":
            o.lr = 1e-5
    config.checkpoint.every_steps = 1000
    config.log_every_steps = 10
    return config


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
    return recipe(stage)
