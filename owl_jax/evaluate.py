"""Benchmark runners. `python -m owl_jax.evaluate owleval --checkpoint DIR --data DIR --out answers.jsonl`

The OwlEval runner and its rules (questions, conversations, resuming) are owl_jax/inference/owleval.py;
--help prints its docstring and the flags.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from owl_jax import cli
from owl_jax.cli import EXIT_USER_ERROR, absolute
from owl_jax.generate import define_decoding_flags, sampling
from owl_jax.inference import owleval
from owl_jax.inference.engine import check_max_new_tokens
from owl_jax.inference.owleval import _resume, answer_owleval, read_questions


def _owleval_flags() -> flags.FlagValues:
    """The owleval command's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "owl_jax params dir", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir or .model (default: in the checkpoint dir)", flag_values=fv)
    flags.DEFINE_string("data", None, "OwlEval dir (questions.jsonl, images/)", flag_values=fv)
    flags.DEFINE_string("out", None, "answers .jsonl (a rerun keeps the answers already there)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "questions decoded together", flag_values=fv)
    define_decoding_flags(fv)
    flags.DEFINE_string("model_id", None, "model_id field (default: owl_jax:<checkpoint dir name>)", flag_values=fv)
    flags.DEFINE_bool("progress", True, "a progress bar (--noprogress: none)", flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> int:
    """argv: the arguments after the program's name, the benchmark first (None: sys.argv's)."""
    commands = {"owleval": cli.Command(_owleval_flags(), "OwlEval: 82 questions on 50 images, answers as JSONL",
                                       required=("checkpoint", "data", "out"))}
    _, args = cli.parse_command(argv, commands, __doc__.split("\n\n")[0] + "\n\n" + owleval.__doc__)
    if args.batch_size < 1:
        cli.fail(f"--batch_size {args.batch_size}: expected >= 1")
    try:
        return _owleval(args)
    except (ValueError, OSError) as e:  # a bad argument or input file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _owleval(args: flags.FlagValues) -> int:
    from owl_jax.inference.api import find_tokenizer, load, open_tokenizer
    from owl_jax.inference.media import load_image
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
    rows = answer_owleval(owl, questions, pixels, out, args.batch_size, sampling(args), model_id, saved,
                          progress=args.progress)
    print(f"wrote {len(rows)} answers to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
