"""The AOT tool compiles the tiny training step for a small TPU slice on this CPU machine."""
import os
import subprocess
import sys

import pytest

from owl_jax.aot import analyse

from conftest import tiny_train_config


def test_tiny_step_fits_a_v5e_2x2_and_counts_flops():
    config = tiny_train_config("stage1")
    report = analyse(config, "v5e:2x2", count_flops=True, fill=0.5)
    assert report.chips == 4 and report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report.fits and 0 < report.peak_bytes < 2**30
    assert report.argument_bytes > report.output_bytes > 0  # the batch is an argument, not an output
    # XLA's count includes elementwise work and the optimiser: a little above the matmul-only model.
    assert 0.9 < report.xla_flops_per_chip / report.analytic_flops_per_chip < 1.5
    assert "fits" in report.table()
    # Useful tokens: the step's positions (rows x seq_len per device) times the fill.
    positions = config.batch_size * config.optim.grad_accum_steps * config.seq_len / 4
    assert report.token_positions_per_chip == positions
    assert f"useful at fill 0.5: {positions / 2:.6g} ({report.analytic_flops_per_chip * 2 / positions:.4g}" in \
        report.table()
    with pytest.raises(ValueError, match="fill=0"):
        analyse(config, "v5e:2x2", fill=0.0)


def test_command_line_exits_nonzero_when_the_step_does_not_fit():
    root = os.path.join(os.path.dirname(__file__), "..")
    cmd = [sys.executable, "-m", "owl_jax.aot", "--config=configs/tiny.py", "--topology=v5e:2x2",
           "--config.batch_size=4096", "--config.seq_len=1024", "--config.max_images_per_batch=4096"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "DOES NOT FIT" in proc.stdout


def test_auto_attention_puts_the_splash_kernels_in_the_tpu_step():
    """attention "auto" on a TPU mesh (compiled here ahead of time) runs the LLM's attention through
    Pallas' splash kernels, heads sharded over `tensor` (GQA: 4 query heads of 128 on 2 KV heads)."""
    from owl_jax.aot import compile_step, tpu_devices
    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer

    config = tiny_train_config("stage2_lora", **{"model.attention_impl": "auto", "model.llm.hidden_size": 512,
                                                 "seq_len": 256, "mesh.fsdp": 2, "mesh.tensor": 2})
    trainer = Trainer(config, make_mesh(config.mesh.to_dict(), tpu_devices("v5e:2x2")))
    text = compile_step(trainer).as_text()
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert kernel in text, kernel


def test_bf16_matmuls_keep_their_dtype_when_traced_for_tpu():
    """layers.dot_accumulator's fp32 accumulation is a CPU remedy: traced for a TPU mesh (as the
    AOT tool does, on this CPU host) a bf16 matmul keeps its bf16 output, so remat saves bf16."""
    import jax
    import jax.numpy as jnp

    from owl_jax.aot import tpu_devices
    from owl_jax.models.layers import dot_accumulator, trace_platform
    from owl_jax.sharding import make_mesh

    assert trace_platform() == "cpu" and dot_accumulator(jnp.bfloat16) == jnp.float32
    assert dot_accumulator(jnp.float32) is None
    with jax.set_mesh(make_mesh({"fsdp": 4}, tpu_devices("v5e:2x2"))):
        assert trace_platform() == "tpu" and dot_accumulator(jnp.bfloat16) is None
