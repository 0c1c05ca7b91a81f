"""`owl_jsonl`: JSONL files in the released mPLUG-Owl format as a TFDS dataset (ArrayRecord shards).

One row per line::

    {"image": ["a.jpg", "b.jpg"], "text": "<the whole conversation>", "task_type": "llava_sft"}

* ``image``: list of paths (or a single path string) relative to the image root; absent, null or
  ``[]`` for text-only rows. A crawled dataset is untrusted input: every path must resolve (symlinks
  followed) to a file under the image root, else the row is refused without reading the file.
  ``allow_images_outside_root`` serves datasets that knowingly name absolute paths: those are then
  used as they are, relative ones joined to the root.
* ``text``: the conversation in the released template, one ``<image>`` tag per image.
* Stage-1 image-caption pairs: either the same format with a one-turn conversation, or a plain
  ``"caption"`` field instead of ``text``; such a row becomes
  ``<system prompt>\\nHuman: <image>\\nAI: {caption}`` (one tag per image).
* ``task_type`` is kept as is (default ``""``).
* ``video`` (the video model): list of video paths (or one path) under the same root and the same
  containment rule as images, one ``<|video|>`` tag per clip. Each file's frames are sampled as the
  release samples them (`owl_jax.data.video`: ``video_frames`` of them, 4 by default, resized to
  ``video_frame_size`` x ``video_frame_size``, 224, while decoding) and stored as PNG.

Bad rows never stop the build; each is skipped or repaired and counted in the `BuildReport`:

========================= ===========================================================
bad_json                  not a JSON object (skipped)
no_text                   no usable ``text`` and no ``caption`` (skipped)
bad_image_field           ``image`` is not a path or list of paths (skipped)
outside_image_root        an image path leads outside the image root: ``../``, absolute, or
                          a symlink pointing out (skipped, the file is never read)
more_tags_than_images     more ``<image>`` tags than images (skipped)
more_images_than_tags     images beyond the number of tags are dropped (repaired)
missing_image             an image file does not exist (skipped)
unreadable_image          an image file does not decode completely (skipped)
converted_image           non-RGB (CMYK, grey, palette, alpha, 16-bit) or non-JPEG/PNG
                          file, converted to RGB and re-encoded (repaired)
wrong_extension           file content does not match its extension, e.g. a PNG named
                          ``.jpg`` (stored by content; counted)
bad_video_field           ``video`` is not a path or list of paths (skipped)
more_tags_than_videos     more ``<|video|>`` tags than videos (skipped)
more_videos_than_tags     videos beyond the number of tags are dropped (repaired)
missing_video             a video file does not exist (skipped)
video_<reason>            a video FFmpeg cannot use, by `video.REASONS`: video_unreadable,
                          video_no_video_stream, video_no_frames, video_truncated,
                          video_too_many_frames, video_too_large (skipped)
========================= ===========================================================

Paths that lead outside the root count as ``outside_image_root`` whether they name images or videos.
"""
from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from owl_jax.data import records
from owl_jax.data.conversation import caption_conversation, count_image_tags, count_video_tags
from owl_jax.data.image import encode_png, repair_image

_EXT_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP",
               ".tif": "TIFF", ".tiff": "TIFF"}


def resolve_image(path: str, image_root: str, allow_outside: bool = False) -> str | None:
    """The file a row's image `path` names, or None when it lies outside `image_root`.

    Without the containment check a row could make the build read any file the builder can read
    (``../../home/x/.ssh/id_rsa``, ``/etc/passwd``, a planted symlink) and store it in the shards.
    """
    if allow_outside:
        return path if os.path.isabs(path) else os.path.join(image_root, path)
    root = os.path.realpath(image_root)
    full = os.path.realpath(os.path.join(root, path))
    return full if os.path.commonpath([root, full]) == root else None


def _paths(value) -> list[str] | None:
    """A row's `image` / `video` field as a list of paths; None when it is not one."""
    paths = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p and "\0" not in p for p in paths):
        return None
    return paths


def _match_tags(paths: list[str], tags: int, kind: str, where: str, report: records.BuildReport) -> list[str] | None:
    """A row's `kind` ("images" / "videos") against its tags: paths beyond the tags dropped (counted);
    None (counted) when tags outnumber them."""
    if tags > len(paths):
        report.add(f"more_tags_than_{kind}", where)
        return None
    if len(paths) > tags:
        report.add(f"more_{kind}_than_tags", where)
    return paths[:tags]


