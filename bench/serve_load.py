"""HTTP API under load: N concurrent chat requests against the same N sent one at a time, through the
real server (uvicorn on loopback, owl_jax/serve), greedy.

    python bench/serve_load.py [--checkpoint DIR] [--requests 64] [--max_tokens 32] [--max_batch 8]
    python bench/serve_load.py --quick      # a CI-sized run

Without --checkpoint a random model is built: the vision side of the tests' small owl and a LLaMA of
--layers x --hidden, with a SentencePiece tokenizer trained on the prompts (its vocabulary is the
model's). Prompts are distinct sentences of 8-24 words, half with an image. Reports requests/s,
completion tokens/s and p50/p99 latency of each way, and the ratio; checks that every concurrent
answer equals the one-at-a-time answer.
"""
from __future__ import annotations

import base64
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from absl import flags

from owl_jax import cli

WORDS = ("red blue green circle square triangle left right above below small large shape colour count "
         "picture scene object near far bright dark").split()


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "owl_jax params dir with its tokenizer (default: a random model)",
                        flag_values=fv)
    flags.DEFINE_integer("requests", 64, "requests sent at once (and then one at a time)", flag_values=fv)
    flags.DEFINE_integer("max_tokens", 32, "max_tokens of each request", flag_values=fv)
    flags.DEFINE_integer("max_batch", 8, "the server's batch", flag_values=fv)
    flags.DEFINE_integer("layers", 4, "random model: LLaMA layers", flag_values=fv)
    flags.DEFINE_integer("hidden", 512, "random model: LLaMA hidden size", flag_values=fv)
    flags.DEFINE_bool("quick", False, "8 requests, 8 tokens, a 2-layer model of 128", flag_values=fv)
    return fv


def random_model(out: str, prompts: list[str], layers: int, hidden: int) -> str:
    from owl_jax.data.conversation import SYSTEM_PROMPT
    from owl_jax.data.tokenizer import load_tokenizer, train_tokenizer
    from owl_jax.models.config import AbstractorConfig, LlamaConfig, OwlConfig, VisionConfig
    from owl_jax.models.owl import init_params
    from owl_jax.params_io import save_params

    train_tokenizer([SYSTEM_PROMPT] + prompts * 4, out, vocab_size=512)
    vocab = len(load_tokenizer(out))
    cfg = OwlConfig(
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, mlp_size=128),
        abstractor=AbstractorConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_size=88, num_queries=8,
                                    encoder_hidden_size=64),
        llm=LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=8,
                        mlp_size=int(hidden * 2.6875), max_position_embeddings=512))
    import flax.linen as nn

    save_params(out, jax.tree_util.tree_map(np.asarray, nn.unbox(init_params(cfg, jax.random.PRNGKey(0)))), cfg)
    return out


def png_data_url(seed: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def post(url: str, body: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.loads(r.read())
    return reply, time.perf_counter() - start


def measure(url: str, bodies: list[dict], concurrent: bool) -> dict:
    replies: list = [None] * len(bodies)
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, post(url, bodies[i])))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, body in enumerate(bodies):
            replies[i] = post(url, body)
    wall = time.perf_counter() - start
    latency = np.asarray([r[1] for r in replies])
    tokens = sum(r[0]["usage"]["completion_tokens"] for r in replies)
    return {"answers": [r[0]["choices"][0]["message"]["content"] for r in replies], "wall_s": wall,
            "requests_per_s": len(bodies) / wall, "tokens_per_s": tokens / wall,
            "p50_s": float(np.percentile(latency, 50)), "p99_s": float(np.percentile(latency, 99))}


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_flags(argv, _flags(), __doc__)
    n, max_tokens, layers, hidden = ((8, 8, 2, 128) if args.quick else
                                     (args.requests, args.max_tokens, args.layers, args.hidden))
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 25)))) + "?" for _ in range(n)]
    import uvicorn

    from owl_jax.inference.api import load
    from owl_jax.serve.__main__ import warm_up
    from owl_jax.serve.batcher import Batcher
    from owl_jax.serve.openai_api import create_app

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_model(tmp, prompts, layers, hidden)
        owl = load(checkpoint)
        batcher = Batcher(owl, max_batch=args.max_batch, max_new_tokens=max_tokens, wait_s=0.01)
        warm_up(batcher)
        server = uvicorn.Server(uvicorn.Config(create_app(batcher, "owl"), host="127.0.0.1", port=0,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        image = lambda i: [{"type": "image_url", "image_url": {"url": png_data_url(i)}}] if i % 2 else []
        bodies = [{"model": "owl", "max_tokens": max_tokens, "temperature": 0,  # greedy: comparable answers
                   "messages": [{"role": "user", "content": [{"type": "text", "text": p}] + image(i)}]}
                  for i, p in enumerate(prompts)]
        measure(url, bodies, concurrent=True)  # every prompt bucket either way compiled before the timed runs
        measure(url, bodies, concurrent=False)
        together = measure(url, bodies, concurrent=True)
        alone = measure(url, bodies, concurrent=False)
        server.should_exit = True
        thread.join()
    same = sum(a == b for a, b in zip(together["answers"], alone["answers"]))
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores); {n} requests of max_tokens {max_tokens}, server batch {batcher.max_batch}, "
          f"LLaMA {owl.cfg.llm.num_layers} x {owl.cfg.llm.hidden_size}")
    for name, m in (("one at a time", alone), ("concurrent", together)):
        print(f"{name}: {m['requests_per_s']:.2f} requests/s, {m['tokens_per_s']:.1f} tokens/s, "
              f"latency p50 {m['p50_s'] * 1000:.0f} ms, p99 {m['p99_s'] * 1000:.0f} ms")
    print(f"answers equal one at a time: {same}/{n}")
    print(f"concurrent/one at a time requests/s = {together['requests_per_s'] / alone['requests_per_s']:.2f}x")
    return 0 if same == n else 1


if __name__ == "__main__":
    sys.exit(main())
