"""The `python -m owl_jax.generate` command line; the decoding itself is `owl_jax.inference.engine`.

Command line::

    python -m owl_jax.generate --checkpoint DIR --image a.jpg [--image b.jpg] --prompt "..."
    python -m owl_jax.generate --checkpoint DIR --image a.jpg --interactive [--max_new_tokens 512] [--int8]
        [--sample --temperature 0.7 --top_k 50 --top_p 0.9 --seed 0]
    python -m owl_jax.generate --checkpoint VIDEO_DIR --video clip.mp4 [--image a.jpg] --prompt "..."

The checkpoint's config, the tokenizer, the images, the videos and the prompt are read and checked
before the params load; a mistake is one line on stderr (`error: ...`, exit status 2).
"""
from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from owl_jax import cli
from owl_jax.cli import EXIT_USER_ERROR, UserError, absolute
from owl_jax.data.text import PROMPT_TOKENIZATIONS, encode_prompt
from owl_jax.inference.engine import check_context, check_max_new_tokens
from owl_jax.inference.sampling import Sampling


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "owl_jax params dir (owl_config.json + params)", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir or .model file (default: in the checkpoint dir)",
                        flag_values=fv)
    flags.DEFINE_multi_string("image", [], "image path, in the order the conversation shows them", flag_values=fv)
    flags.DEFINE_multi_string("video", [], "video path (the video model), in order, shown after the images",
                              flag_values=fv)
    flags.DEFINE_string("prompt", None, "the question (one turn)", flag_values=fv)
    flags.DEFINE_bool("interactive", False, "multi-turn chat on stdin", flag_values=fv)
    flags.DEFINE_integer("chunk", 8, "tokens decoded between prints (streaming)", flag_values=fv)
    flags.DEFINE_bool("int8", False, "the LLM's weights in int8 (qwix; about half the bytes of bf16)", flag_values=fv)
    define_decoding_flags(fv)
    return fv


def define_decoding_flags(fv: flags.FlagValues) -> None:
    """The decoding flags, shared with `python -m owl_jax.evaluate owleval`; `sampling(fv)` reads them."""
    flags.DEFINE_integer("max_new_tokens", 512, "most tokens generated per answer", flag_values=fv)
    flags.DEFINE_bool("sample", False, "sample (default: greedy)", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "with --sample: the sampling temperature (<= 0: greedy)", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "with --sample: keep the k likeliest tokens (0: all)", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "with --sample: keep the fewest likeliest tokens whose probabilities sum to p "
                       "(1.0: all)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "with --sample: the sampling seed", flag_values=fv)
    flags.DEFINE_enum("prompt_tokenization", "release", PROMPT_TOKENIZATIONS,
                      "release: as the released processor (text split on <image> only); training: as in training",
                      flag_values=fv)


def sampling(fv: flags.FlagValues) -> Sampling:
    """The Sampling the flags of define_decoding_flags give."""
    return Sampling(max_new_tokens=fv.max_new_tokens, do_sample=fv.sample, temperature=fv.temperature,
                    top_k=fv.top_k, top_p=fv.top_p, seed=fv.seed)


def _check_question(text: str, what: str, num_images: int, num_videos: int = 0, video_model: bool = False) -> None:
    """The template puts each image (clip) on a 'Human: <image>' ('Human: <|video|>') line of its own
    before the conversation; a tag typed into a question would stand for one that was not given."""
    from owl_jax.data.conversation import count_image_tags, count_video_tags

    tags = count_image_tags(text)
    if tags:
        raise UserError(f"{what} has {tags} <image> tag(s) and {num_images} --image was given: leave the tags out, "
                        "each --image goes before the question on a 'Human: <image>' line of its own")
    tags = count_video_tags(text) if video_model else 0
    if tags:
        raise UserError(f"{what} has {tags} <|video|> tag(s) and {num_videos} --video was given: leave the tags "
                        "out, each --video goes before the question on a 'Human: <|video|>' line of its own")


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = cli.parse_flags(argv, _flags(), __doc__, required=("checkpoint",))
    if not args.interactive and args.prompt is None:
        cli.fail("give --prompt or --interactive")
    try:
        return _chat(args, stdin or sys.stdin, stdout or sys.stdout)
    except (ValueError, OSError) as e:  # a bad argument or input file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _chat(args: flags.FlagValues, stdin, stdout) -> int:
    from owl_jax.data.conversation import build_prompt
    from owl_jax.inference.api import find_tokenizer, load, open_tokenizer
    from owl_jax.inference.media import load_clip, load_image
    from owl_jax.params_io import load_config

    # Everything the request names is read and checked before the params load (minutes for 7B).
    checkpoint = absolute(args.checkpoint)
    cfg = load_config(checkpoint)
    check_max_new_tokens(args.max_new_tokens, cfg, checkpoint)
    tokenizer = open_tokenizer(absolute(args.tokenizer) or find_tokenizer(checkpoint), cfg, checkpoint)
    images = [load_image(absolute(p), cfg.vision.image_size) for p in args.image]  # float32 [S, S, 3] each
    if args.video and not cfg.video:
        raise UserError(f"--video needs the video model; the model in {checkpoint} reads images only")
    clips = [load_clip(absolute(p), cfg.vision.image_size) for p in args.video]  # float32 [f, S, S, 3] each
    media = (len(images), len(clips), cfg.video)
    if args.prompt is not None:
        _check_question(args.prompt, "--prompt", *media)
        ids = encode_prompt(build_prompt(len(images), [], args.prompt, num_videos=len(clips)), tokenizer,
                            cfg.tokens_per_image, args.prompt_tokenization, video_tags=cfg.video)
        check_context(len(ids), args.max_new_tokens, cfg, "--prompt")
    owl = load(checkpoint, tokenizer=tokenizer, prompt_tokenization=args.prompt_tokenization,
               quantize="int8" if args.int8 else None)

    def answer(messages):
        pieces = owl.chat_stream(images=images, messages=messages, sampling=sampling(args), chunk=args.chunk,
                                 videos=clips)
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
                _check_question(question, "the question", *media)
                text = answer(asked)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            messages = asked + [{"role": "assistant", "content": text}]
    return 0


if __name__ == "__main__":
    sys.exit(main())
