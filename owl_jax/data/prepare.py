"""Builds a dataset of released-format JSONL files (ArrayRecord shards via TFDS) and prints a report.

    python -m owl_jax.data.prepare --jsonl=FILE[,FILE] --images=DIR --out=DIR
        [--val_jsonl=FILE[,FILE]] [--allow_images_outside_root]

Writes DIR/owl_jsonl/1.0.0/ with split ``train`` (and ``validation`` from --val_jsonl), and
owl_meta/num_images-<split>.npy and report.json beside the shards. An existing build is kept
unless --overwrite. Nothing is downloaded. Relative paths are taken from the current directory.

It checks its inputs before writing anything (the JSONL files exist; --images is a
directory when a row names images), refuses image paths that lead outside --images unless
--allow_images_outside_root, and fails (exit 2, build removed) when more than half of the rows
that name images were skipped as missing_image or outside_image_root: the image root is wrong.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from absl import flags

from owl_jax.cli import absolute, fail, parse_flags


def _file_list(text: str) -> list[str]:
    return [absolute(f) for f in text.split(",") if f]


def build(builder, overwrite: bool, source: str = "") -> bool:
    import tensorflow_datasets as tfds

    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        if not overwrite:
            print(f"{builder.data_dir} already exists (use --overwrite to rebuild)")
            return False
        shutil.rmtree(builder.data_dir)
    print(f"building {builder.name}{source} into {builder.data_dir}")
    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" (termcolor,
    # not logging) from these two hooks; nothing is downloaded here, so they only mislead.
    builder._log_download_bytes = builder._log_download_done = lambda: None
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return True


def write_metadata(builder, splits) -> None:
    """The per-split image counts (owl_meta/) and the build report, beside a fresh build's shards."""
    from owl_jax.data import records

    records.write_num_images_index(builder.data_dir, splits)
    with open(os.path.join(builder.data_dir, "report.json"), "w") as f:
        json.dump(builder.report.to_dict(), f, indent=1)


def prepare_owl_jsonl(out: str, jsonl: list[str], images: str, val_jsonl: list[str] | None = None,
                      overwrite: bool = False, allow_images_outside_root: bool = False, video_frames: int = 4,
                      video_frame_size: int = 224):
    """Builds released-format JSONL files (+ image root `images`) into `out`/owl_jsonl."""
    from owl_jax.data.owl_jsonl import OwlJsonl

    split_files = {"train": jsonl}
    if val_jsonl:
        split_files["validation"] = val_jsonl
    builder = OwlJsonl(data_dir=out, file_format="array_record", split_files=split_files, image_root=images,
                       allow_images_outside_root=allow_images_outside_root, video_frames=video_frames,
                       video_frame_size=video_frame_size)
    num_files = sum(len(files) for files in split_files.values())
    if build(builder, overwrite, f" from {num_files} file(s)"):
        write_metadata(builder, list(split_files))
    return builder


def _first_row_naming_images(files: list[str]) -> str | None:
    """``file:line`` of the first row with a non-empty ``image`` field, or None (text only)."""
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if b'"image"' not in raw:
                    continue
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(row, dict) and (row.get("image") or row.get("video")):
                    return f"{os.path.basename(path)}:{lineno}"
    return None


def _check_owl_jsonl_inputs(jsonl: list[str], val_jsonl: list[str], images: str) -> None:
    """Exits with a one-line error before any output exists when an input is missing."""
    if not jsonl:
        fail("--jsonl is required")
    for flag, files in (("--jsonl", jsonl), ("--val_jsonl", val_jsonl)):
        for path in files:
            if not os.path.isfile(path):
                fail(f"{flag}: {path} is not a file (expected a JSONL file in the released mPLUG-Owl format)")
    if not os.path.isdir(images or ""):
        row = _first_row_naming_images(jsonl + val_jsonl)
        if row is not None:
            fail(f"--images={images or '(not given)'} is not a directory, but {row} names images "
                 "(expected the image root the rows' image paths are relative to)")


def _image_root_problem(report, images: str) -> str | None:
    """Why a finished build looks made against the wrong image root, or None.

    A wrong --images does not stop the build: nearly every row is skipped as missing_image (or
    outside_image_root), and a training run would then pick up the nearly empty dataset.
    """
    missing_images, missing_videos = report.counts["missing_image"], report.counts["missing_video"]
    missing, outside = missing_images + missing_videos, report.counts["outside_image_root"]
    if 2 * (missing + outside) <= report.image_rows:
        return None
    hint = "is --images the right directory?"
    if outside:
        hint += " (--allow_images_outside_root admits image paths outside it)"
    videos = f", missing_video={missing_videos}" if missing_videos else ""
    return (f"{missing + outside} of {report.image_rows} rows that name images were skipped "
            f"(missing_image={missing_images}{videos}, outside_image_root={outside}) with image root {images}; {hint}")


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "output directory (config.data.dataset_dir)", flag_values=fv)
    flags.DEFINE_string("jsonl", "", "FILE[,FILE] for the train split", flag_values=fv)
    flags.DEFINE_string("val_jsonl", "", "FILE[,FILE] for the validation split", flag_values=fv)
    flags.DEFINE_string("images", "", "image root directory", flag_values=fv)
    flags.DEFINE_bool("allow_images_outside_root", False,
                      "admit image paths outside --images (absolute paths used as they are)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "rebuild an existing build", flag_values=fv)
    flags.DEFINE_integer("video_frames", 4, "frames sampled from each video (the release's 4)", flag_values=fv,
                         lower_bound=1)
    flags.DEFINE_integer("video_frame_size", 224, "side the sampled frames are resized to (the release's 224)",
                         flag_values=fv, lower_bound=1)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = parse_flags(argv, _flags(), __doc__, required=("out",))
    out, images = absolute(args.out), absolute(args.images)
    jsonl, val_jsonl = _file_list(args.jsonl), _file_list(args.val_jsonl)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.time()
    _check_owl_jsonl_inputs(jsonl, val_jsonl, images)
    builder = prepare_owl_jsonl(out, jsonl, images, val_jsonl, args.overwrite, args.allow_images_outside_root,
                                args.video_frames, args.video_frame_size)
    print(f"\n== {builder.name} -> {builder.data_dir} ({time.time() - t0:.1f}s)")
    report_path = os.path.join(builder.data_dir, "report.json")
    if builder.report.written or builder.report.counts:
        print(builder.report.format())
    elif os.path.exists(report_path):
        print("(existing build) report:", open(report_path).read())
    problem = _image_root_problem(builder.report, images)
    if problem:
        shutil.rmtree(builder.data_dir)
        fail(f"{problem}; removed the build {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
