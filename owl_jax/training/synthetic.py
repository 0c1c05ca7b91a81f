"""Random-token batches in the pipeline's batch format, for tests, benchmarks and AOT compiles.

Each sample: BOS, 0..max images (placeholder runs), random text, an "answer" suffix that carries the
loss, right padding. Deterministic in (seed, step, process), so its state is just the step. With clip slots (the video
model's batches) the clip keys are there, and empty: random batches hold images only.
"""
from __future__ import annotations

import numpy as np

from owl_jax.batch import IMAGE_PLACEHOLDER_ID, first_image_slots


class RandomBatches:
    def __init__(self, *, batch_size: int, seq_len: int, max_images: int, images_per_sample: int, vocab_size: int,
                 tokens_per_image: int, image_size: int, seed: int = 0, process_index: int = 0,
                 clip_slots: tuple[int, int] = (0, 0)):
        if images_per_sample * batch_size > max_images:
            raise ValueError(
                f"images_per_sample * batch_size = {images_per_sample * batch_size} > max_images={max_images}"
            )
        if images_per_sample * (tokens_per_image + 1) + 8 > seq_len:
            raise ValueError(f"seq_len={seq_len} too short for {images_per_sample} images of {tokens_per_image} tokens")
        self.__dict__.update(batch_size=batch_size, seq_len=seq_len, max_images=max_images,
                             images_per_sample=images_per_sample, vocab_size=vocab_size,
                             tokens_per_image=tokens_per_image, image_size=image_size, seed=seed,
                             process_index=process_index, clip_slots=clip_slots)
        self.step = 0

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step, self.process_index])
        self.step += 1
        b, t, p = self.batch_size, self.seq_len, self.tokens_per_image
        ids = rng.integers(3, self.vocab_size, size=(b, t)).astype(np.int32)
        loss_mask = np.zeros((b, t), np.int32)
        attention = np.zeros((b, t), np.int32)
        num_images = np.full((b,), self.images_per_sample, np.int32)
        for i in range(b):
            length = int(rng.integers(t // 2, t + 1))
            ids[i, 0] = 1
            pos = 1
            for _ in range(self.images_per_sample):
                ids[i, pos : pos + p] = IMAGE_PLACEHOLDER_ID
                pos += p + 1
            answer_start = int(rng.integers(pos, max(pos + 1, length - 1)))
            ids[i, length - 1] = 2  # EOS closes the answer
            loss_mask[i, answer_start:length] = 1
            attention[i, :length] = 1
            ids[i, length:] = 0
        pixels = np.zeros((self.max_images, self.image_size, self.image_size, 3), np.float32)
        used = int(num_images.sum())
        pixels[:used] = rng.normal(size=(used, self.image_size, self.image_size, 3))
        batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "pixel_values": pixels,
                 "num_images": num_images, "image_start": first_image_slots(num_images)}
        v, f = self.clip_slots
        if v:
            s = self.image_size
            batch |= {"video_pixels": np.zeros((v, f, s, s, 3), np.float32),
                      "video_num_frames": np.zeros((v,), np.int32), "num_videos": np.zeros((b,), np.int32),
                      "video_start": np.zeros((b,), np.int32)}
        return batch
