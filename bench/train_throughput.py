"""Training-step throughput on the `bench_small` shape: owl_jax vs PyTorch (and, optionally, the release).

    JAX_PLATFORMS=cpu python bench/train_throughput.py [--steps 5] [--stage all|stage1|stage2_lora] [--scan]
        [--release_src DIR] [--bf16]

bench_small (docs/design.md, 5): ViT 4 x 256 on 224 x 224 (patch 14), abstractor 2 x 256 (FFN 704, 64
queries), LLaMA 4 x 512 (FFN 1376, 8 heads, vocab 32000), batch 4 x 513 tokens with one image each,
AdamW, fp32. The PyTorch side is the released-layout oracle of the tests (tests/torch_oracle.py:
CLIP-style vision + abstractor, transformers' LlamaForCausalLM) with torch.optim.AdamW on the same
trainable set. Steps alternate between the implementations; medians after one warm-up step each. Reports
ms/step, tokens/s, analytic GFLOP/s and its fraction of this machine's measured fp32 matmul rate, and the
first-step (pre-update, same weights) loss of each implementation. --bf16: every side computes in bf16
(the release's own training precision) with fp32 weights and optimiser: owl_jax with model.dtype
"bfloat16", the PyTorch sides under torch.autocast; the GFLOP/s column is still against the fp32 rate.
owl_jax runs its 4 + 2 + 4 layers unrolled over the stacked params (`scan_unroll=0`), the faster
choice on CPU at this depth; `--scan` keeps the layer scans the 7B recipes use.

--release_src DIR also times the released PyTorch code (X-PLUG/mPLUG-Owl, `MplugOwlForConditionalGeneration`
of mplug_owl/modeling_mplug_owl.py). DIR is a checkout of that repository, or of its `mPLUG-Owl/` folder,
outside this repository: the package is imported from there, nothing of it is copied here. It gets the same
weights (owl_jax.convert.to_torch's export, loaded with load_state_dict(strict=True)), the same batch, the same
trainable set (per --stage, as for the oracle: LoRA merged, the towers train) and torch.optim.AdamW. Its loss is
its own forward's: labels = input_ids with non_padding_mask, non_media_mask and prompt_mask as the release's
pipeline builds them (pipeline/utils.py `batchify`, no attention_mask; our padding is on the right, so causal
attention alone gives every loss position the same context), i.e. the mean next-token cross-entropy over answer
tokens, owl_jax's loss. The run stops if its first-step loss differs from owl_jax's by more than LOSS_TOLERANCE.
The release targets transformers 4.28-4.46; under 5.x it imports and runs with two shims, applied only where the
name is missing: `find_pruneable_heads_and_indices` / `prune_linear_layer` in transformers.pytorch_utils
(imported for head pruning, never called here) and its abstractor's `get_head_mask` / `invert_attention_mask`
(the 4.46 behaviour for what it passes: no head mask, a 0/1 padding mask). Without flash-attn it prints
"install flash-attn first." and runs its plain attention; its LLM is transformers' Llama, default attention.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(REPO, "tests"))

import jax  # noqa: E402 - after JAX_PLATFORMS is set
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402

from owl_jax import cli  # noqa: E402
from owl_jax.training.stages import STAGE_PATTERNS  # noqa: E402

# |release - owl_jax| first-step loss (~10.4), fp32 and bf16 compute: beyond it they compute different things
LOSS_TOLERANCE = {False: 1e-4, True: 5e-2}


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

    c = load_config_file(os.path.join(REPO, "configs", f"tiny.py:{stage}"))
    c.model.vision.update(image_size=224, patch_size=14, hidden_size=256, num_layers=4, num_heads=4, mlp_size=1024)
    c.model.abstractor.update(hidden_size=256, num_layers=2, num_heads=4, ffn_size=704, num_queries=64,
                              encoder_hidden_size=256, attention_dropout=0.0)
    c.model.llm.update(vocab_size=32000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, mlp_size=1376,
                       max_position_embeddings=1024)
    c.update(batch_size=4, seq_len=513, max_images_per_batch=4)
    c.optim.update(warmup_steps=1, clip_norm=0.0)
    c.model.lora.dropout = 0.0
    return c


# ------------------------------------------------------------------ the released code (--release_src)


def release_dir(src: str) -> str:
    """The folder holding the release's `mplug_owl` package: DIR or DIR/mPLUG-Owl, outside this repository."""
    src = os.path.realpath(src)
    if os.path.commonpath([src, REPO]) == REPO:
        cli.fail(f"--release_src {src}: inside this repository; give a checkout outside it")
    for d in (src, os.path.join(src, "mPLUG-Owl")):
        if os.path.isfile(os.path.join(d, "mplug_owl", "modeling_mplug_owl.py")):
            return d
    cli.fail(f"--release_src {src}: neither it nor its mPLUG-Owl/ holds mplug_owl/modeling_mplug_owl.py")


