"""The record layout shared by both TFDS datasets, build reports, and reading prepared data.

Every record (ArrayRecord shards, written by TFDS) has the same features, so one pipeline reads
both datasets:

=========== ============================================================================
text        the whole conversation in the released template (raw text, not tokenised)
images      list of encoded image bytes (JPEG or PNG, RGB), k-th image <-> k-th ``<image>``
video_frames  the clips' frames (the video model), PNG, clip after clip, the k-th clip <-> the
            k-th ``<|video|>``; absent from datasets built before videos (read as none)
video_lengths  frames in each clip (int32), summing to len(video_frames)
task_type   the row's ``task_type`` (released format), e.g. ``llava_sft``; ShapesWorld: split
source      where the row came from: ``file.jsonl:LINE`` or ``shapesworld/<split>/<i>``
category    ShapesWorld ability (colour, shape, count, position, two_image, reading,
            multi_turn, text_only, caption); ``""`` for owl_jsonl
question    ShapesWorld: the last human question; ``""`` for owl_jsonl
answer      ShapesWorld: the exact expected answer to `question`; ``""`` for owl_jsonl
scene       ShapesWorld: JSON list of the drawn scenes (shape, colour, region, ...); ``""`` else
=========== ============================================================================

Next to the shards, ``owl_meta/num_images-<split>.npy`` (int32 per record, in record order) lets
the pipeline split text-only from image records without reading them.
"""
from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np

NUM_EXAMPLES_TO_SHOW = 5
META_DIR = "owl_meta"
TEXT_FIELDS = ("text", "task_type", "source", "category", "question", "answer", "scene")


def features():
    import tensorflow_datasets as tfds

    feats = {name: tfds.features.Text() for name in TEXT_FIELDS}
    feats["images"] = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
    feats["video_frames"] = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
    feats["video_lengths"] = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.int32))
    return tfds.features.FeaturesDict(feats)


def empty_record(**kw) -> dict:
    rec = {name: "" for name in TEXT_FIELDS}
    rec["images"], rec["video_frames"], rec["video_lengths"] = [], [], []
    rec.update(kw)
    return rec


def clips_of(record) -> list[list[bytes]]:
    """A record's clips, each its list of encoded frames (none for a dataset built before videos)."""
    frames, lengths = list(record.get("video_frames", [])), [int(n) for n in record.get("video_lengths", [])]
    starts = np.cumsum([0] + lengths)
    return [frames[a:b] for a, b in zip(starts[:-1], starts[1:])]


@dataclasses.dataclass
class BuildReport:
    """Counts of skipped / repaired rows by kind, with the first offending locations of each.

    `image_rows` counts the rows whose image files were looked up: against it a build can tell
    "a few files are missing" from "the image root is wrong".
    """

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    image_rows: int = 0

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < NUM_EXAMPLES_TO_SHOW:
            self.examples[kind].append(where)

    def format(self) -> str:
        lines = ["records written: " + (", ".join(f"{k}={v}" for k, v in sorted(self.written.items())) or "none")]
        if not self.counts:
            lines.append("problems: none")
        for kind in sorted(self.counts):
            lines.append(f"  {kind}: {self.counts[kind]} (first at {', '.join(self.examples[kind])})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"written": dict(self.written), "image_rows": self.image_rows, "counts": dict(self.counts),
                "examples": {k: list(v) for k, v in self.examples.items()}}


def builder_dir(dataset_dir: str, name: str) -> str:
    """The newest ``<dataset_dir>/<name>/<version>`` directory that holds a prepared dataset."""
    root = os.path.join(dataset_dir, name)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no prepared dataset {name!r} under {dataset_dir!r}; run owl_jax.data.prepare")
    versions = [v for v in os.listdir(root) if os.path.exists(os.path.join(root, v, "dataset_info.json"))]
    if not versions:
        raise FileNotFoundError(f"no complete version of {name!r} under {root!r}")
    versions.sort(key=lambda v: tuple(int(x) for x in v.split(".")) if v.replace(".", "").isdigit() else (-1,))
    return os.path.join(root, versions[-1])


def data_source(dataset_dir: str, name: str, split: str):
    """Random-access source (len / getitem, picklable) over a prepared split's ArrayRecord shards."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(builder_dir(dataset_dir, name))
    return builder.as_data_source(split=split)


def write_num_images_index(data_dir: str, splits) -> None:
    """Writes owl_meta/num_images-<split>.npy for each split (reads every record once)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(data_dir)
    os.makedirs(os.path.join(data_dir, META_DIR), exist_ok=True)
    for split in splits:
        src = builder.as_data_source(split=split)
        counts = np.fromiter((len(src[i]["images"]) for i in range(len(src))), np.int32, len(src))
        np.save(os.path.join(data_dir, META_DIR, f"num_images-{split}.npy"), counts)


def num_images_index(dataset_dir: str, name: str, split: str, source=None) -> np.ndarray:
    """int32[len(split)]: images per record (from owl_meta, else by reading every record)."""
    path = os.path.join(builder_dir(dataset_dir, name), META_DIR, f"num_images-{split}.npy")
    if os.path.exists(path):
        return np.load(path)
    src = source if source is not None else data_source(dataset_dir, name, split)
    return np.fromiter((len(src[i]["images"]) for i in range(len(src))), np.int32, len(src))


def as_str(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)
