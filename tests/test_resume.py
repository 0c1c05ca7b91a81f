"""Preemption: a run killed with SIGKILL, or stopped with SIGTERM in the middle of a checkpoint
interval (which saves that step), resumes to exactly the parameters of an uninterrupted run (state,
RNG and data iterator all restored)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util

from owl_jax import params_io
from owl_jax.train import train

from conftest import REPO, TINY_TRAIN_FLAGS, LoggedProcess, subprocess_env, tiny_train_config


def flat_params(workdir):
    params, _ = params_io.load_params(os.path.join(workdir, "params"))
    return traverse_util.flatten_dict(params, sep="/")


def assert_same_params(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def start_preemptible(args, hang_before_step, marker, env=None):
    """`python -m owl_jax.train ARGS` whose process 0 waits for a signal before the batches of step
    `hang_before_step + 1` (tests/preemptible_train.py); it writes `marker` when it gets there."""
    env = subprocess_env(OWL_TEST_HANG_BEFORE_STEP=str(hang_before_step), OWL_TEST_HANG_MARKER=marker, **(env or {}))
    return LoggedProcess([sys.executable, os.path.join(REPO, "tests", "preemptible_train.py"), *args], cwd=REPO,
                         env=env, stdout=subprocess.DEVNULL)


def wait_for_file(path, procs, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"training exited early ({proc.returncode}): {proc.stderr_text()[-3000:]}"
                )
        if time.time() > deadline:
            for proc in procs:
                proc.kill()
            raise AssertionError(f"{path} did not appear in time")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    train(tiny_train_config(num_steps=6, **{"checkpoint.every_steps": 3}), workdir)
    return flat_params(workdir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_to_identical_parameters(straight, tmp_path, sig):
    workdir, marker = str(tmp_path / "run"), str(tmp_path / "hanging")
    proc = start_preemptible(["--config=configs/tiny.py", f"--workdir={workdir}", *TINY_TRAIN_FLAGS,
                              "--config.num_steps=6", "--config.checkpoint.every_steps=3",
                              "--config.checkpoint.async_save=False"], hang_before_step=4, marker=marker)
    wait_for_file(marker, [proc])  # step 4 done, step 3 saved, step 4 not: the next save is due at 6
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    if sig == signal.SIGTERM:
        stderr = proc.stderr_text()
        assert code == 75, stderr[-3000:]  # saved and stopped: not 0 (done), so a scheduler can tell
        assert "stopped by SIGTERM at step 4" in stderr and "Traceback" not in stderr, stderr[-3000:]
        assert checkpoints == ["3", "4"]  # the SIGTERM save
        # the data position saved is the one before step 5's batch: the synthetic stream's step counter
        assert json.load(open(os.path.join(workdir, "checkpoints", "4", "data", "metadata")))["processes"] == [
            {"step": 4}]
    else:
        assert code == -signal.SIGKILL
        assert checkpoints == ["3"]
    assert not os.path.exists(os.path.join(workdir, "params"))

    train(tiny_train_config(num_steps=6, **{"checkpoint.every_steps": 3}), workdir)  # resume
    assert_same_params(flat_params(workdir), straight)
