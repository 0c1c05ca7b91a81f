"""Benchmark runners. `python -m owl_jax.evaluate owleval --checkpoint DIR --data DIR --out answers.jsonl`

The OwlEval runner and its rules (questions, conversations, resuming) are owl_jax/inference/owleval.py;
its docstring is this command's help.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from owl_jax.cli import EXIT_USER_ERROR, absolute
from owl_jax.data.text import PROMPT_TOKENIZATIONS
from owl_jax.inference import owleval
from owl_jax.inference.engine import Sampling, check_max_new_tokens
from owl_jax.inference.owleval import _resume, answer_owleval, read_questions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owl_jax.evaluate", description=owleval.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    o = sub.add_parser("owleval", help="OwlEval: 82 questions on 50 images, answers as JSONL")
    o.add_argument("--checkpoint", required=True, help="owl_jax params dir")
    o.add_argument("--tokenizer", default=None, help="tokenizer dir or .model (default: in the checkpoint dir)")
    o.add_argument("--data", required=True, help="OwlEval dir (questions.jsonl, images/)")
    o.add_argument("--out", required=True, help="answers .jsonl (a rerun keeps the answers already there)")
    o.add_argument("--batch-size", type=int, default=16)
    o.add_argument("--max-new-tokens", type=int, default=512)
    o.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    o.add_argument("--temperature", type=float, default=1.0)
    o.add_argument("--top-k", type=int, default=0)
    o.add_argument("--top-p", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--model-id", default=None, help="model_id field (default: owl_jax:<checkpoint dir name>)")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--prompt-tokenization", choices=PROMPT_TOKENIZATIONS, default="release",
                   help="release: as the released processor (text split on <image> only); training: as in training")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        o.error(f"--batch-size {args.batch_size}: expected >= 1")
    try:
        return _owleval(args)
    except (ValueError, OSError) as e:  # a bad argument or input file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _owleval(args: argparse.Namespace) -> int:
    from owl_jax.inference.api import find_tokenizer, load, load_image, open_tokenizer
    from owl_jax.params_io import load_config

    # Everything the run reads is checked before the params load (minutes for 7B).
    checkpoint, data, out = absolute(args.checkpoint), absolute(args.data), absolute(args.out)
    model_id = args.model_id or "owl_jax:" + os.path.basename(os.path.normpath(checkpoint))
    questions, image_files = read_questions(data)
    saved = _resume(out, questions, model_id)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cfg = load_config(checkpoint)
    check_max_new_tokens(args.max_new_tokens, cfg, checkpoint)
    tokenizer = open_tokenizer(absolute(args.tokenizer) or find_tokenizer(checkpoint), cfg, checkpoint)
    pixels = {name: load_image(path, cfg.vision.image_size) for name, path in image_files.items()}
    owl = load(checkpoint, tokenizer=tokenizer, prompt_tokenization=args.prompt_tokenization)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    rows = answer_owleval(owl, questions, pixels, out, args.batch_size, sampling, model_id, saved,
                          progress=not args.no_progress)
    print(f"wrote {len(rows)} answers to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