def _files(paths: list[str], kind: str, where: str, image_root: str, report: records.BuildReport,
           allow_outside: bool) -> list[str] | None:
    """The files that `paths` name, each checked before any is read; None (counted) when one is not."""
    files = []
    for path in paths:
        full = resolve_image(path, image_root, allow_outside)
        if full is None:
            report.add("outside_image_root", f"{where} ({path})")
            return None
        if not os.path.isfile(full):
            report.add(f"missing_{kind}", f"{where} ({path})")
            return None
        files.append(full)
    return files


def _clips(videos: list[str], files: list[str], where: str, report: records.BuildReport, frames: int,
           frame_size: int) -> tuple[list[bytes], list[int]] | None:
    """The clips' sampled frames as PNG, clip after clip, and their counts; None (counted) on a bad video."""
    from owl_jax.data import video as video_lib

    encoded, lengths = [], []
    for path, full in zip(videos, files):
        try:
            clip = video_lib.read_clip(full, frames, frame_size, name=f"{where} ({path})")
        except video_lib.VideoError as e:
            report.add(f"video_{e.reason}", f"{where} ({path})")
            return None
        encoded += [encode_png(frame) for frame in clip]
        lengths.append(len(clip))
    return encoded, lengths


def parse_row(line: str, where: str, image_root: str, report: records.BuildReport,
              allow_images_outside_root: bool = False, video_frames: int = 4,
              video_frame_size: int = 224) -> dict | None:
    """One JSONL line -> a record dict (see `records`), or None (skipped and counted in `report`)."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        row = None
    if not isinstance(row, dict):
        report.add("bad_json", where)
        return None

    images = _paths(row.get("image"))
    if images is None:
        report.add("bad_image_field", where)
        return None
    videos = _paths(row.get("video"))
    if videos is None:
        report.add("bad_video_field", where)
        return None

    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        caption = row.get("caption")
        if isinstance(caption, str) and caption.strip() and images:
            text = caption_conversation(caption.strip(), num_images=len(images))
        else:
            report.add("no_text", where)
            return None

    images = _match_tags(images, count_image_tags(text), "images", where, report)
    if images is None:
        return None
    videos = _match_tags(videos, count_video_tags(text), "videos", where, report)
    if videos is None:
        return None

    if images or videos:  # rows whose files are looked up: a wrong root shows as most of them missing
        report.image_rows += 1
    files = _files(images, "image", where, image_root, report, allow_images_outside_root)
    if files is None:
        return None
    video_files = _files(videos, "video", where, image_root, report, allow_images_outside_root)
    if video_files is None:
        return None

    encoded = []
    for path, full in zip(images, files):
        with open(full, "rb") as f:
            data = f.read()
        try:
            data, repairs, fmt = repair_image(data)
        except ValueError:
            report.add("unreadable_image", f"{where} ({path})")
            return None
        if repairs:
            report.add("converted_image", f"{where} ({path}: {'+'.join(repairs)})")
        expected = _EXT_FORMAT.get(os.path.splitext(path)[1].lower())
        if expected is not None and expected != fmt:
            report.add("wrong_extension", f"{where} ({path} is {fmt})")
        encoded.append(data)

    clips = _clips(videos, video_files, where, report, video_frames, video_frame_size) if videos else ([], [])
    if clips is None:
        return None
    task_type = row.get("task_type", "")
    return records.empty_record(text=text, images=encoded, task_type=task_type if isinstance(task_type, str) else "",
                                source=where, video_frames=clips[0], video_lengths=clips[1])


class OwlJsonl(tfds.core.GeneratorBasedBuilder):
    """Released-format JSONL + image root -> ArrayRecord shards. Splits are given by the caller."""

    name = "owl_jsonl"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Released mPLUG-Owl JSONL format, images stored encoded.",
                     "1.1.0": "Videos (the video model): each clip's sampled frames, PNG."}

    def __init__(self, *, split_files: dict[str, list[str]] | None = None, image_root: str = "",
                 allow_images_outside_root: bool = False, video_frames: int = 4, video_frame_size: int = 224,
                 **kwargs):
        self._split_files = dict(split_files or {})
        self._image_root = image_root
        self._allow_outside = allow_images_outside_root
        self._video = (video_frames, video_frame_size)
        self.report = records.BuildReport()
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=records.features())

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self._split_files:
            raise ValueError("OwlJsonl needs split_files={'train': [file.jsonl, ...]} to build")
        return {split: self._generate_examples(files, split) for split, files in self._split_files.items()}

    def _generate_examples(self, files, split):
        for file_index, path in enumerate(files):
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    where = f"{os.path.basename(path)}:{lineno}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self.report.add("bad_json", where)
                        continue
                    rec = parse_row(line, where, self._image_root, self.report, self._allow_outside, *self._video)
                    if rec is not None:
                        self.report.written[split] += 1
                        yield f"{file_index}:{lineno}", rec
