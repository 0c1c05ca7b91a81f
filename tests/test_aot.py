"""The AOT tool compiles the tiny training step for a small TPU slice on this CPU machine."""
import subprocess
import sys
import os

from conftest import tiny_train_config
from owl_jax.aot import analyse


def test_tiny_step_fits_a_v5e_2x2_and_counts_flops():
    report = analyse(tiny_train_config("stage1"), "v5e:2x2", count_flops=True)
    assert report.chips == 4 and report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report.fits and 0 < report.peak_bytes < 2**30
    assert report.argument_bytes > report.output_bytes > 0  # the batch is an argument, not an output
    # XLA's count includes elementwise work and the optimiser: a little above the matmul-only model.
    assert 0.9 < report.xla_flops_per_chip / report.analytic_flops_per_chip < 1.5
    assert "fits" in report.table()


def test_command_line_exits_nonzero_when_the_step_does_not_fit():
    root = os.path.join(os.path.dirname(__file__), "..")
    cmd = [sys.executable, "-m", "owl_jax.aot", "--config=configs/tiny.py", "--topology=v5e:2x2",
           "--config.batch_size=4096", "--config.seq_len=1024", "--config.max_images_per_batch=4096"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "DOES NOT FIT" in proc.stdout
