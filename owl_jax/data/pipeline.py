"""The input pipeline: prepared TFDS dataset -> fixed-shape, resumable, per-process batches (grain).

Graph (grain dataset API)::

    record indices (all, or text-only / with-image groups when text_only_ratio >= 0)
      -> this process's shard  [process_index::process_count]     (disjoint, together cover all)
      -> shuffle(seed) -> repeat(num_epochs)                        (reshuffled every epoch)
      -> mix(text-only, image; weights ratio, 1 - ratio)            (only when text_only_ratio >= 0)
      -> random_map(read + tokenise + image preprocessing)          (per-index rng: deterministic)
      -> to_iter_dataset(read_threads)
      -> image-aware batching or packing (batching.py)              (fixed shapes, see below)
      -> mp_prefetch(worker_count)                                  (optional worker processes)

A batch (per process) is the training batch of owl_jax/batch.py (T = max_len), with fixed shapes.

With text_only_ratio >= 0 and a finite num_epochs, iteration ends when either group (text-only or
image) is exhausted at its weight. A sample whose images do not fit the batch's remaining image slots
is deferred to the next batch; a sample with more than M images is dropped. Both are counted
(`OwlDataIterator.stats`), as are truncated samples and samples left with no loss token. The video
model's clips take the batch's V clip slots by the same rules (deferred, or dropped when more than
V: with no clip slots, every sample with a clip). Also skipped and counted: a sample with a stored clip
of more than frames_per_video frames (dropped_long_clips: build the data with that many), and one whose
text keeps more tags than its record has images or clips (dropped_missing_media: they would read
another sample's). When every sample is skipped, the batcher stops with an error saying why.

With `packing`, a row holds as many samples as fit its max_len tokens: each sample goes to the first
row of the batch with room for it (first fit, in stream order), and the first sample that fits no
row, or whose images overflow the batch's M slots, waits for the next batch. A packed row's
attention_mask numbers its samples 1, 2, ... (owl_jax/batch.py), its images follow its samples' order,
and `index` is per token (int32[B, T], -1 on padding). Nothing is cut to fit: a sample is truncated
to max_len exactly as without packing. At the end
of a finite run the last batch is filled with inert rows (a lone BOS, attention 1 at position 0,
loss 0, no images).

Multi-process: each process gets its own B rows and M image slots; a sample's images are always in
its own process's slots, and its `image_start` counts from the process's first slot.

Checkpointing: `OwlDataIterator` is a grain `DatasetIterator`. ``get_state()`` returns a
JSON-able dict and ``set_state(state)`` restores it (the resumed run yields exactly the batches it
would have); with orbax use ``grain.checkpoint.CheckpointSave(it)`` /
``grain.checkpoint.CheckpointRestore(it)`` (one JSON file per process) inside
``ocp.args.Composite``. The state depends on (config, process_count) and, with workers, on
worker_count: restore with the same values.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from owl_jax.cli import UserError
from owl_jax.data import records
from owl_jax.data.batching import INDEX as _INDEX
from owl_jax.data.batching import SKIP, STAT_NAMES, BatchDataset
from owl_jax.data.batching import STATS as _STATS
from owl_jax.data.conversation import drop_images
from owl_jax.data.image import load_and_preprocess
from owl_jax.data.text import DEFAULT_IMAGE_TOKEN_COUNT, encode_conversation, pad_to
from owl_jax.data.tokenizer import load_tokenizer


def default_config() -> ml_collections.ConfigDict:
    """The ``config.data`` section with defaults (documented in owl_jax/data/__init__.py)."""
    return ml_collections.ConfigDict(dict(
        dataset="owl_jsonl",  # the TFDS name under dataset_dir: owl_jsonl, or the demo's shapesworld
        dataset_dir="",  # the --out of `python -m owl_jax.data.prepare`
        split="train",
        tokenizer_path="",  # '' -> <dataset_dir>/tokenizer (a dataset built with its own tokenizer)
        batch_size=8,  # global: each process yields batch_size // process_count rows
        max_len=256,
        max_images_per_batch=8,  # global: each process holds max_images_per_batch // process_count
        max_videos_per_batch=0,  # global clip slots (the video model), split across processes like images
        frames_per_video=4,  # frames a clip slot holds; a sample with a longer stored clip is skipped (counted)
        image_size=224,
        image_token_count=DEFAULT_IMAGE_TOKEN_COUNT,  # placeholders per <image> (queries + 1)
        augment=False,  # train augmentation: random resized crop (else bicubic resize)
        crop_scale_min=0.5,
        horizontal_flip=False,  # only with augment; breaks text reading and left/right questions
        text_only_ratio=-1.0,  # < 0: natural order; in [0, 1]: fraction of text-only samples
        shuffle=True,
        num_epochs=0,  # 0: repeat forever
        seed=0,
        blank_images=False,  # replace every image by zeros (the mean colour): the "no image" control
        text_only=False,  # drop every image and its "Human: <image>" line (text-only pretraining)
        packing=False,  # several samples a row (first fit); see the module docstring
        return_index=False,  # add "index": int32[B] record index of each row (-1 for filler rows; packing: [B, T])
        read_threads=2,  # grain ReadOptions.num_threads
        read_buffer_size=32,  # grain ReadOptions.prefetch_buffer_size (samples)
        worker_count=0,  # grain mp_prefetch worker processes (0: none)
        worker_buffer_size=2,  # batches buffered per worker
    ))


def _get(cfg, name):
    defaults = default_config()
    return cfg.get(name, defaults[name]) if hasattr(cfg, "get") else getattr(cfg, name, defaults[name])


def resolve_tokenizer_path(cfg) -> str:
    path = _get(cfg, "tokenizer_path")
    if path:
        return path
    beside_data = os.path.join(_get(cfg, "dataset_dir"), "tokenizer")
    if os.path.isdir(beside_data):  # a dataset built with its own tokenizer (ShapesWorld)
        return beside_data
    raise UserError(f"config.data.tokenizer_path is required: the dataset has no tokenizer of its own ({beside_data})")


# ---------------------------------------------------------------- per sample


@dataclasses.dataclass
class SampleOptions:
    max_len: int
    image_size: int
    image_token_count: int = DEFAULT_IMAGE_TOKEN_COUNT
    augment: bool = False
    horizontal_flip: bool = False
    crop_scale_min: float = 0.5
    blank_images: bool = False
    text_only: bool = False
    video_tags: bool = False  # the video model's: <|video|> tags are clips (else text)
    frames_per_video: int = 0


def _encode_clips(clips: Sequence[Sequence[bytes]], opts: SampleOptions) -> tuple[np.ndarray, np.ndarray]:
    """Clips' stored frames (at most F each) -> float32[k, F, S, S, 3] (a clip's frames first, zeros
    after) and int32[k] frame counts. Clips are not augmented: the release's processor only resizes."""
    f, s = opts.frames_per_video, opts.image_size
    pixels = np.zeros((len(clips), f, s, s, 3), np.float32)
    counts = np.asarray([len(frames) for frames in clips], np.int32)
    if f and not opts.blank_images:  # no clip slots: the sample is skipped when batched (counted there)
        for i, frames in enumerate(clips):
            pixels[i, : len(frames)] = np.stack([load_and_preprocess(b, s) for b in frames])
    return pixels, counts


