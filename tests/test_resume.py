"""Preemption: a run killed with SIGKILL, or stopped with SIGTERM, resumes to exactly the parameters
of an uninterrupted run (state, RNG and data iterator all restored)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util

from conftest import TINY_TRAIN_FLAGS, tiny_train_config
from owl_jax import params_io
from owl_jax.train import train

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _flat(workdir):
    params, _ = params_io.load_params(os.path.join(workdir, "params"))
    return traverse_util.flatten_dict(params, sep="/")


def _start(workdir):
    cmd = [sys.executable, "-m", "owl_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}", *TINY_TRAIN_FLAGS,
           "--config.num_steps=6", "--config.checkpoint.every_steps=3", "--config.checkpoint.async_save=False",
           "--config.debug.hang_after_step=3"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_checkpoint(proc, workdir, step, timeout=300):
    path = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint in time")
        time.sleep(0.2)
    time.sleep(0.5)  # the process now hangs after the step-3 save (debug.hang_after_step)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    train(tiny_train_config(num_steps=6, **{"checkpoint.every_steps": 3}), workdir)
    return _flat(workdir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_to_identical_parameters(straight, tmp_path, sig):
    workdir = str(tmp_path / "run")
    proc = _start(workdir)
    _wait_for_checkpoint(proc, workdir, 3)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    if sig == signal.SIGTERM:
        stderr = proc.stderr.read().decode()
        assert code == 75, stderr[-3000:]  # saved and stopped: not 0 (done), so a scheduler can tell
        assert "stopped by SIGTERM at step 3" in stderr and "Traceback" not in stderr, stderr[-3000:]
    else:
        assert code == -signal.SIGKILL
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    assert not os.path.exists(os.path.join(workdir, "params"))

    train(tiny_train_config(num_steps=6, **{"checkpoint.every_steps": 3}), workdir)  # resume
    resumed = _flat(workdir)
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert np.array_equal(resumed[k], straight[k]), k
