"""Batching: encoded samples (owl_jax.data.pipeline.encode_sample) into the fixed-shape batches of
owl_jax/batch.py, one sample a row or several packed into a row (pipeline.py's docstring tells the
rules); a grain iterator that resumes exactly."""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from owl_jax.batch import BOS_ID, first_image_slots
from owl_jax.cli import UserError

# New counters go at the end: a saved iterator state holds them in this order.
STAT_NAMES = ("samples", "truncated", "no_loss_tokens", "images_truncated", "deferred", "dropped_too_many_images",
              "filler_rows", "tokens", "dropped_too_many_videos", "videos_truncated", "dropped_long_clips",
              "dropped_missing_media")
STATS = "_stats"  # the counters a sample or batch carries to OwlDataIterator
INDEX = "_index"  # the record index a sample or batch carries
SKIP = "_skip"  # on a sample that cannot be trained on: the counter saying why (encode_sample)
# Skipped samples in a row after which the batcher gives up: with data that repeats forever, a config
# that fits none of it would otherwise read on without end.
MAX_SKIPPED_IN_A_ROW = 10_000


def _no_clips(f: int, s: int) -> dict:
    return {"videos": np.zeros((0, f, s, s, 3), np.float32), "video_num_frames": np.zeros((0,), np.int32),
            "num_videos": 0}


def _filler_row(max_len: int, s: int, f: int) -> dict:
    ids = np.zeros((max_len,), np.int32)
    ids[0] = BOS_ID
    att = np.zeros((max_len,), np.int32)
    att[0] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": np.zeros((max_len,), np.int32),
            "images": np.zeros((0, s, s, 3), np.float32), "num_images": 0, **_no_clips(f, s)}


def pack_row(samples: Sequence[dict], max_len: int, image_size: int, frames_per_video: int = 0) -> dict:
    """Encoded samples (padded to max_len, lengths summing to <= max_len) as one row: their tokens in
    order, attention_mask 1, 2, ... by sample, their images (and clips) in order, the per-token record
    index."""
    ids, seg, loss, index = (np.zeros((max_len,), np.int32) for _ in range(4))
    index[:] = -1
    stats, pos = np.zeros(len(STAT_NAMES), np.int64), 0
    for i, sample in enumerate(samples):
        n = int(np.count_nonzero(sample["attention_mask"]))
        if pos + n > max_len:
            raise ValueError(f"samples of {pos + n} tokens > max_len {max_len}")
        ids[pos:pos + n], loss[pos:pos + n] = sample["input_ids"][:n], sample["loss_mask"][:n]
        seg[pos:pos + n], index[pos:pos + n] = i + 1, int(sample.get(INDEX, -1))
        pos += n
        stats += sample.get(STATS, 0)
    images = [x for sample in samples for x in sample["images"]]
    pixels = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.float32)
    clips = _no_clips(frames_per_video, image_size)
    if any(sample.get("num_videos", 0) for sample in samples):
        clips = {"videos": np.concatenate([sample["videos"] for sample in samples if sample["num_videos"]]),
                 "video_num_frames": np.concatenate([sample["video_num_frames"] for sample in samples
                                                     if sample["num_videos"]]),
                 "num_videos": sum(int(sample["num_videos"]) for sample in samples)}
    return {"input_ids": ids, "attention_mask": seg, "loss_mask": loss, "images": pixels, "num_images": len(images),
            STATS: stats, INDEX: index, **clips}


def make_batch(samples: Sequence[dict], batch_size: int, max_images: int, max_len: int, image_size: int,
               extra_stats: np.ndarray | None = None, packed: bool = False, max_videos: int = 0,
               frames_per_video: int = 0) -> dict[str, np.ndarray]:
    """Stacks <= batch_size encoded samples, or rows of them (`pack_row`, with `packed`), whose images
    sum to <= max_images (and clips to <= max_videos) into one fixed-shape batch; the clip keys only
    with max_videos > 0.

    Missing rows are filled with inert rows (counted in the stats as filler_rows).
    """
    if len(samples) > batch_size:
        raise ValueError(f"{len(samples)} samples > batch_size {batch_size}")
    s = image_size
    stats = np.zeros(len(STAT_NAMES), np.int64) if extra_stats is None else extra_stats.astype(np.int64).copy()
    rows = list(samples)
    n_fill = batch_size - len(rows)
    rows += [_filler_row(max_len, s, frames_per_video) for _ in range(n_fill)]
    stats[STAT_NAMES.index("filler_rows")] += n_fill
    pixel_values = np.zeros((max_images, s, s, 3), np.float32)
    slot = 0
    for r in rows:
        k = int(r["num_images"])
        if slot + k > max_images:
            raise ValueError("images exceed max_images")
        if k:
            pixel_values[slot:slot + k] = r["images"]
        slot += k
        if STATS in r:
            stats += r[STATS]
    batch = {
        "input_ids": np.stack([r["input_ids"] for r in rows]).astype(np.int32),
        "attention_mask": np.stack([r["attention_mask"] for r in rows]).astype(np.int32),
        "loss_mask": np.stack([r["loss_mask"] for r in rows]).astype(np.int32),
        "pixel_values": pixel_values,
        "num_images": np.asarray([int(r["num_images"]) for r in rows], np.int32),
        STATS: stats,
        # int32[B], or int32[B, T] for packed rows (a record index per token)
        INDEX: np.stack([np.broadcast_to(np.asarray(r.get(INDEX, -1), np.int32), (max_len,) if packed else ())
                          for r in rows]),
    }
    batch["image_start"] = first_image_slots(batch["num_images"])
    if max_videos:
        batch |= _clip_slots(rows, max_videos, frames_per_video, s)
    return batch