def _skip_reason(images: Sequence, clips: Sequence, enc, opts: SampleOptions) -> str | None:
    """Why a sample cannot be trained on as it is (a STAT_NAMES counter), or None.

    Tags kept with no image or clip of their own would read another sample's. A stored clip longer
    than a slot: its frames were sampled from the whole video, and a subset of them is not what the
    release samples (prepare the data with --video_frames=frames_per_video)."""
    if len(images) < enc.num_images or len(clips) < enc.num_videos:
        return "dropped_missing_media"
    if opts.frames_per_video and any(len(frames) > opts.frames_per_video for frames in clips):
        return "dropped_long_clips"
    return None


def encode_sample(text: str, images: Sequence[bytes], tokenizer, opts: SampleOptions,
                  rng: np.random.Generator | None = None, clips: Sequence[Sequence[bytes]] = ()) -> dict[str, Any]:
    """One record -> padded input_ids/attention_mask/loss_mask [T], images [k, S, S, 3], clips
    (videos [c, F, S, S, 3], video_num_frames [c]; only for `opts.video_tags`), stats. A sample that
    cannot be trained on carries its reason under SKIP instead (the batcher counts and skips it)."""
    if opts.text_only:
        text, images, clips = drop_images(text, videos=opts.video_tags), [], []
    clips = list(clips) if opts.video_tags else []
    enc = encode_conversation(text, tokenizer, opts.max_len, opts.image_token_count, video_tags=opts.video_tags)
    stats = np.zeros(len(STAT_NAMES), np.int64)
    reason = _skip_reason(images, clips[: enc.num_videos], enc, opts)
    if reason is not None:
        stats[STAT_NAMES.index(reason)] = 1
        return {SKIP: reason, _STATS: stats}
    kept = list(images)[: enc.num_images]
    s = opts.image_size
    if opts.blank_images or not kept:
        pixels = np.zeros((len(kept), s, s, 3), np.float32)
    else:
        pixels = np.stack([load_and_preprocess(b, s, rng, opts.augment, opts.horizontal_flip, opts.crop_scale_min)
                           for b in kept])
    out = pad_to(enc, opts.max_len)
    out["images"] = pixels
    out["num_images"] = len(kept)
    out["videos"], out["video_num_frames"] = _encode_clips(clips[: enc.num_videos], opts)
    out["num_videos"] = enc.num_videos
    stats[0] = 1
    stats[1] = enc.truncated
    stats[2] = enc.num_loss_tokens == 0
    stats[3] = min(len(images), enc.num_image_tags) - enc.num_images
    stats[STAT_NAMES.index("tokens")] = len(enc.ids)
    stats[STAT_NAMES.index("videos_truncated")] = min(len(clips), enc.num_video_tags) - enc.num_videos
    out[_STATS] = stats
    return out


