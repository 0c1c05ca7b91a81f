"""`python -m owl_jax.serve`: chat with a checkpoint over HTTP.

    python -m owl_jax.serve --checkpoint DIR [--port 8000] [--host 127.0.0.1] [--dtype bfloat16] [--int8]
        [--max_batch 8] [--max_new_tokens 512] [--batch_wait_ms 10]

serves the web demo at `/` (owl_jax/serve/web.py; --noweb: none), `POST /v1/chat/completions`
(OpenAI's chat format, `stream: true` as server-sent events) and `GET /v1/models`; requests that
arrive together are decoded together (owl_jax/serve/batcher.py). The first request of each
prompt-length bucket compiles; `--warmup` compiles a short question's, greedy
and sampled, with and without an image, before the port opens. SIGTERM (or Ctrl-C): no new
connections, the requests in flight are answered, then exit 0.
"""
from __future__ import annotations

import signal
import sys
from typing import Sequence

from absl import flags

from owl_jax import cli
from owl_jax.cli import EXIT_USER_ERROR, absolute


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "owl_jax params dir (owl_config.json + params)", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir or .model file (default: in the checkpoint dir)",
                        flag_values=fv)
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)", flag_values=fv)
    flags.DEFINE_integer("port", 8000, "port to listen on", flag_values=fv)
    flags.DEFINE_string("dtype", None, "cast weights and compute (e.g. bfloat16)", flag_values=fv)
    flags.DEFINE_bool("int8", False, "the LLM's weights in int8 (qwix): 7B's in 7.1 GiB instead of bf16's 13.3; "
                      "the KV cache of a batch comes on top (max_batch x (prompt + max_new_tokens) x 0.5 MiB for "
                      "7B)", flag_values=fv)
    flags.DEFINE_string("model_name", "owl_jax", "the model id the API reports", flag_values=fv)
    flags.DEFINE_integer("max_batch", 8, "most requests decoded together (rounded up to a power of two)",
                         flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 512, "most tokens an answer may ask for (max_tokens)", flag_values=fv)
    flags.DEFINE_integer("max_media", 8, "most images and videos in one request", flag_values=fv)
    flags.DEFINE_float("batch_wait_ms", 10.0, "how long the first request of a batch waits for others",
                       flag_values=fv)
    flags.DEFINE_bool("web", True, "the web demo at / (gradio) beside the API", flag_values=fv)
    flags.DEFINE_bool("warmup", True, "compile a short question's programs (greedy and sampled, with and without "
                      "an image) before serving", flag_values=fv)
    return fv


def build(args: flags.FlagValues):
    """The app and its batcher for parsed flags (the model loaded)."""
    from owl_jax.inference.api import load
    from owl_jax.serve.batcher import Batcher
    from owl_jax.serve.openai_api import create_app

    owl = load(absolute(args.checkpoint), tokenizer=absolute(args.tokenizer), dtype=args.dtype,
               quantize="int8" if args.int8 else None)
    if not 1 <= args.max_new_tokens < owl.cfg.llm.max_position_embeddings:
        raise cli.UserError(f"--max_new_tokens {args.max_new_tokens}: expected 1 to "
                            f"{owl.cfg.llm.max_position_embeddings - 1} (the model's positions)")
    batcher = Batcher(owl, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                      wait_s=args.batch_wait_ms / 1000)
    if args.warmup:
        warm_up(batcher)
    app = create_app(batcher, args.model_name, args.max_media)
    if args.web:
        from owl_jax.serve import web

        app = web.mount(app, batcher)
    return app, batcher


def warm_up(batcher) -> None:
    """Compiles the batch programs for a one-line question, greedy and sampled, with and without an
    image; a model that cannot answer fails here, before the port opens."""
    import queue

    import numpy as np

    from owl_jax.inference.sampling import Sampling
    from owl_jax.serve.batcher import Request

    owl = batcher.owl
    size = owl.cfg.vision.image_size
    for images in ([], [np.zeros((size, size, 3), np.float32)]):
        for sampling in (Sampling(), Sampling(do_sample=True)):
            outcome: queue.Queue = queue.Queue()
            ids = owl.encode(owl.prompt_text(len(images), "Hello."))
            batcher.submit(Request(ids, images, [], 1, sampling, on_text=lambda _: None,
                                   on_done=lambda *_, q=outcome: q.put(None),
                                   on_error=lambda e, q=outcome: q.put(e)))
            error = outcome.get()
            if error is not None:
                raise error


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_flags(argv, _flags(), __doc__, required=("checkpoint",))
    try:
        import uvicorn
    except ImportError:
        cli.fail("the server needs FastAPI and uvicorn: pip install 'owl_jax[serve]'")
    try:
        app, _ = build(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    # uvicorn stops on SIGTERM/SIGINT: no new connections, in-flight requests answered, then the app's
    # shutdown closes the batcher. It then raises the signal again with the handler it found; after a
    # finished shutdown that is a clean exit, so that handler does nothing.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=600)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
