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
========================= ===========================================================
"""
from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from owl_jax.data import records
from owl_jax.data.conversation import caption_conversation, count_image_tags
from owl_jax.data.image import repair_image

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


def parse_row(line: str, where: str, image_root: str, report: records.BuildReport,
              allow_images_outside_root: bool = False) -> dict | None:
    """One JSONL line -> a record dict (see `records`), or None (skipped and counted in `report`)."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        row = None
    if not isinstance(row, dict):
        report.add("bad_json", where)
        return None

    images = row.get("image")
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p and "\0" not in p for p in images):
        report.add("bad_image_field", where)
        return None

    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        caption = row.get("caption")
        if isinstance(caption, str) and caption.strip() and images:
            text = caption_conversation(caption.strip(), num_images=len(images))
        else:
            report.add("no_text", where)
            return None

    tags = count_image_tags(text)
    if tags > len(images):
        report.add("more_tags_than_images", where)
        return None
    if len(images) > tags:
        report.add("more_images_than_tags", where)
        images = images[:tags]

    if images:
        report.image_rows += 1
    files = []
    for path in images:  # every path is checked before any file is read
        full = resolve_image(path, image_root, allow_images_outside_root)
        if full is None:
            report.add("outside_image_root", f"{where} ({path})")
            return None
        if not os.path.isfile(full):
            report.add("missing_image", f"{where} ({path})")
            return None
        files.append(full)

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

    task_type = row.get("task_type", "")
    return records.empty_record(text=text, images=encoded, task_type=task_type if isinstance(task_type, str) else "",
                                source=where)


class OwlJsonl(tfds.core.GeneratorBasedBuilder):
    """Released-format JSONL + image root -> ArrayRecord shards. Splits are given by the caller."""

    name = "owl_jsonl"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Released mPLUG-Owl JSONL format, images stored encoded."}

    def __init__(self, *, split_files: dict[str, list[str]] | None = None, image_root: str = "",
                 allow_images_outside_root: bool = False, **kwargs):
        self._split_files = dict(split_files or {})
        self._image_root = image_root
        self._allow_outside = allow_images_outside_root
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
                    rec = parse_row(line, where, self._image_root, self.report, self._allow_outside)
                    if rec is not None:
                        self.report.written[split] += 1
                        yield f"{file_index}:{lineno}", rec
