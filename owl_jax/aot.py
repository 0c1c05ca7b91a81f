r"""Compile the training step for a TPU slice on this (CPU) machine and report whether it fits.

  python -m owl_jax.aot --config=configs/mplug_owl_llama7b.py:stage1 --topology=v5e:16x16 \
      [--config.mesh.fsdp=-1 ...] [--count_flops] [--fill=0.93]

Prints per-device argument / temporary / output bytes against the device's HBM and, with
--count_flops, XLA's FLOPs per device against the analytic model FLOPs: a second compile of one
micro-batch with every scan unrolled (XLA's cost analysis counts a loop body once), times the
number of micro-batches. The step's token positions (rows x seq_len) are counted whole; --fill, the
share of them that hold data (packed rows ~0.9, see data.packing; a run logs it as
real_tokens_per_s / tokens_per_s), turns them into useful tokens and FLOPs per useful token.
Exits 1 when the step does not fit.
Needs the `tpu` extra (libtpu); nothing runs on a TPU.
"""
from __future__ import annotations

import dataclasses
import os
import sys

# Compiling only: several processes may load libtpu at once (no TPU is opened).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Only when run as a program: importing this module (tests, other tools) defines no flags."""
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:stage]).", lock_config=True)
    flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:16x16, v5p:4x4x4, v4:2x2x1.")
    flags.DEFINE_string("chips_per_host", "2,2,1", "Chips per host (x,y,z).")
    flags.DEFINE_integer("num_slices", 1, "Number of slices.")
    flags.DEFINE_bool("count_flops", False, "Also compile unrolled and compare XLA's FLOPs with the analytic count.")
    flags.DEFINE_float("fill", 1.0, "Share of the step's token positions that hold data (not padding), in (0, 1].")

GiB = 2**30
# HBM per JAX device of each generation's default chip config (v4 exposes each 32 GiB chip as two
# 16 GiB TensorCore devices here: v4:2x2x1 has 8 devices).
HBM_BYTES = {"v4": 16 * GiB, "v5e": 16 * GiB, "v5litepod": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}


@dataclasses.dataclass
class AotReport:
    topology: str
    chips: int
    mesh: dict
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    hbm_bytes: int
    xla_flops_per_chip: float | None
    analytic_flops_per_chip: float
    token_positions_per_chip: float  # rows x seq_len a step, per device
    fill: float = 1.0  # the share of the positions that hold data
    compile_error: str | None = None  # the TPU compiler's own out-of-memory verdict

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.compile_error is None and self.peak_bytes <= self.hbm_bytes

    def table(self) -> str:
        g = lambda b: f"{b / GiB:8.2f} GiB"
        useful = self.fill * self.token_positions_per_chip
        tokens = (f"  token positions per device per step {self.token_positions_per_chip:.6g}, useful at fill "
                  f"{self.fill:g}: {useful:.6g} ({self.analytic_flops_per_chip / useful:.4g} analytic FLOPs each)")
        if self.compile_error:
            return (
                f"topology {self.topology}: {self.chips} devices, mesh {self.mesh}\n  DOES NOT FIT: "
                f"{self.compile_error}\n  analytic model FLOPs per device per step {self.analytic_flops_per_chip:.4g}\n"
                + tokens
            )
        lines = [
            f"topology {self.topology}: {self.chips} devices, mesh {self.mesh}",
            f"  arguments   {g(self.argument_bytes)}   (params, optimiser state, batch; per device)",
            f"  temporaries {g(self.temp_bytes)}",
            f"  outputs     {g(self.output_bytes)}   (aliased with donated arguments: {g(self.alias_bytes)})",
            f"  total       {g(self.peak_bytes)}   of {g(self.hbm_bytes)} HBM -> "
            f"{'fits' if self.fits else 'DOES NOT FIT'}",
            f"  analytic model FLOPs per device per step {self.analytic_flops_per_chip:.4g}",
            tokens,
        ]
        if self.xla_flops_per_chip is not None:
            lines.append(f"  XLA FLOPs per device per step {self.xla_flops_per_chip:.4g}  "
                         f"(ratio to analytic {self.xla_flops_per_chip / self.analytic_flops_per_chip:.3f})")
        return "\n".join(lines)


