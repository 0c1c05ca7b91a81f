"""Training-step throughput on the `bench_small` shape: owl_jax vs PyTorch.

    JAX_PLATFORMS=cpu python bench/train_throughput.py [--steps 5] [--stage all|stage1|stage2_lora] [--scan]

bench_small (docs/design.md, 5): ViT 4 x 256 on 224 x 224 (patch 14), abstractor 2 x 256 (FFN 704, 64
queries), LLaMA 4 x 512 (FFN 1376, 8 heads, vocab 32000), batch 4 x 513 tokens with one image each,
AdamW, fp32. The PyTorch side is the released-layout oracle of the tests (tests/torch_oracle.py:
CLIP-style vision + abstractor, transformers' LlamaForCausalLM) with torch.optim.AdamW on the same
trainable set. Steps alternate between the two; medians after one warm-up step each. Reports
ms/step, tokens/s, analytic GFLOP/s and its fraction of this machine's measured fp32 matmul rate.
owl_jax runs its 4 + 2 + 4 layers unrolled over the stacked params (`scan_unroll=0`), the faster
choice on CPU at this depth; `--scan` keeps the layer scans the 7B recipes use.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax
import jax.numpy as jnp
import numpy as np
import torch


def matmul_rate() -> float:
    """fp32 GFLOP/s of a large jitted matmul (the machine's practical peak)."""
    n = 2048
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def bench_config(stage: str):
    from owl_jax.configs import load_config_file

    c = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", f"tiny.py:{stage}"))
    c.model.vision.update(image_size=224, patch_size=14, hidden_size=256, num_layers=4, num_heads=4, mlp_size=1024)
    c.model.abstractor.update(hidden_size=256, num_layers=2, num_heads=4, ffn_size=704, num_queries=64,
                              encoder_hidden_size=256, attention_dropout=0.0)
    c.model.llm.update(vocab_size=32000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, mlp_size=1376,
                       max_position_embeddings=1024)
    c.update(batch_size=4, seq_len=513, max_images_per_batch=4)
    c.optim.update(warmup_steps=1, clip_norm=0.0)
    c.model.lora.dropout = 0.0
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--stage", default="all")
    p.add_argument("--scan", action="store_true", help="keep the layer scans (scan_unroll=1; default: 0, unrolled)")
    args = p.parse_args()

    from torch_oracle import OwlOracle

    from owl_jax.convert import to_torch
    from owl_jax.sharding import make_mesh
    from owl_jax.training.flops import StepShape, towers_of, train_step_flops
    from owl_jax.training.synthetic import RandomBatches
    from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

    config = bench_config(args.stage)
    config.model.scan_unroll = 1 if args.scan else 0
    trainer = Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    cfg = trainer.model_cfg
    data = RandomBatches(batch_size=4, seq_len=513, max_images=4, images_per_sample=1, vocab_size=32000,
                         tokens_per_image=cfg.tokens_per_image, image_size=224)
    host = stack_micro_batches([next(data)])
    step = trainer.jit_train_step({k: v.shape for k, v in host.items()})
    state = trainer.init_state(jax.random.PRNGKey(0))
    batch = global_batch(host, step.batch_shardings)

    # The same weights in PyTorch (LoRA merged away: the torch side trains the same towers, no adapters).
    with tempfile.TemporaryDirectory() as d:
        to_torch(jax.device_get(trainer.params(state)), cfg, d)
        oracle = OwlOracle.from_pretrained(d).train()
    trainable_towers = towers_of(trainer.trainable_paths)
    prefixes = {"vision": ("vision_model",), "abstractor": ("abstractor", "query_tokens"), "llm": ("language_model",)}
    names = tuple(x for t in trainable_towers for x in prefixes.get(t, ()))
    params = [p for n, p in oracle.named_parameters() if n.startswith(names)]
    for n, p in oracle.named_parameters():
        p.requires_grad_(n.startswith(names))
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.tensor(host["input_ids"][0], dtype=torch.long)
    mask = torch.tensor(host["attention_mask"][0])
    loss_mask = torch.tensor(host["loss_mask"][0], dtype=torch.float32)
    pixels = torch.tensor(host["pixel_values"][0])
    num_images = torch.tensor(host["num_images"][0])

    def torch_step():
        logits = oracle(ids, pixels, num_images, mask)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].clamp(min=0).reshape(-1),
                                               reduction="none")
        w = loss_mask[:, 1:].reshape(-1)
        loss = (ce * w).sum() / w.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def jax_step():
        nonlocal state
        state, metrics = step(state, batch)
        return float(metrics["loss"])

    jax_step(), torch_step()  # warm-up (compile, allocator)
    jt, tt = [], []
    for _ in range(args.steps):
        t = time.perf_counter(); jax_step(); jt.append(time.perf_counter() - t)
        t = time.perf_counter(); torch_step(); tt.append(time.perf_counter() - t)
    flops = train_step_flops(cfg, StepShape(4, 513, 4), trainable_towers)
    rate = matmul_rate()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} cpus={os.cpu_count()} jax {jax.__version__} "
          f"torch {torch.__version__} threads={torch.get_num_threads()} loadavg={os.getloadavg()[0]:.1f}")
    print(f"# stage {args.stage}{' (layer scans)' if args.scan else ' (layers unrolled)'}: trains {sorted(trainable_towers)}; analytic {flops / 1e9:.1f} GFLOP/step; "
          f"fp32 matmul rate {rate:.0f} GFLOP/s")
    print("| impl | ms/step (median) | tokens/s | GFLOP/s | of matmul rate |\n|---|---|---|---|---|")
    for name, ts in (("owl_jax", jt), ("PyTorch", tt)):
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.0f} | {4 * 513 / m:.0f} | {flops / m / 1e9:.1f} | {flops / m / 1e9 / rate:.0%} |")
    print(f"owl_jax speed-up: {statistics.median(tt) / statistics.median(jt):.2f}x")


if __name__ == "__main__":
    main()