def _no_head_pruning(*args, **kwargs):
    raise NotImplementedError("head pruning (transformers < 5 only)")


def _get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False) -> list[None]:
    """transformers 4.46 `get_head_mask` for the one case the release uses: no head mask."""
    if head_mask is not None:
        raise NotImplementedError("head masks")
    return [None] * num_hidden_layers


def _invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
    """transformers 4.46 `invert_attention_mask`: 0/1 [B, S] or [B, T, S] -> additive float[B, 1, 1 or T, S]."""
    mask = (mask[:, None] if mask.dim() == 3 else mask[:, None, None]).to(self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def import_release(src: str) -> tuple[object, list[str]]:
    """(the release's mplug_owl.modeling_mplug_owl, the shims applied), imported from its checkout."""
    import transformers.pytorch_utils as pytorch_utils

    shims = []
    for name in ("find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(pytorch_utils, name):
            setattr(pytorch_utils, name, _no_head_pruning)
            shims.append(f"pytorch_utils.{name}")
    root = release_dir(src)
    sys.path.append(root)
    modeling = importlib.import_module("mplug_owl.modeling_mplug_owl")
    if os.path.commonpath([os.path.realpath(modeling.__file__), root]) != root:
        cli.fail(f"--release_src: `mplug_owl` resolves to {modeling.__file__}, not the checkout in {root}")
    abstractor = modeling.MplugOwlVisualAbstractorModel
    for name, fn in (("get_head_mask", _get_head_mask), ("invert_attention_mask", _invert_attention_mask)):
        if not hasattr(abstractor, name):
            setattr(abstractor, name, fn)
            shims.append(f"MplugOwlVisualAbstractorModel.{name}")
    return modeling, shims


def release_model(modeling, weights_dir: str) -> torch.nn.Module:
    """MplugOwlForConditionalGeneration on to_torch's config.json, every tensor of model.safetensors loaded."""
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    with open(os.path.join(weights_dir, "config.json")) as f:
        config = modeling.MplugOwlConfig(**json.load(f))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers 5's notice that the class lacks GenerationMixin
    try:
        model = modeling.MplugOwlForConditionalGeneration(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.load_state_dict(load_file(os.path.join(weights_dir, "model.safetensors")), strict=True)
    return model.train()


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_integer("steps", 5, "timed steps per implementation (after one warm-up step)", flag_values=fv)
    flags.DEFINE_enum("stage", "all", list(STAGE_PATTERNS), "what trains (owl_jax/training/stages.py)",
                      flag_values=fv)
    flags.DEFINE_bool("scan", False, "keep the layer scans (scan_unroll=1; default: 0, unrolled)", flag_values=fv)
    flags.DEFINE_bool("bf16", False, "bf16 compute on every side: owl_jax's model.dtype, torch.autocast for "
                      "PyTorch and the release (fp32 weights and AdamW on all)", flag_values=fv)
    flags.DEFINE_string("release_src", None,
                        "also time the released mPLUG-Owl code from this checkout DIR (outside the repo); see above",
                        flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = cli.parse_flags(argv, _flags(), __doc__)

    from owl_jax.convert import to_torch
    from owl_jax.sharding import make_mesh
    from owl_jax.training.flops import StepShape, towers_of, train_step_flops
    from owl_jax.training.synthetic import RandomBatches
    from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

    from torch_oracle import OwlOracle

    release_modeling, shims = import_release(args.release_src) if args.release_src else (None, [])
    config = bench_config(args.stage)
    config.model.scan_unroll = 1 if args.scan else 0
    if args.bf16:
        config.model.dtype = "bfloat16"
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
        release = release_model(release_modeling, d) if release_modeling else None
    trainable_towers = towers_of(trainer.trainable_paths)
    prefixes = {"vision": ("vision_model",), "abstractor": ("abstractor", "query_tokens"), "llm": ("language_model",)}
    names = tuple(x for t in trainable_towers for x in prefixes.get(t, ()))
    params = [p for n, p in oracle.named_parameters() if n.startswith(names)]
    for n, p in oracle.named_parameters():
        p.requires_grad_(n.startswith(names))
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.tensor(host["input_ids"][0], dtype=torch.long)  # [B, T], -1 on image slots, 0 on padding
    mask = torch.tensor(host["attention_mask"][0])  # int[B, T]: 1 inside the sample
    loss_mask = torch.tensor(host["loss_mask"][0], dtype=torch.float32)  # [B, T]: 1 on answer tokens
    pixels = torch.tensor(host["pixel_values"][0])  # float[M, H, W, 3]
    num_images = torch.tensor(host["num_images"][0])  # int[B]

    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def torch_step():
        with autocast():
            logits = oracle(ids, pixels, num_images, mask).float()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].clamp(min=0).reshape(-1), reduction="none")
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

    steps = {"owl_jax": jax_step, "PyTorch": torch_step}
    if release is not None:
        release_params = [p for n, p in release.named_parameters() if n.startswith(names)]
        for n, p in release.named_parameters():
            p.requires_grad_(n.startswith(names))
        if sum(p.numel() for p in release_params) != sum(p.numel() for p in params):
            raise SystemExit("the release and the oracle would train different parameter sets")
        release_opt = torch.optim.AdamW(release_params, lr=1e-4)
        # The release's batch (pipeline/utils.py `batchify`): its three masks are per target, i.e. for token t + 1.
        release_batch = {
            "pixel_values": pixels[: int(num_images.sum())].permute(0, 3, 1, 2).contiguous(),  # float[M, 3, H, W]
            "input_ids": ids,
            "num_images": num_images.long(),
            "non_padding_mask": mask[:, 1:].long(),  # [B, T - 1]
            "non_media_mask": (ids[:, 1:] >= 0).long(),  # [B, T - 1]
            "prompt_mask": loss_mask[:, 1:].long(),  # [B, T - 1]
        }

        def release_step():
            # labels are masked in place by the forward (-100 off the answers): a fresh copy every step.
            with autocast():
                loss = release(**release_batch, labels=ids.clone()).loss
            release_opt.zero_grad(set_to_none=True)
            loss.backward()
            release_opt.step()
            return loss.item()

        steps["release"] = release_step

    first = {name: fn() for name, fn in steps.items()}  # warm-up (compile, allocator), from the same weights
    if release is not None and abs(first["release"] - first["owl_jax"]) > LOSS_TOLERANCE[args.bf16]:
        raise SystemExit(f"first-step loss: release {first['release']:.6f} vs owl_jax {first['owl_jax']:.6f}: "
                         "not the same computation")
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    flops = train_step_flops(cfg, StepShape(4, 513, 4), trainable_towers)
    rate = matmul_rate()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} cpus={os.cpu_count()} jax {jax.__version__} "
          f"torch {torch.__version__} threads={torch.get_num_threads()} loadavg={os.getloadavg()[0]:.1f}")
    print(f"# stage {args.stage}{' (layer scans)' if args.scan else ' (layers unrolled)'}"
          f"{', bf16 compute' if args.bf16 else ', fp32'}: trains "
          f"{sorted(trainable_towers)}; analytic {flops / 1e9:.1f} GFLOP/step; fp32 matmul rate {rate:.0f} GFLOP/s")
    if release is not None:
        import transformers

        print(f"# release: {release_modeling.__file__} under transformers {transformers.__version__}, LLM attention "
              f"{release.language_model.config._attn_implementation}; shims: {', '.join(shims) or 'none'}")
    print("# first-step loss: " + ", ".join(f"{name} {loss:.6f}" for name, loss in first.items()))
    print("| impl | ms/step (median) | tokens/s | GFLOP/s | of matmul rate |\n|---|---|---|---|---|")
    labels = {"owl_jax": "owl_jax", "PyTorch": "PyTorch", "release": "mPLUG-Owl release"}
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {labels[name]} | {m * 1e3:.0f} | {4 * 513 / m:.0f} | {flops / m / 1e9:.1f} | "
              f"{flops / m / 1e9 / rate:.0%} |")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"owl_jax speed-up: {median['PyTorch'] / median['owl_jax']:.2f}x")
    if release is not None:
        print(f"owl_jax speed-up vs the release: {median['release'] / median['owl_jax']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
