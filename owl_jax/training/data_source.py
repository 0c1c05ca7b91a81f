"""The training input: config.data.source picks owl_jax.data's pipeline ("tfds") or random tokens.

Every iterator yields this process's micro-batches (the pipeline's batch dict: input_ids,
attention_mask, loss_mask int32[b, T], pixel_values float32[m, H, W, 3], num_images int32[b]) and
has get_state() / set_state() for checkpoints. With clip slots (the video model), the video keys too.
"""
from __future__ import annotations

import jax
import ml_collections

from owl_jax.cli import UserError
from owl_jax.models.config import OwlConfig
from owl_jax.training.synthetic import RandomBatches


def make_data_iterator(
    config: ml_collections.ConfigDict, model_cfg: OwlConfig, process_batch: int, process_images: int
):
    d = config.data
    if d.source == "synthetic":
        return RandomBatches(
            batch_size=process_batch,
            seq_len=config.seq_len,
            max_images=process_images,
            images_per_sample=d.images_per_sample,
            vocab_size=model_cfg.llm.vocab_size,
            tokens_per_image=model_cfg.tokens_per_image,
            image_size=model_cfg.vision.image_size,
            seed=config.seed,
            process_index=jax.process_index(),
            clip_slots=(config.max_videos_per_batch // jax.process_count(), config.frames_per_video),
        )
    if d.source == "tfds":
        from owl_jax.data.pipeline import make_iterator, resolve_tokenizer_path
        from owl_jax.data.tokenizer import load_tokenizer

        if not d.dataset_dir:
            raise UserError(
                "config.data.dataset_dir is empty: build a dataset with `python -m owl_jax.data.prepare` first"
            )
        # An id past the embedding table reads a row of NaN (jnp.take's out-of-range fill), and a rerun
        # replays the same batches: refuse the pair before the first step.
        tokenizer_path = resolve_tokenizer_path(d)
        vocab = len(load_tokenizer(tokenizer_path))
        if vocab > model_cfg.llm.vocab_size:
            raise UserError(f"the tokenizer at {tokenizer_path} has {vocab} tokens, more than "
                             f"config.model.llm.vocab_size={model_cfg.llm.vocab_size}")
        return make_iterator(d, video_tags=model_cfg.video)
    raise UserError(f"config.data.source={d.source!r}: expected 'tfds' or 'synthetic'")
