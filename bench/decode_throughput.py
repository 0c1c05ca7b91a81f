"""Decode throughput: owl_jax's jitted KV-cache decoding vs transformers' PyTorch
`LlamaForCausalLM.generate`, same LLaMA shape and weights, same prompts, greedy, fp32 (or both
sides in bf16: --dtype bfloat16, weights and compute, as `owl_jax.load(path, dtype=...)` and
`model.to(torch.bfloat16)` give them).

    python bench/decode_throughput.py [--batch 1,8] [--prompt_len 64] [--new_tokens 128] [--dtype bfloat16]

One random LLaMA (default: 4 layers x 512, 8 heads, MLP 1376, vocab 32000 — the small config of
docs/design.md, 5) is built in transformers, saved, and converted into an owl_jax model (tiny vision side,
text-only prompts), so both sides run the same weights. Each side generates exactly --new_tokens
tokens per sample (EOS off); tokens/s = batch x new tokens / wall time of the whole call (prefill
included), best of --repeats interleaved calls after one warm-up call each (compilation on the JAX
side). Also reports whether the greedy tokens agree. --also_training_layout adds decoding with the
params as trained (layers under nn.scan), timed in the same interleaved loop.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
from absl import flags
from decode_flags import define_decode_flags

from owl_jax import cli


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    define_decode_flags(fv, hidden=512)
    flags.DEFINE_integer("heads", 8, "LLaMA attention heads", flag_values=fv)
    flags.DEFINE_integer("mlp", 1376, "LLaMA MLP size", flag_values=fv)
    flags.DEFINE_integer("vocab", 32000, "vocabulary size", flag_values=fv)
    flags.DEFINE_integer("torch_threads", None, "default: torch's own", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                      "weights and compute on both sides (bf16 reads half the bytes a decode step)", flag_values=fv)
    flags.DEFINE_bool("training_layout", False,
                      "decode with the params as trained (LLM layers under nn.scan, LM head [D, V]) instead of "
                      "the decode layout (layers unrolled, LM head [V, D])", flag_values=fv)
    flags.DEFINE_bool("also_training_layout", False,
                      "also time decoding with the training layout, interleaved in the same loop (the "
                      "before/after of the decode layout under the same load)", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = cli.parse_flags(argv, _flags(), __doc__)

    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from owl_jax.convert import from_torch
    from owl_jax.inference.engine import Generator, Sampling, make_batch
    from owl_jax.models.config import AbstractorConfig, LlamaConfig, OwlConfig, VisionConfig

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf_cfg = HFLlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # peaked logits: greedy choices are no near-ties
        hf.lm_head.weight.mul_(50.0)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    cfg = OwlConfig(
        vision=VisionConfig(image_size=28, patch_size=14, hidden_size=32, num_layers=1, num_heads=2, mlp_size=64),
        abstractor=AbstractorConfig(hidden_size=32, num_layers=1, num_heads=2, ffn_size=64, num_queries=4,
                                    encoder_hidden_size=32),
        llm=LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                        num_kv_heads=args.heads, mlp_size=args.mlp, max_position_embeddings=2048),
    )
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        params, _ = from_torch(cfg, llama=d)
    if args.dtype != "float32":  # as owl_jax.inference.api.from_params(..., dtype=) and torch's .to(dtype)
        cfg = dataclasses.replace(cfg, dtype=args.dtype, param_dtype=args.dtype)
        params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jax.numpy.dtype(args.dtype)), params)
        hf = hf.to(getattr(torch, args.dtype))
    params = jax.device_put(params)
    gen = Generator(params, cfg, decode_layout=not args.training_layout)
    old = Generator(params, cfg, decode_layout=False) if args.also_training_layout else None
    sampling = Sampling(max_new_tokens=args.new_tokens)

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} cpus={os.cpu_count()} jax {jax.__version__} "
          f"({jax.devices()[0].platform}) torch {torch.__version__} threads={torch.get_num_threads()} "
          f"loadavg={os.getloadavg()[0]:.1f}")
    print(
        f"# LLaMA {args.layers}x{args.hidden} heads {args.heads} mlp {args.mlp} vocab {args.vocab}, {args.dtype}, "
        "greedy, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per sample"
    )
    extra = " owl_jax training layout tok/s |" if old else ""
    print(f"| batch | owl_jax tok/s | transformers tok/s | speed-up | tokens agree | owl_jax compile s |{extra}")
    print("|---|---|---|---|---|---|" + ("---|" if old else ""))
    rng = np.random.default_rng(0)
    for b in cli.positive_ints(args.batch):
        prompts = rng.integers(3, args.vocab, size=(b, args.prompt_len)).astype(np.int32)
        prompts[:, 0] = 1
        batch = make_batch(list(prompts), None, [0] * b, cfg, buckets=False)

        ids = torch.tensor(prompts, dtype=torch.long)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, use_cache=True)
        t0 = time.perf_counter()
        out = gen.generate(batch, sampling, disable_eos=True)
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            hf.generate(ids, **kw)  # warm-up
        if old:
            old.generate(batch, sampling, disable_eos=True)  # compile
        jax_s, torch_s, old_s = [], [], []
        for _ in range(args.repeats):  # interleaved, so all see the same machine load
            t0 = time.perf_counter()
            out = gen.generate(batch, sampling, disable_eos=True)
            jax_s.append(time.perf_counter() - t0)
            if old:
                t0 = time.perf_counter()
                old_out = old.generate(batch, sampling, disable_eos=True)
                old_s.append(time.perf_counter() - t0)
                assert (old_out["tokens"] == out["tokens"]).all()
            with torch.no_grad():
                t0 = time.perf_counter()
                ref = hf.generate(ids, **kw)
                torch_s.append(time.perf_counter() - t0)
        assert out["length"].tolist() == [args.new_tokens] * b
        ref = ref[:, args.prompt_len:].numpy()
        agree = float((ref == out["tokens"]).mean())
        ours, theirs = b * args.new_tokens / min(jax_s), b * args.new_tokens / min(torch_s)
        extra = f" {b * args.new_tokens / min(old_s):.0f} |" if old else ""
        print(f"| {b} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.1f}x | {agree:.0%} | {compile_s:.1f} |{extra}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
