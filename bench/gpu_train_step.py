"""7B training steps on one GPU in bf16: ms/step, tokens/s, MFU, peak memory.

    python bench/gpu_train_step.py [--out DIR] [--budget_s 500]   # every variant, each in its own process;
                                                                  # DIR/results.jsonl, DIR/variants.log
    python bench/gpu_train_step.py --variant stage2_lora_cudnn     # one
    python bench/gpu_train_step.py --variants=full_ft8_cudnn_dots --profile=full_ft8_cudnn_dots
        # also one step under jax.profiler: DIR/NAME.xplane.pb.gz and the compiled HLO DIR/NAME.hlo.txt.gz,
        # summarised by bench/profile_summary.py

The recipes of configs/mplug_owl_llama7b.py (bf16 compute, frozen weights in bf16, trainable ones
in fp32 with AdamW), one micro-batch per step (but *_accum4), synthetic tokens with one 224 x 224
image per sample:

  stage2_lora_{cudnn,xla}  LoRA (rank 8 on q/v) + abstractor, full remat, 8 x 2048 tokens
  stage1_{cudnn,xla}       vision + abstractor, frozen LLM, remat dots_no_batch, 32 x 512 tokens
  *_cublas                 with XLA's Triton GEMM fusions off (every matmul through cuBLAS)
  *_dots                   saving the weight matmuls' outputs (remat dots_no_batch) instead of full remat
  full_ft8_cudnn           every LLM weight trains (fp32 master weights + AdamW moments: 16 bytes a
                           parameter), so the LLM is cut to 8 of its 32 layers to fit one 80 GB GPU
  full_ft{4,12}_*, *_b16   the same with 4 or 12 layers, or 16 x 2048 tokens
  *_accum4                 4 micro-batches a step (the recipes' gradient accumulation)
  *_dsfusion               XLA's dynamic-slice fusion on (GEMMs read a layer's weights in place)
  *_dotsattn               remat dots_no_batch_attention: dots_no_batch + cuDNN attention's residuals
  *_rbg                    JAX_DEFAULT_PRNG_IMPL=unsafe_rbg: dropout masks from XLA's RngBitGenerator
  stage2_lora_cudnn_combined  dotsattn + dsfusion + rbg

`cudnn`: attention through jax.nn.dot_product_attention(implementation="cudnn") with the causal hint;
`xla`: our einsum attention with an fp32 softmax. MFU = analytic model FLOPs (training/flops.py: the
matmuls the stage needs, no weight gradients for frozen weights, no remat recomputation; attention
over the whole T x T square; `mfu_causal_half` counts only the unmasked half that cuDNN's kernels
compute, and equals `mfu` for the einsum path, which computes it all) /
step time / the chip's dense bf16 peak (989 TFLOP/s for H100 and H200); also given against a
measured 8192^3 bf16 matmul. Peak memory: XLA's memory analysis of the compiled step (arguments +
temporaries), and
the allocator's peak over the whole process (random init included: the layer scans make every
weight in fp32 before the frozen ones are cast, ~38 GiB at 7B).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VARIANTS = {
    # name: (stage, attention, batch, seq_len, llm_layers (None: all 32), remat (None: the recipe's)
    #        [, micro-batches per step (default 1)])
    "stage2_lora_cudnn": ("stage2_lora", "cudnn", 8, 2048, None, None),
    "stage2_lora_xla": ("stage2_lora", "xla", 8, 2048, None, None),
    "stage1_cudnn": ("stage1", "cudnn", 32, 512, None, None),
    "full_ft8_cudnn": ("full_ft", "cudnn", 8, 2048, 8, None),
    "stage2_lora_cudnn_dots": ("stage2_lora", "cudnn", 8, 2048, None, "dots_no_batch"),
    "stage1_xla": ("stage1", "xla", 32, 512, None, None),
    "full_ft8_cudnn_dots": ("full_ft", "cudnn", 8, 2048, 8, "dots_no_batch"),
    "stage2_lora_cudnn_dots_cublas": ("stage2_lora", "cudnn", 8, 2048, None, "dots_no_batch"),
    # The full fine-tune's depth and batch sweep: step time = fixed + per layer + per token + per
    # layer-token, to split the optimiser's per-parameter cost from the per-token matmuls and to
    # extrapolate the 32-layer step that one GPU cannot hold.
    "full_ft4_cudnn_dots": ("full_ft", "cudnn", 8, 2048, 4, "dots_no_batch"),
    "full_ft12_cudnn_dots": ("full_ft", "cudnn", 8, 2048, 12, "dots_no_batch"),
    "full_ft4_cudnn_dots_b16": ("full_ft", "cudnn", 16, 2048, 4, "dots_no_batch"),
    "full_ft8_cudnn_dots_b16": ("full_ft", "cudnn", 16, 2048, 8, "dots_no_batch"),
    # The recipes accumulate gradients over micro-batches: the optimiser's cost is spread over them.
    "full_ft8_cudnn_dots_accum4": ("full_ft", "cudnn", 8, 2048, 8, "dots_no_batch", 4),
    # Each layer's weights are sliced out of the scan's stacked [L, ...] arrays by a device copy
    # (27 a layer, 5% of the stage-2 step in a profile); with dynamic-slice fusion
    # the GEMMs read the slice in place. Not yet measured.
    "stage2_lora_cudnn_dots_dsfusion": ("stage2_lora", "cudnn", 8, 2048, None, "dots_no_batch"),
    "full_ft8_cudnn_dots_dsfusion": ("full_ft", "cudnn", 8, 2048, 8, "dots_no_batch"),
    # Also saving cuDNN attention's output and softmax statistics: its forward kernel ran twice a
    # layer under dots_no_batch (3.3% of the stage-2 step). ~130 MiB more a layer at 8 x 2048 (~4 GiB
    # at 32 layers, ~1 GiB at 8). Not yet measured.
    "stage2_lora_cudnn_dotsattn": ("stage2_lora", "cudnn", 8, 2048, None, "dots_no_batch_attention"),
    "full_ft8_cudnn_dotsattn": ("full_ft", "cudnn", 8, 2048, 8, "dots_no_batch_attention"),
    # LoRA dropout (p 0.05 on q/v's input) draws two [8 x 2048, 4096] masks a layer, again under
    # remat: 2.6% of the stage-2 step with threefry bits (profiled). XLA's own
    # RngBitGenerator (JAX's "unsafe_rbg" keys) makes them cheaper. Not yet measured.
    "stage2_lora_cudnn_dots_rbg": ("stage2_lora", "cudnn", 8, 2048, None, "dots_no_batch"),
    # The three above together (dotsattn remat, dynamic-slice fusion, unsafe_rbg).
    "stage2_lora_cudnn_combined": ("stage2_lora", "cudnn", 8, 2048, None, "dots_no_batch_attention"),
}
# Extra environment per variant (the rest run with XLA's and JAX's defaults); XLA_FLAGS are added
# to the caller's.
VARIANT_ENV = {"stage2_lora_cudnn_dots_cublas": {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"},
               "stage2_lora_cudnn_dots_dsfusion": {"XLA_FLAGS": "--xla_gpu_enable_dynamic_slice_fusion=true"},
               "full_ft8_cudnn_dots_dsfusion": {"XLA_FLAGS": "--xla_gpu_enable_dynamic_slice_fusion=true"},
               "stage2_lora_cudnn_dots_rbg": {"JAX_DEFAULT_PRNG_IMPL": "unsafe_rbg"},
               "stage2_lora_cudnn_combined": {"XLA_FLAGS": "--xla_gpu_enable_dynamic_slice_fusion=true",
                                              "JAX_DEFAULT_PRNG_IMPL": "unsafe_rbg"}}
GiB = 2**30


def matmul_tflops() -> float:
    import jax
    import jax.numpy as jnp

    n = 8192
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in range(2))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def profile_one_step(name: str, compiled, state, batch_arrays, out_dir: str):
    """One more step under the profiler (after the timed ones, so they are not slowed): the device
    trace as DIR/NAME.xplane.pb.gz, and the compiled HLO that names its ops as DIR/NAME.hlo.txt.gz."""
    import glob
    import gzip
    import shutil

    import jax

    with gzip.open(os.path.join(out_dir, f"{name}.hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            state, metrics = compiled(state, batch_arrays)
            float(metrics["loss"])
        (pb,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        with open(pb, "rb") as src, gzip.open(os.path.join(out_dir, f"{name}.xplane.pb.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return state


def run_variant(name: str, steps: int, config_path: str, overrides: dict, profile_dir: str | None = None) -> dict:
    import jax

    from owl_jax.aot import compile_step
    from owl_jax.configs import load_config_file
    from owl_jax.sharding import make_mesh
    from owl_jax.training.flops import StepShape, forward_flops, peak_flops, towers_of, train_step_flops
    from owl_jax.training.synthetic import RandomBatches
    from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

    stage, attention, batch, seq_len, layers, remat, *rest = VARIANTS[name]
    accum = rest[0] if rest else 1
    # CPU smoke runs of this script shrink the variants (--attention/--batch/--seq_len/--llm_layers).
    attention = overrides.get("attention") or attention
    batch, seq_len = overrides.get("batch") or batch, overrides.get("seq_len") or seq_len
    layers = overrides.get("llm_layers") or layers
    config = load_config_file(f"{config_path}:{stage}")
    config.model.attention_impl = attention
    config.optim.grad_accum_steps = accum
    config.update(batch_size=batch, seq_len=seq_len, max_images_per_batch=batch)
    if layers:
        config.model.llm.num_layers = layers
    if remat:
        config.model.remat_policy = remat
    device = jax.devices()[0]
    trainer = Trainer(config, make_mesh({"fsdp": 1}, [device]))
    cfg = trainer.model_cfg
    data = RandomBatches(batch_size=batch, seq_len=seq_len, max_images=batch, images_per_sample=1,
                         vocab_size=cfg.llm.vocab_size, tokens_per_image=cfg.tokens_per_image,
                         image_size=cfg.vision.image_size)
    host = stack_micro_batches([next(data) for _ in range(accum)])
    step = trainer.jit_train_step({k: v.shape for k, v in host.items()})
    batch_arrays = global_batch(host, step.batch_shardings)

    t = time.perf_counter()
    state = trainer.init_state(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t

    t = time.perf_counter()
    compiled = compile_step(trainer)  # the AOT tool's lowering (abstract inputs of the config's shapes)
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()

    losses, times = [], []
    for i in range(steps + 1):  # the first step warms up (allocator, autotuned kernels)
        t = time.perf_counter()
        state, metrics = compiled(state, batch_arrays)
        loss = float(metrics["loss"])
        if i:
            times.append(time.perf_counter() - t)
        losses.append(loss)
    ms = statistics.median(times) * 1e3
    if profile_dir:
        try:
            state = profile_one_step(name, compiled, state, batch_arrays, profile_dir)
        except Exception as e:  # the timings above still count
            print(f"{name}: profiling failed: {e!r}", file=sys.stderr)
    shape = StepShape(batch * accum, seq_len, batch * accum)
    flops = train_step_flops(cfg, shape, towers_of(trainer.trainable_paths))
    # cuDNN's and splash's kernels skip the causal mask's upper half: the LLM's attention matmuls
    # counted half (x3: forward + 2x backward, since a gradient flows through the LLM whenever
    # anything trains). The einsum path ("xla", no query blocks at 7B) computes the whole square.
    skips_half = attention in ("cudnn", "splash")
    causal_flops = flops - (1.5 * forward_flops(cfg, shape)["llm"][1] if skips_half else 0.0)
    peak = peak_flops(device.device_kind) or float("nan")
    stats = device.memory_stats() or {}
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(state["trainable"]))
    return {
        "variant": name,
        "stage": stage,
        "attention": attention,
        "batch": batch,
        "seq_len": seq_len,
        "micro_batches": accum,
        "llm_layers": cfg.llm.num_layers,
        "remat": cfg.remat_policy,
        "trainable_params": int(n_trainable),
        "device": device.device_kind,
        "jax": jax.__version__,
        "init_s": round(init_s, 1),
        "compile_s": round(compile_s, 1),
        "ms_per_step": round(ms, 1),
        "step_ms_all": [round(x * 1e3, 1) for x in times],
        "tokens_per_s": round(accum * batch * seq_len / ms * 1e3),
        "model_tflop_per_step": round(flops / 1e12, 2),
        "model_tflops_per_s": round(flops / ms / 1e9, 1),
        "mfu": round(flops / ms * 1e3 / peak, 4),
        "mfu_causal_half": round(causal_flops / ms * 1e3 / peak, 4),
        "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default"),
        "prng_impl": jax.config.jax_default_prng_impl,
        "peak_bytes_in_use_gib": round(stats.get("peak_bytes_in_use", 0) / GiB, 2),
        "xla_argument_gib": round(mem.argument_size_in_bytes / GiB, 2),
        "xla_temp_gib": round(mem.temp_size_in_bytes / GiB, 2),
        "losses": [round(x, 4) for x in losses],
    }


def run_child(cmd: list[str], timeout: float, env: dict, out: str, name: str) -> str:
    """Runs one variant's process; its output goes to OUT/variants.log and is returned."""
    t = time.time()
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, env=env)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        log = (
            f"TIMEOUT after {time.time() - t:.0f} s\n"
            + (e.stdout or b"").decode(errors="replace")
            + (e.stderr or b"").decode(errors="replace")
        )
    with open(os.path.join(out, "variants.log"), "a") as f:
        f.write(f"===== {name} (allocator {env.get('XLA_PYTHON_CLIENT_ALLOCATOR', 'default')})\n{log}\n")
    return log


