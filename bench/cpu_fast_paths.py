r"""What each CPU fast path of the model is worth on the main job's training steps.

    JAX_PLATFORMS=cpu python bench/cpu_fast_paths.py [--steps 10] [--stages llm,stage1,stage2]

For the LLM tower's pretraining and each stage of the ShapesWorld main job (owl_jax/demo/config.py:
its model, batch, sequence length and image slots, stage 2 with its LoRA) it times the jitted
training step on random batches of those shapes (`training/synthetic.py`) with the main job's
settings, then with one fast path switched off at a time, then with all of them off:

  unrolled layers     model.scan_unroll=0 (layers in a Python loop over the stacked params) -> 1
  query blocks        model.causal_query_block=128 (the LLM's causal attention in blocks) -> 0
  answer-rows head    lm_head_rows="answers" (the LM head on the answer rows only) -> "all"

Median step time over --steps steps after two warm-up steps, the variants interleaved round by
round so that load on the machine hits them alike.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

from owl_jax import cli  # noqa: E402

VARIANTS = {
    "main job": {},
    "layers scanned": {"model.scan_unroll": 1},
    "no query blocks": {"model.causal_query_block": 0},
    "LM head on all rows": {"lm_head_rows": "all"},
    "all three off": {"model.scan_unroll": 1, "model.causal_query_block": 0, "lm_head_rows": "all"},
}


def stage_train_config(name: str):
    """owl_jax.train's config of a main-job stage, or of the LLM tower's pretraining ("llm")."""
    from owl_jax.configs import load_config_file
    from owl_jax.demo.jobs import DEFAULT_CONFIG, train_config
    from owl_jax.demo.run import stage_config

    job = load_config_file(DEFAULT_CONFIG)
    if name == "llm":
        return train_config(job.model, job.towers.llm, "towers.llm", data_dir="unused", init_dir="")
    return stage_config(job, name, data_dir="unused", init_dir="")


def step_runner(config, overrides: dict):
    """(a function running one training step, its batches) for `config` with `overrides` applied."""
    from owl_jax.sharding import make_mesh
    from owl_jax.training.synthetic import RandomBatches
    from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    trainer = Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    m = config.model
    images = 0 if config.data.text_only else 1
    data = RandomBatches(batch_size=config.batch_size, seq_len=config.seq_len, max_images=config.max_images_per_batch,
                         images_per_sample=images, vocab_size=m.llm.vocab_size,
                         tokens_per_image=m.abstractor.num_queries + 1, image_size=m.vision.image_size)
    host = stack_micro_batches([next(data)])
    step = trainer.jit_train_step({k: v.shape for k, v in host.items()})
    state = {"state": trainer.init_state(jax.random.PRNGKey(0))}
    batch = global_batch(host, step.batch_shardings)

    def run() -> float:
        t0 = time.perf_counter()
        state["state"], metrics = step(state["state"], batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t0

    return run


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_integer("steps", 10, "timed steps per variant (after two warm-up steps)", flag_values=fv)
    flags.DEFINE_string("stages", "llm,stage1,stage2",
                        "the stages timed, comma-separated (llm: the LLM tower's pretraining)", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = cli.parse_flags(argv, _flags(), __doc__)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores; median ms per step of {args.steps} (2 warm-up)")
    for name in args.stages.split(","):
        config = stage_train_config(name)
        runners = {}
        for variant, overrides in VARIANTS.items():
            t0 = time.perf_counter()
            runners[variant] = step_runner(config, overrides)
            runners[variant]()  # compile + first step
            runners[variant]()
            print(f"  [{name}] {variant}: compiled and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        times = {variant: [] for variant in VARIANTS}
        for _ in range(args.steps):
            for variant, run in runners.items():
                times[variant].append(run())
        base = statistics.median(times["main job"])
        print(f"{name} (batch {config.batch_size} x {config.seq_len}, stage {config.stage}):")
        for variant, ts in times.items():
            ms = statistics.median(ts) * 1e3
            print(f"  {variant:<22} {ms:8.1f} ms   x{ms / (base * 1e3):.2f} of the main job's step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