def tpu_devices(topology: str, chips_per_host: tuple[int, ...] = (2, 2, 1), num_slices: int = 1):
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name="default",
        chips_per_host_bounds=chips_per_host, num_slices=num_slices,
    )
    return desc.devices


def compile_step(trainer):
    """Lowers and compiles the trainer's step for its mesh, from abstract inputs only."""
    import flax.linen as nn
    import jax

    config, mesh = trainer.config, trainer.mesh
    from owl_jax import batch as batch_format

    shapes = batch_format.step_shapes(config, trainer.model_cfg.vision.image_size)
    step = trainer.jit_train_step(shapes)
    batch = {k: jax.ShapeDtypeStruct(s, batch_format.DTYPES[k], sharding=step.batch_shardings[k])
             for k, s in shapes.items()}
    state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state, trainer.state_shardings
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        return step.jitted.lower(state, batch).compile()


def analyse(
    config, topology: str, chips_per_host=(2, 2, 1), num_slices: int = 1, count_flops: bool = False,
    fill: float = 1.0,
) -> AotReport:
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill={fill}: expected the share of token positions holding data, in (0, 1]")
    from owl_jax.sharding import make_mesh
    from owl_jax.training.flops import StepShape, towers_of, train_step_flops
    from owl_jax.training.trainer import Trainer

    devices = tpu_devices(topology, chips_per_host, num_slices)
    trainer = Trainer(config, make_mesh(config.mesh.to_dict(), devices))
    accum = config.optim.grad_accum_steps
    shape = StepShape(config.batch_size * accum, config.seq_len, config.max_images_per_batch * accum,
                      config.max_videos_per_batch * accum, config.frames_per_video)
    analytic = train_step_flops(trainer.model_cfg, shape, towers_of(trainer.trainable_paths)) / len(devices)
    positions = shape.batch * shape.seq_len / len(devices)
    generation = topology.split(":")[0].lower()
    hbm = HBM_BYTES.get(generation, 16 * GiB)
    try:
        compiled = compile_step(trainer)
    except Exception as e:  # XlaRuntimeError: the compiler's RESOURCE_EXHAUSTED
        if "memory" not in str(e).lower():
            raise
        message = next((line for line in str(e).splitlines() if "memory" in line.lower()), str(e))
        return AotReport(
            topology, len(devices), dict(trainer.mesh.shape), 0, 0, 0, 0, hbm, None, analytic, positions, fill,
            message.strip(),
        )
    mem = compiled.memory_analysis()
    xla_flops = None
    if count_flops:
        # One micro-batch, every scan unrolled (XLA counts a loop body once); a step is K of them.
        unrolled = config.copy_and_resolve_references()
        unrolled.model.scan_unroll = 0
        unrolled.optim.grad_accum_steps = 1
        micro = float(compile_step(Trainer(unrolled, trainer.mesh)).cost_analysis()["flops"])
        xla_flops = micro * config.optim.grad_accum_steps
    return AotReport(
        topology=topology, chips=len(devices), mesh=dict(trainer.mesh.shape),
        argument_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
        hbm_bytes=hbm, xla_flops_per_chip=xla_flops, analytic_flops_per_chip=analytic,
        token_positions_per_chip=positions, fill=fill,
    )


def main(argv):
    del argv
    chips_per_host = tuple(int(x) for x in FLAGS.chips_per_host.split(","))
    report = analyse(FLAGS.config, FLAGS.topology, chips_per_host, FLAGS.num_slices, FLAGS.count_flops, FLAGS.fill)
    print(report.table())
    sys.exit(0 if report.fits else 1)


if __name__ == "__main__":
    from owl_jax.cli import parse_absl_flags

    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_absl_flags)