def drive(args: flags.FlagValues) -> None:
    """Each measurement in its own process: the allocator's peak is then the variant's own, and the
    driver holds no device memory."""
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")}
    probe = subprocess.run([sys.executable, __file__, "--matmul"], capture_output=True, text=True, env=env)
    if probe.returncode:
        sys.exit(f"matmul probe failed:\n{probe.stdout}{probe.stderr}")
    machine = json.loads(probe.stdout.strip().splitlines()[-1])
    rate = machine["bf16_matmul_tflops"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {machine['device']} jax {machine['jax']}; "
          f"bf16 8192^3 matmul {rate:.0f} TFLOP/s", flush=True)
    start, rows = time.time(), []
    for name in _names(args.variants):
        left = args.budget_s - (time.time() - start)
        if left < 60:
            print(f"{name}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        path = os.path.join(work, f"{name}.json")
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--steps",
            str(args.steps),
            "--json",
            path,
            "--config",
            args.config,
        ]
        cmd += [f"--{k}={v}" for k, v in overrides(args).items() if v]
        if name in _names(args.profile):
            cmd += ["--profile_dir", args.out]
        t = time.time()
        extra = VARIANT_ENV.get(name, {})
        flags = " ".join(x for x in (env.get("XLA_FLAGS", ""), extra.get("XLA_FLAGS", "")) if x)
        variant_env = {**env, **extra, "XLA_FLAGS": flags}
        log = run_child(cmd, min(left, args.variant_timeout_s), variant_env, args.out, name)
        left = args.budget_s - (time.time() - start)
        if (
            not os.path.exists(path)
            and "RESOURCE_EXHAUSTED" in log
            and "XLA_PYTHON_CLIENT_ALLOCATOR" not in env
            and left >= 60
        ):
            # The BFC allocator can fail to place a step's one big temporary block after init has
            # fragmented it (the 52.7 GiB of stage2_lora_cudnn_dots); CUDA's
            # stream-ordered allocator places it. The row records which allocator ran. (A step that
            # does not fit at all fails twice, at the cost of a second start.)
            print(f"{name}: out of memory with the BFC allocator; again with cuda_async", flush=True)
            log = run_child(cmd, min(left, args.variant_timeout_s),
                            {**variant_env, "XLA_PYTHON_CLIENT_ALLOCATOR": "cuda_async"}, args.out, name)
        if os.path.exists(path):
            r = json.load(open(path))
            r["mfu_of_matmul"] = round(r["model_tflops_per_s"] / rate, 4)
            rows.append(r)
            with open(os.path.join(args.out, "results.jsonl"), "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
        else:
            print(f"{name}: FAILED after {time.time() - t:.0f} s:\n{log[-2500:]}", flush=True)
    print(
        "\n| variant | layers | micro-batches x batch x seq | ms/step | tokens/s | model TFLOP/s | MFU (989) "
        "| MFU, causal half "
        f"| of matmul ({rate:.0f}) | peak GiB (allocator / XLA args+temp) | allocator | compile s |\n"
        f"|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['variant']} | {r['llm_layers']} | {r['micro_batches']} x {r['batch']} x {r['seq_len']} "
            f"| {r['ms_per_step']:.0f} "
            f"| {r['tokens_per_s']} | {r['model_tflops_per_s']:.0f} | {r['mfu']:.1%} | {r['mfu_causal_half']:.1%} "
            f"| {r['mfu_of_matmul']:.1%} | {r['peak_bytes_in_use_gib']:.1f} "
            f"/ {r['xla_argument_gib'] + r['xla_temp_gib']:.1f} "
            f"| {r['allocator']} | {r['compile_s']:.0f} |"
        )


def overrides(args: flags.FlagValues) -> dict:
    return {k: getattr(args, k) for k in ("attention", "batch", "seq_len", "llm_layers")}


def _names(text: str) -> list[str]:
    """`a,b` -> ["a", "b"]; "" -> []."""
    return [x for x in text.split(",") if x]


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_enum("variant", None, sorted(VARIANTS), "run this one variant here (the driver runs each so)",
                      flag_values=fv)
    flags.DEFINE_bool("matmul", False, "only print the device and its bf16 matmul rate", flag_values=fv)
    flags.DEFINE_string("variants", ",".join(VARIANTS), "variants run in turn, each in its own process, "
                        "comma-separated", flag_values=fv)
    flags.DEFINE_string("config", os.path.join(ROOT, "configs", "mplug_owl_llama7b.py"), "the 7B recipes' config",
                        flag_values=fv)
    flags.DEFINE_integer("steps", 5, "timed steps per variant (after one warm-up step)", flag_values=fv)
    flags.DEFINE_string("json", None, "(per variant) where its result goes", flag_values=fv)
    flags.DEFINE_string("profile", "", "variants to profile one extra step of, comma-separated", flag_values=fv)
    flags.DEFINE_string("profile_dir", None, "(per variant) where the profile of one step goes", flag_values=fv)
    flags.DEFINE_string("out", os.environ.get("OUT", "/tmp/gpu_bench"), "where results.jsonl and variants.log go",
                        flag_values=fv)
    flags.DEFINE_float("budget_s", 500, "seconds for all the variants together", flag_values=fv)
    flags.DEFINE_float("variant_timeout_s", 170, "seconds for one variant's process", flag_values=fv)
    flags.DEFINE_enum("attention", None, ["xla", "cudnn", "splash", "jax", "auto"],
                      "attention implementation, for every variant (default: each variant's own)", flag_values=fv)
    flags.DEFINE_integer("batch", None, "batch size, for every variant (default: each variant's own)", flag_values=fv)
    flags.DEFINE_integer("seq_len", None, "tokens per sample, for every variant (default: each variant's own)",
                         flag_values=fv)
    flags.DEFINE_integer("llm_layers", None, "LLM layers, for every variant (default: each variant's own)",
                         flag_values=fv)
    for name in ("variants", "profile"):  # a misspelt variant is refused before any process starts
        flags.register_validator(name, _known_variants, flag_values=fv)
    return fv


def _known_variants(text: str) -> bool:
    unknown = [x for x in _names(text) if x not in VARIANTS]
    if unknown:
        raise flags.ValidationError(f"no variant {', '.join(unknown)}")
    return True


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    from owl_jax import cli  # after __main__ has put the repository on sys.path

    args = cli.parse_flags(argv, _flags(), __doc__)
    if args.matmul:
        import jax

        print(
            json.dumps(
                {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "bf16_matmul_tflops": matmul_tflops()}
            )
        )
    elif args.variant:
        result = run_variant(args.variant, args.steps, args.config, overrides(args), args.profile_dir)
        with open(args.json or os.devnull, "w") as f:
            json.dump(result, f)
        print(json.dumps(result))
    else:
        drive(args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
