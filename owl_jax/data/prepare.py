"""Builds the datasets (ArrayRecord shards via TFDS) and prints a report.

    python -m owl_jax.data.prepare --dataset=shapesworld --out=DIR [--seed=0]
        [--sizes=captions_train=4000,captions_test=200,instructions_train=12000,instructions_test=400,text_train=16000]
        [--vocab_size=1024]
    python -m owl_jax.data.prepare --dataset=owl_jsonl --jsonl=FILE[,FILE] --images=DIR --out=DIR
        [--val_jsonl=FILE[,FILE]]

ShapesWorld writes DIR/shapesworld/1.0.0/ and its tokenizer to DIR/tokenizer. owl_jsonl writes
DIR/owl_jsonl/1.0.0/ with split ``train`` (and ``validation`` from --val_jsonl). Both write
owl_meta/num_images-<split>.npy and report.json beside the shards. An existing build is kept
unless --overwrite. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def _parse_sizes(text: str) -> dict:
    from owl_jax.data.shapesworld import DEFAULT_SIZES

    sizes = dict(DEFAULT_SIZES)
    if text:
        for part in text.split(","):
            k, _, v = part.partition("=")
            if k.strip() not in sizes:
                raise SystemExit(f"--sizes: unknown split {k!r}; known: {', '.join(sizes)}")
            sizes[k.strip()] = int(v)
    return {k: v for k, v in sizes.items() if v > 0}


def _build(builder, overwrite: bool) -> bool:
    import tensorflow_datasets as tfds

    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        if not overwrite:
            print(f"{builder.data_dir} already exists (use --overwrite to rebuild)")
            return False
        shutil.rmtree(builder.data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return True


def prepare_shapesworld(out: str, seed: int = 0, sizes: dict | None = None, vocab_size: int = 1024,
                        overwrite: bool = False):
    """Generates ShapesWorld into `out` and trains its tokenizer into `out`/tokenizer."""
    from owl_jax.data import records, shapesworld
    from owl_jax.data.tokenizer import train_tokenizer

    sizes = dict(sizes or shapesworld.DEFAULT_SIZES)
    builder = shapesworld.ShapesWorld(data_dir=out, file_format="array_record", sizes=sizes, seed=seed)
    if _build(builder, overwrite):
        records.write_num_images_index(builder.data_dir, list(sizes))
        with open(os.path.join(builder.data_dir, "report.json"), "w") as f:
            json.dump(builder.report.to_dict(), f, indent=1)
    tok_dir = os.path.join(out, "tokenizer")
    if overwrite or not os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
        train_tokenizer(shapesworld.tokenizer_texts(sizes, seed), tok_dir, vocab_size=vocab_size)
    return builder


def prepare_owl_jsonl(out: str, jsonl: list[str], images: str, val_jsonl: list[str] | None = None,
                      overwrite: bool = False):
    from owl_jax.data import records
    from owl_jax.data.owl_jsonl import OwlJsonl

    split_files = {"train": jsonl}
    if val_jsonl:
        split_files["validation"] = val_jsonl
    builder = OwlJsonl(data_dir=out, file_format="array_record", split_files=split_files, image_root=images)
    if _build(builder, overwrite):
        records.write_num_images_index(builder.data_dir, list(split_files))
        with open(os.path.join(builder.data_dir, "report.json"), "w") as f:
            json.dump(builder.report.to_dict(), f, indent=1)
    return builder


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m owl_jax.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["shapesworld", "owl_jsonl"])
    p.add_argument("--out", required=True, help="output directory (config.data.dataset_dir)")
    p.add_argument("--seed", type=int, default=0, help="shapesworld: generation seed")
    p.add_argument("--sizes", default="", help="shapesworld: split=N,... (unlisted splits keep their defaults; 0 skips a split)")
    p.add_argument("--vocab_size", type=int, default=1024, help="shapesworld: tokenizer vocabulary (max)")
    p.add_argument("--jsonl", default="", help="owl_jsonl: FILE[,FILE] for the train split")
    p.add_argument("--val_jsonl", default="", help="owl_jsonl: FILE[,FILE] for the validation split")
    p.add_argument("--images", default="", help="owl_jsonl: image root directory")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.time()
    if args.dataset == "shapesworld":
        builder = prepare_shapesworld(args.out, args.seed, _parse_sizes(args.sizes), args.vocab_size, args.overwrite)
    else:
        if not args.jsonl:
            p.error("--jsonl is required for owl_jsonl")
        builder = prepare_owl_jsonl(args.out, [f for f in args.jsonl.split(",") if f], args.images,
                                    [f for f in args.val_jsonl.split(",") if f], args.overwrite)
    print(f"\n== {builder.name} -> {builder.data_dir} ({time.time() - t0:.1f}s)")
    report_path = os.path.join(builder.data_dir, "report.json")
    if builder.report.written or builder.report.counts:
        print(builder.report.format())
    elif os.path.exists(report_path):
        print("(existing build) report:", open(report_path).read())
    if args.dataset == "shapesworld":
        from owl_jax.data.tokenizer import load_tokenizer

        tok = load_tokenizer(os.path.join(args.out, "tokenizer"))
        print(f"tokenizer: {os.path.join(args.out, 'tokenizer')} (vocab {len(tok)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