def _clip_slots(rows: Sequence[dict], max_videos: int, frames_per_video: int, s: int) -> dict[str, np.ndarray]:
    """The rows' clips in order in max_videos slots (owl_jax/batch.py's video keys)."""
    pixels = np.zeros((max_videos, frames_per_video, s, s, 3), np.float32)
    frames = np.zeros((max_videos,), np.int32)
    num_videos = np.asarray([int(r.get("num_videos", 0)) for r in rows], np.int32)
    if num_videos.sum() > max_videos:
        raise ValueError("clips exceed max_videos")
    slot = 0
    for r, k in zip(rows, num_videos):
        if k:
            pixels[slot:slot + k], frames[slot:slot + k] = r["videos"], r["video_num_frames"]
        slot += k
    return {"video_pixels": pixels, "video_num_frames": frames, "num_videos": num_videos,
            "video_start": first_image_slots(num_videos)}


class BatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, max_images: int, max_len: int, image_size: int,
                 packing: bool = False, max_videos: int = 0, frames_per_video: int = 0):
        super().__init__(parent)
        self._args = (batch_size, max_images, max_len, image_size, packing, max_videos, frames_per_video)

    def __iter__(self):
        return BatchIterator(self._parent.__iter__(), *self._args)

    def __str__(self):
        return f"Batch{self._args}"


class BatchIterator(grain.DatasetIterator):
    """Fills batches in order, one sample a row or (packing) first fit into the rows' tokens; the
    first sample that does not fit (rows, image or clip slots) waits for the next batch (one at most).

    State = the parent's state before the waiting sample was read (or the current parent state if
    none waits), so restoring re-reads that sample: exact resumption without storing samples.
    """

    def __init__(self, parent, batch_size, max_images, max_len, image_size, packing=False, max_videos=0,
                 frames_per_video=0):
        super().__init__(parent)
        self._batch_size, self._max_images, self._max_len, self._image_size, self._packing = (
            batch_size, max_images, max_len, image_size, packing)
        self._max_videos, self._frames_per_video = max_videos, frames_per_video
        self._skipped_in_a_row = 0
        self._pending = None
        self._pending_state = None
        self._exhausted = False

    def _row_for(self, rows: list[list[dict]], free: list[int], n: int) -> int | None:
        """The row a sample of n tokens goes to (len(rows) for a new one), or None if none has room."""
        if self._packing:
            fits = next((r for r, room in enumerate(free) if room >= n), None)
            if fits is not None:
                return fits
        return len(rows) if len(rows) < self._batch_size else None

    def __next__(self):
        self._assert_not_closed()
        rows: list[list[dict]] = []
        free: list[int] = []  # tokens left in each row
        n_images = n_videos = 0
        extra = np.zeros(len(STAT_NAMES), np.int64)
        while not self._exhausted:
            if self._pending is not None:
                sample, state_before = self._pending, self._pending_state
                self._pending = self._pending_state = None
            elif not self._packing and len(rows) == self._batch_size:
                break
            else:
                state_before = self._parent.get_state()
                try:
                    sample = next(self._parent)
                except StopIteration:
                    self._exhausted = True
                    break
            reason = self._skip_reason(sample)
            if reason is not None:
                extra[STAT_NAMES.index(reason)] += 1
                self._skipped(extra)
                continue
            self._skipped_in_a_row = 0
            k, c = int(sample["num_images"]), int(sample.get("num_videos", 0))
            n = int(np.count_nonzero(sample["attention_mask"]))
            row = self._row_for(rows, free, n)
            slots_full = n_images + k > self._max_images or n_videos + c > self._max_videos
            if row is None or slots_full:
                if slots_full:
                    extra[STAT_NAMES.index("deferred")] += 1
                self._pending, self._pending_state = sample, state_before
                break
            if row == len(rows):
                rows.append([])
                free.append(self._max_len)
            rows[row].append(sample)
            free[row] -= n
            n_images += k
            n_videos += c
        if not rows:
            raise StopIteration
        clips = {"max_videos": self._max_videos, "frames_per_video": self._frames_per_video}
        if self._packing:
            packed = [pack_row(r, self._max_len, self._image_size, self._frames_per_video) for r in rows]
            return make_batch(packed, self._batch_size, self._max_images, self._max_len, self._image_size, extra,
                              packed=True, **clips)
        return make_batch([r[0] for r in rows], self._batch_size, self._max_images, self._max_len, self._image_size,
                          extra, **clips)

    def _skip_reason(self, sample: dict) -> str | None:
        if SKIP in sample:
            return sample[SKIP]
        if int(sample["num_images"]) > self._max_images:
            return "dropped_too_many_images"
        if int(sample.get("num_videos", 0)) > self._max_videos:
            return "dropped_too_many_videos"
        return None

    def _skipped(self, counts: np.ndarray) -> None:
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            reasons = {name: int(n) for name, n in zip(STAT_NAMES, counts) if name.startswith("dropped") and n}
            raise UserError(f"{self._skipped_in_a_row} samples in a row were skipped ({reasons}): the batches fit "
                            f"none of the data. Check the batch's slots (images {self._max_images}, clips "
                            f"{self._max_videos} of {self._frames_per_video} frames, per process) against it")

    def get_state(self):
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self._exhausted = False
