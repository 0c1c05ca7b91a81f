"""The `python -m owl_jax.generate` command line; the decoding itself is `owl_jax.inference.engine`.

Command line::

    python -m owl_jax.generate --checkpoint DIR --image a.jpg [--image b.jpg] --prompt "..."
    python -m owl_jax.generate --checkpoint DIR --image a.jpg --interactive

The checkpoint's config, the tokenizer, the images and the prompt are read and checked before the
params load; a mistake is one line on stderr (`error: ...`, exit status 2).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from owl_jax.cli import EXIT_USER_ERROR, UserError, absolute
from owl_jax.data.text import PROMPT_TOKENIZATIONS, encode_prompt
from owl_jax.inference.engine import Sampling, check_context, check_max_new_tokens


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m owl_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="owl_jax params dir (owl_config.json + params)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or .model file (default: in the checkpoint dir)")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several images)")
    p.add_argument("--prompt", default=None, help="the question (one turn)")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=8, help="tokens decoded between prints (streaming)")
    p.add_argument("--prompt-tokenization", choices=PROMPT_TOKENIZATIONS, default="release",
                   help="release: as the released processor (text split on <image> only); training: as in training")
    return p


def _check_question(text: str, what: str, num_images: int) -> None:
    """The template puts each image on a 'Human: <image>' line of its own before the conversation; an
    <image> tag typed into a question would stand for an image that was not given."""
    from owl_jax.data.conversation import count_image_tags

    tags = count_image_tags(text)
    if tags:
        raise UserError(f"{what} has {tags} <image> tag(s) and {num_images} --image was given: leave the tags out, "
                        "each --image goes before the question on a 'Human: <image>' line of its own")


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> int:
    args = _parser().parse_args(argv)
    if not args.interactive and args.prompt is None:
        _parser().error("give --prompt or --interactive")
    try:
        return _chat(args, stdin or sys.stdin, stdout or sys.stdout)
    except (ValueError, OSError) as e:  # a bad argument or input file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _chat(args: argparse.Namespace, stdin, stdout) -> int:
    from owl_jax.data.conversation import build_prompt
    from owl_jax.inference.api import find_tokenizer, load, load_image, open_tokenizer
    from owl_jax.params_io import load_config

    # Everything the request names is read and checked before the params load (minutes for 7B).
    checkpoint = absolute(args.checkpoint)
    cfg = load_config(checkpoint)
    check_max_new_tokens(args.max_new_tokens, cfg, checkpoint)
    tokenizer = open_tokenizer(absolute(args.tokenizer) or find_tokenizer(checkpoint), cfg, checkpoint)
    images = [load_image(absolute(p), cfg.vision.image_size) for p in args.image]  # float32 [S, S, 3] each
    if args.prompt is not None:
        _check_question(args.prompt, "--prompt", len(images))
        ids = encode_prompt(build_prompt(len(images), [], args.prompt), tokenizer, cfg.tokens_per_image,
                            args.prompt_tokenization)
        check_context(len(ids), args.max_new_tokens, cfg, "--prompt")
    owl = load(checkpoint, tokenizer=tokenizer, prompt_tokenization=args.prompt_tokenization)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    def answer(messages):
        pieces = owl.chat_stream(images=images, messages=messages, sampling=sampling, chunk=args.chunk)
        stdout.write("AI: ")
        stdout.flush()
        while True:
            try:
                piece = next(pieces)
            except StopIteration as stop:
                text = stop.value
                break
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        return text

    messages: list[dict] = []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        messages.append({"role": "assistant", "content": answer(messages)})
    if args.interactive:
        while True:
            stdout.write("Human: ")
            stdout.flush()
            line = stdin.readline()
            if not line:
                break
            question = line.rstrip("\n")
            if question.strip() in ("/exit", "/quit"):
                break
            if question.strip() == "/reset":
                messages = []
                continue
            if not question.strip():
                continue
            asked = messages + [{"role": "user", "content": question}]
            try:  # a question the model cannot take is refused; the conversation so far stays
                _check_question(question, "the question", len(images))
                text = answer(asked)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            messages = asked + [{"role": "assistant", "content": text}]
    return 0


if __name__ == "__main__":
    sys.exit(main())
