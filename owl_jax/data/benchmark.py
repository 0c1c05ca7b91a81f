"""Throughput of the input pipeline alone (no model): samples/s and images/s.

    python -m owl_jax.data.benchmark --dataset_dir=DIR [--dataset=owl_jsonl --split=train --image_size=224
        --batch_size=32 --max_len=512 --max_images_per_batch=48 --worker_count=0,1,2
        --read_threads=2 --augment=0,1 --seconds=20]

Comma-separated values of worker_count / augment / read_threads are measured one after another.
The first batches (start-up: tokenizer load, worker start) are excluded from the rate.
"""
from __future__ import annotations

import itertools
import os
import sys
import time

from absl import flags

from owl_jax.cli import parse_flags


def measure(cfg, seconds: float, warmup_batches: int = 2) -> dict:
    from owl_jax.data import pipeline

    t0 = time.perf_counter()
    it = pipeline.make_iterator(cfg, 0, 1)
    for _ in range(warmup_batches):
        next(it)
    startup = time.perf_counter() - t0
    samples = images = batches = 0
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        b = next(it)
        batches += 1
        samples += int((b["attention_mask"].sum(1) > 1).sum())
        images += int(b["num_images"].sum())
    dt = time.perf_counter() - t1
    it.close()
    return {"samples_per_s": samples / dt, "images_per_s": images / dt, "batches": batches, "startup_s": startup}


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("dataset_dir", None, "where the dataset was built (config.data.dataset_dir)", flag_values=fv)
    flags.DEFINE_string("dataset", "owl_jsonl", "the TFDS name under --dataset_dir (the demo's: shapesworld)",
                        flag_values=fv)
    flags.DEFINE_string("split", "train", "the split read", flag_values=fv)
    flags.DEFINE_string("tokenizer_path", "", "tokenizer dir (empty: the dataset's own, in --dataset_dir/tokenizer)",
                        flag_values=fv)
    flags.DEFINE_integer("image_size", 224, "image side in pixels", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "samples per batch", flag_values=fv)
    flags.DEFINE_integer("max_len", 512, "tokens per sample", flag_values=fv)
    flags.DEFINE_integer("max_images_per_batch", 48, "image slots per batch", flag_values=fv)
    flags.DEFINE_float("text_only_ratio", -1.0, "fraction of text-only samples (< 0: the records' order)",
                       flag_values=fv)
    flags.DEFINE_string("worker_count", "0", "worker processes; comma-separated values are measured in turn",
                        flag_values=fv)
    flags.DEFINE_string("read_threads", "2", "read threads; comma-separated values are measured in turn",
                        flag_values=fv)
    flags.DEFINE_string("augment", "0", "0 or 1; comma-separated values are measured in turn", flag_values=fv)
    flags.DEFINE_float("seconds", 20.0, "measured seconds per setting", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = parse_flags(argv, _flags(), __doc__, required=("dataset_dir",))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from owl_jax.data import pipeline

    print(f"cores: {os.cpu_count()}  split: {args.split}  image_size: {args.image_size}  batch: {args.batch_size}  "
          f"max_len: {args.max_len}  M: {args.max_images_per_batch}")
    print(f"{'workers':>7} {'threads':>7} {'augment':>7} {'samples/s':>10} {'images/s':>9} {'startup_s':>9}")
    for workers, threads, augment in itertools.product(
            [int(x) for x in args.worker_count.split(",")], [int(x) for x in args.read_threads.split(",")],
            [bool(int(x)) for x in args.augment.split(",")]):
        cfg = pipeline.default_config()
        cfg.update(dataset=args.dataset, dataset_dir=args.dataset_dir, split=args.split,
                   tokenizer_path=args.tokenizer_path, image_size=args.image_size, batch_size=args.batch_size,
                   max_len=args.max_len, max_images_per_batch=args.max_images_per_batch,
                   text_only_ratio=args.text_only_ratio, worker_count=workers, read_threads=threads,
                   read_buffer_size=2 * args.batch_size, augment=augment)
        r = measure(cfg, args.seconds)
        print(f"{workers:>7} {threads:>7} {int(augment):>7} {r['samples_per_s']:>10.1f} {r['images_per_s']:>9.1f} "
              f"{r['startup_s']:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