class _Preprocess(grain.transforms.RandomMap):
    """Record index -> encoded sample. Loads the tokenizer lazily (once per worker process)."""

    def __init__(self, source, tokenizer_path: str, opts: SampleOptions):
        self._source = source
        self._tokenizer_path = tokenizer_path
        self._opts = opts
        self._lock = threading.Lock()
        self._tokenizer = load_tokenizer(tokenizer_path)  # fail early, in the caller's process

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def random_map(self, index, rng: np.random.Generator):
        if self._tokenizer is None:
            with self._lock:  # read threads share one tokenizer; load it once
                if self._tokenizer is None:
                    self._tokenizer = load_tokenizer(self._tokenizer_path)
        rec = self._source[int(index)]
        images = rec["images"]
        images = [] if images is None else list(images)
        clips = records.clips_of(rec) if self._opts.video_tags else []
        out = encode_sample(records.as_str(rec["text"]), images, self._tokenizer, self._opts, rng, clips)
        out[_INDEX] = int(index)
        return out


class _StatsDataset(grain.IterDataset):
    def __init__(self, parent, return_index: bool):
        super().__init__(parent)
        self._return_index = return_index

    def __iter__(self):
        return OwlDataIterator(self._parent.__iter__(), self._return_index)


class OwlDataIterator(grain.DatasetIterator):
    """Yields batch dicts (owl_jax/batch.py); accumulates pipeline counters in `stats`.

    ``get_state()`` -> JSON-able dict; ``set_state(state)``; works with
    ``grain.checkpoint.CheckpointSave/CheckpointRestore`` for orbax.
    """

    def __init__(self, parent, return_index: bool = False):
        super().__init__(parent)
        self._counts = np.zeros(len(STAT_NAMES), np.int64)
        self._return_index = return_index

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        self._counts += batch.pop(_STATS)
        index = batch.pop(_INDEX)
        if self._return_index:
            batch["index"] = index
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the start of the run (restored with the state)."""
        return {k: int(v) for k, v in zip(STAT_NAMES, self._counts)}

    def get_state(self):
        return {"pipeline": self._parent.get_state(), "stats": [int(x) for x in self._counts]}

    def set_state(self, state):
        counts = np.asarray(state["stats"], np.int64)  # a state saved before newer counters: zeros for them
        if len(counts) > len(STAT_NAMES):
            raise ValueError(f"a data state with {len(counts)} counters: this owl_jax knows {len(STAT_NAMES)}; "
                             "resume it with the version that saved it")
        self._parent.set_state(state["pipeline"])
        self._counts = np.concatenate([counts, np.zeros(len(STAT_NAMES) - len(counts), np.int64)])


# ---------------------------------------------------------------- builder


def _process_index_and_count(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def _index_dataset(indices: np.ndarray, shard: slice, shuffle: bool, seed: int, num_epochs: int):
    ds = grain.MapDataset.source(np.asarray(indices, np.int64))[shard]
    if len(ds) == 0:
        return None
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(None if num_epochs <= 0 else num_epochs)


def shard_indices(num_records: int, process_index: int, process_count: int) -> np.ndarray:
    """The record indices a process reads (before shuffling): index % process_count == process_index."""
    return np.arange(num_records)[process_index::process_count]


def make_iterator(config, process_index: int | None = None, process_count: int | None = None,
                  source=None, video_tags: bool = False) -> OwlDataIterator:
    """Builds the pipeline for `config` (a ``config.data`` ConfigDict, see `default_config`).

    `process_index` / `process_count` default to jax's. `video_tags`: the model is the video model,
    whose `<|video|>` tags are clips (the image model reads them as text). Returns an `OwlDataIterator`.
    """
    pi, pc = _process_index_and_count(process_index, process_count)
    batch_size, max_images = _get(config, "batch_size"), _get(config, "max_images_per_batch")
    max_videos = int(_get(config, "max_videos_per_batch"))
    if batch_size % pc or max_images % pc or max_videos % pc:
        raise UserError(f"batch_size {batch_size}, max_images_per_batch {max_images} and max_videos_per_batch "
                        f"{max_videos} must divide by process_count {pc}")
    if max_videos and not video_tags:
        raise UserError(f"max_videos_per_batch={max_videos}: clips need the video model (model.vision.temporal)")
    b_local, m_local = batch_size // pc, max_images // pc
    name, ddir, split = _get(config, "dataset"), _get(config, "dataset_dir"), _get(config, "split")
    if source is None:
        source = records.data_source(ddir, name, split)
    seed, shuffle, epochs = int(_get(config, "seed")), bool(_get(config, "shuffle")), int(_get(config, "num_epochs"))
    shard = slice(pi, None, pc)
    ratio = float(_get(config, "text_only_ratio"))
    if ratio < 0:
        ds = _index_dataset(np.arange(len(source)), shard, shuffle, seed, epochs)
        if ds is None:
            raise UserError(f"process {pi} of {pc} has no records in {name}/{split}")
    else:
        if ratio > 1:
            raise UserError("text_only_ratio must be < 0 (off) or in [0, 1]")
        n_img = records.num_images_index(ddir, name, split, source)
        groups = [(ratio, np.flatnonzero(n_img == 0)), (1.0 - ratio, np.flatnonzero(n_img > 0))]
        parts, weights = [], []
        for g, (w, idx) in enumerate(groups):
            if w <= 0:
                continue
            d = _index_dataset(idx, shard, shuffle, seed + 7919 * (g + 1), epochs)
            if d is None:
                raise UserError(f"text_only_ratio={ratio} needs {'text-only' if g == 0 else 'image'} records "
                                 f"in {name}/{split} for process {pi}")
            parts.append(d)
            weights.append(w)
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=weights)
    opts = SampleOptions(
        max_len=int(_get(config, "max_len")), image_size=int(_get(config, "image_size")),
        image_token_count=int(_get(config, "image_token_count")), augment=bool(_get(config, "augment")),
        horizontal_flip=bool(_get(config, "horizontal_flip")), crop_scale_min=float(_get(config, "crop_scale_min")),
        blank_images=bool(_get(config, "blank_images")), text_only=bool(_get(config, "text_only")),
        video_tags=video_tags, frames_per_video=int(_get(config, "frames_per_video")) if max_videos else 0)
    # augmentation rng: per (seed, process, position in this process's stream)
    ds = ds.random_map(_Preprocess(source, resolve_tokenizer_path(config), opts), seed=(seed + 1 + 7877 * pi) % 2**32)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(_get(config, "read_threads")),
                                              prefetch_buffer_size=int(_get(config, "read_buffer_size"))))
    ds = BatchDataset(ds, b_local, m_local, opts.max_len, opts.image_size, bool(_get(config, "packing")),
                      max_videos // pc, opts.frames_per_video)
    workers = int(_get(config, "worker_count"))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=int(_get(config, "worker_buffer_size"))
            )
        )
    return iter(_StatsDataset(ds, bool(_get(config, "return_index"))))
