"""The training batch: one format from the input pipeline to the loss.

Every producer (the grain pipeline in owl_jax/data, the random batches in
owl_jax/training/synthetic.py) yields this process's micro-batches as dicts of numpy arrays with
fixed shapes. B = batch_size // process_count rows, T = seq_len, M = max_images_per_batch //
process_count image slots, S = image_size:

===============  ==================  =========================================================
input_ids        int32[B, T]         BOS, text ids, IMAGE_PLACEHOLDER_ID x tokens_per_image per
                                     image, EOS after each answer, PAD (right padding)
attention_mask   int32[B, T]         the sample each token belongs to in its row: 1 on every real
                                     token (placeholders included) of an unpacked row, 1, 2, ... in
                                     a packed one (data.packing); 0 on padding. A token attends to
                                     the earlier tokens of its own sample, and its RoPE position
                                     counts from its sample's first token
loss_mask        int32[B, T]         1 where the token is part of an answer (its EOS included)
pixel_values     float32[M, S, S, 3] the images in sample order, CLIP-normalised, unused slots 0
num_images       int32[B]            images per row (sum <= M)
image_start      int32[B]            each row's first image slot among this process's M (a row's
                                     images follow its samples' order)
===============  ==================  =========================================================

The video model's batches (max_videos_per_batch > 0) add its clips, with V = max_videos_per_batch //
process_count clip slots of F = frames_per_video frames, laid out as the images are:

================  =====================  ======================================================
video_pixels      float32[V, F, S, S, 3] the clips in sample order, CLIP-normalised; a clip of f < F
                                         frames fills the first f, unused frames and slots 0
video_num_frames  int32[V]               frames of each clip slot (0 for an unused slot)
num_videos        int32[B]               clips per row (sum <= V)
video_start       int32[B]               each row's first clip slot among this process's V
================  =====================  ======================================================

Their placeholders in input_ids are VIDEO_PLACEHOLDER_ID, tokens_per_image per clip.

The trainer stacks `grad_accum_steps` micro-batches on a leading axis ([K, ...]) and makes global
arrays, the batch axis split across processes; `image_start` (`video_start`) then moves by the global
index of the process's first image (clip) slot (training/trainer.py: global_batch).
"""
from __future__ import annotations

import numpy as np

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 0  # the LLaMA tokenizer's, which the release uses
IMAGE_PLACEHOLDER_ID = -1  # the release marks every image-token slot in input_ids with -1
VIDEO_PLACEHOLDER_ID = -2  # and every video-token slot with -2 (its video model)

KEYS = ("input_ids", "attention_mask", "loss_mask", "pixel_values", "num_images", "image_start")
VIDEO_KEYS = ("video_pixels", "video_num_frames", "num_videos", "video_start")
# The keys whose leading axis is slots (images or clips), not rows: sharded, and offset across processes, as such.
SLOT_KEYS = ("pixel_values", "video_pixels", "video_num_frames")
DTYPES = {"input_ids": np.int32, "attention_mask": np.int32, "loss_mask": np.int32, "pixel_values": np.float32,
          "num_images": np.int32, "image_start": np.int32, "video_pixels": np.float32, "video_num_frames": np.int32,
          "num_videos": np.int32, "video_start": np.int32}


def shapes(batch_size: int, seq_len: int, max_images: int, image_size: int, max_videos: int = 0,
           frames_per_video: int = 0) -> dict[str, tuple[int, ...]]:
    """Each key's shape for B rows, T tokens, M image slots of S x S pixels (and V clip slots of F
    frames: the video keys only when V > 0)."""
    b, t, m, s = batch_size, seq_len, max_images, image_size
    out = {"input_ids": (b, t), "attention_mask": (b, t), "loss_mask": (b, t), "pixel_values": (m, s, s, 3),
           "num_images": (b,), "image_start": (b,)}
    if max_videos:
        out |= {"video_pixels": (max_videos, frames_per_video, s, s, 3), "video_num_frames": (max_videos,),
                "num_videos": (b,), "video_start": (b,)}
    return out


def step_shapes(config, image_size: int) -> dict[str, tuple[int, ...]]:
    """The global [K, ...] shapes of one training step's batch for a training config."""
    one = shapes(config.batch_size, config.seq_len, config.max_images_per_batch, image_size,
                 config.max_videos_per_batch, config.frames_per_video)
    return {k: (config.optim.grad_accum_steps, *shape) for k, shape in one.items()}


def first_image_slots(num_images: np.ndarray) -> np.ndarray:
    """int32[B] image_start of samples whose images are packed in order: the exclusive cumsum."""
    num_images = np.asarray(num_images, np.int32)
    return (np.cumsum(num_images, axis=-1) - num_images).astype(np.int32)
