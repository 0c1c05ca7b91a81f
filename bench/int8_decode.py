"""Decode speed with int8 weights against bf16: the same random model, prompts and greedy decoding.

    python bench/int8_decode.py [--batch 1,8] [--prompt_len 64] [--new_tokens 128] [--layers 4] [--hidden 1024]

A random owl (the tests' small vision side, a LLaMA of --layers x --hidden, vocab 32000) is decoded in
bf16 (weights and compute) and with its LLM weights int8 (models/quantization.py, compute bf16):
exactly --new_tokens tokens a sample (EOS off), text-only prompts. tokens/s = batch x new tokens /
wall time of the whole call (prefill included), best of --repeats interleaved calls after a warm-up
call each. Also reports the LLM weights' bytes and how many greedy tokens agree.
"""
from __future__ import annotations

import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from decode_flags import define_decode_flags
from flax import linen as nn

from owl_jax import cli


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    define_decode_flags(fv, hidden=1024)  # MLP 2.6875x, heads of 64
    return fv


def llm_bytes(params) -> int:
    leaves = jax.tree_util.tree_leaves(nn.unbox(params["language_model"]))
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_flags(argv, _flags(), __doc__)
    from owl_jax.inference.api import int8_model
    from owl_jax.inference.engine import Generator, make_batch
    from owl_jax.inference.sampling import Sampling
    from owl_jax.models.config import AbstractorConfig, LlamaConfig, OwlConfig, VisionConfig
    from owl_jax.models.owl import init_params

    h = args.hidden
    cfg = OwlConfig(
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, mlp_size=128),
        abstractor=AbstractorConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_size=88, num_queries=8,
                                    encoder_hidden_size=64),
        llm=LlamaConfig(vocab_size=32000, hidden_size=h, num_layers=args.layers, num_heads=h // 64,
                        num_kv_heads=h // 64, mlp_size=int(h * 2.6875), max_position_embeddings=2048),
        dtype="bfloat16", param_dtype="bfloat16")
    params = jax.device_get(nn.unbox(init_params(cfg, jax.random.PRNGKey(0))))
    int8_params, int8_cfg = int8_model(params, cfg)
    sides = {"bf16": Generator(jax.device_put(params), cfg), "int8": Generator(int8_params, int8_cfg)}
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores); LLaMA {args.layers} x {h}, vocab 32000; LLM weights: bf16 "
          f"{llm_bytes(sides['bf16'].params) / 2**20:.0f} MiB, int8 {llm_bytes(int8_params) / 2**20:.0f} MiB")
    rng = np.random.default_rng(0)
    sampling = Sampling(max_new_tokens=args.new_tokens)
    for b in cli.positive_ints(args.batch):
        prompts = [np.concatenate([[1], rng.integers(3, 32000, args.prompt_len - 1)]).astype(np.int32)
                   for _ in range(b)]
        batch = make_batch(prompts, None, [0] * b, cfg, buckets=False)
        best, tokens = {}, {}
        for name, gen in sides.items():  # warm-up: compile
            tokens[name] = gen.generate(batch, sampling, disable_eos=True)["tokens"]
        for _ in range(args.repeats):
            for name, gen in sides.items():
                start = time.perf_counter()
                gen.generate(batch, sampling, disable_eos=True)
                best[name] = min(best.get(name, np.inf), time.perf_counter() - start)
        rate = {name: b * args.new_tokens / t for name, t in best.items()}
        agree = float((tokens["bf16"] == tokens["int8"]).mean())
        print(f"batch {b}: bf16 {rate['bf16']:.1f} tokens/s, int8 {rate['int8']:.1f} tokens/s "
              f"({rate['int8'] / rate['bf16']:.2f}x); greedy tokens equal {agree:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
