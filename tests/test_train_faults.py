"""Training meets a bad workdir, checkpoint or config: a one-line error that names it, or a resume
that skips what is damaged; never lost work, never two runs in one workdir."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from owl_jax.cli import UserError
from owl_jax.train import train
from owl_jax.training import checkpoints

from conftest import REPO, damage_checkpoint, subprocess_env, tiny_train_config


def _metric_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture
def restored_steps(monkeypatch):
    """The step every train() in the test resumed from (None: started fresh)."""
    seen = []
    real = checkpoints.restore_newest_good

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(None if out is None else out[0])
        return out

    monkeypatch.setattr(checkpoints, "restore_newest_good", recording)
    return seen


def test_relative_workdir_trains_and_resumes(tmp_path, monkeypatch, restored_steps):
    monkeypatch.chdir(tmp_path)
    train(tiny_train_config(num_steps=2), "runs/rel")
    assert sorted(os.listdir(tmp_path / "runs/rel/checkpoints")) == ["2"]
    train(tiny_train_config(num_steps=4), "runs/rel")
    assert restored_steps == [None, 2]
    assert sorted(os.listdir(tmp_path / "runs/rel/checkpoints")) == ["2", "4"]
    assert _metric_steps(tmp_path / "runs/rel") == [1, 2, 3, 4]
    assert os.path.exists(tmp_path / "runs/rel/params/owl_config.json")


# ------------------------------------------------------------------------------------ failed saves


def _make_immutable(path, on: bool):
    """Root ignores permission bits, so the directory is made immutable (chattr) for root."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555 if on else 0o755)
        return
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True, text=True)
    if r.returncode != 0 and on:
        pytest.skip(f"cannot make a directory unwritable for root here: {r.stderr.strip()}")


@pytest.mark.parametrize("async_save", [False, True])
def test_unwritable_checkpoint_dir_stops_the_run_and_the_previous_checkpoint_restores(
        tmp_path, monkeypatch, restored_steps, async_save):
    from orbax.checkpoint._src.multihost import multihost as orbax_multihost

    from owl_jax.training.metrics import MetricsWriter

    # The failed save leaves orbax threads waiting for a step directory that never comes, for the
    # coordination timeout (300 s); the test process would wait for them at exit.
    monkeypatch.setattr(orbax_multihost, "_DEFAULT_BARRIER_TIMEOUT", 5)
    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    managers = []
    real_make, real_write = checkpoints.make_manager, MetricsWriter.write

    def make_manager(*args):
        managers.append(real_make(*args))
        return managers[-1]

    def write_then_lock(self, step, metrics):
        real_write(self, step, metrics)
        if step == 3:  # step 2's checkpoint is on disk; the directory goes read-only before step 4's
            checkpoints.wait_for_saves(managers[-1])
            _make_immutable(ckpt_dir, True)
        time.sleep(0.3)  # steps of a real size, so "at once" is measured in steps, not microseconds

    monkeypatch.setattr(checkpoints, "make_manager", make_manager)
    monkeypatch.setattr(MetricsWriter, "write", write_then_lock)
    try:
        with pytest.raises(checkpoints.CheckpointSaveError) as e:
            train(tiny_train_config(num_steps=10, **{"checkpoint.async_save": async_save}), workdir)
    finally:
        _make_immutable(ckpt_dir, False)
    message = str(e.value)
    assert ckpt_dir in message and "newest complete checkpoint is step 2" in message, message
    assert "\n" not in message
    assert max(_metric_steps(workdir)) <= 5  # stopped at the step after the failed save (4), not later
    assert sorted(os.listdir(ckpt_dir)) == ["2"]

    monkeypatch.setattr(MetricsWriter, "write", real_write)
    train(tiny_train_config(num_steps=4), workdir)
    assert restored_steps == [None, 2]
    assert "4" in os.listdir(ckpt_dir)


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("how", ["truncated", "state_cut", "emptied"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, restored_steps, caplog, how):
    workdir = str(tmp_path / "run")
    train(tiny_train_config(num_steps=4), workdir)
    damage_checkpoint(os.path.join(workdir, "checkpoints", "4"), how)
    caplog.set_level("WARNING")
    train(tiny_train_config(num_steps=6), workdir)
    assert restored_steps == [None, 2]
    warnings = [r.getMessage() for r in caplog.records if "checkpoint step 4" in r.getMessage()]
    assert len(warnings) == 1 and "skipped" in warnings[0], [r.getMessage() for r in caplog.records]
    skipped = os.listdir(os.path.join(workdir, "checkpoints_skipped"))
    assert len(skipped) == 1 and skipped[0].startswith("4-")  # kept for inspection, out of the way
    assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_every_step_damaged_refuses_to_start_over(tmp_path):
    workdir = str(tmp_path / "run")
    train(tiny_train_config(num_steps=2), workdir)
    with open(os.path.join(workdir, "checkpoints", "2", "metrics", "metrics"), "w") as f:
        f.write('{"loss": 4.1')
    for _ in range(2):  # the refusal moves nothing, so a rerun (a requeued job) is refused again
        with pytest.raises(UserError, match="every checkpoint step in .* is damaged .*step 2: metrics/metrics"):
            train(tiny_train_config(num_steps=4), workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert _metric_steps(workdir) == [1, 2]


def test_checkpoint_of_another_config_is_one_line_and_left_alone(tmp_path):
    workdir = str(tmp_path / "run")
    train(tiny_train_config(num_steps=2), workdir)
    with pytest.raises(UserError) as e:
        train(tiny_train_config(num_steps=4, **{"model.llm.mlp_size": 96}), workdir)
    message = str(e.value)
    assert "no checkpoint in" in message and "step 2:" in message and "new --workdir" in message, message
    assert "\n" not in message
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]  # nothing moved or deleted
    assert not os.path.exists(os.path.join(workdir, "checkpoints_skipped"))


# ------------------------------------------------------------------------------------ one run per workdir


def test_second_run_on_a_busy_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    with checkpoints.WorkdirLock(workdir):
        with pytest.raises(UserError, match=f"{workdir} is in use by pid {os.getpid()}"):
            train(tiny_train_config(num_steps=2), workdir)
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    workdir = str(tmp_path / "run")
    code = ("import sys, time; from owl_jax.training.checkpoints import WorkdirLock; "
            "lock = WorkdirLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, workdir], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by pid {proc.pid}"):
            checkpoints.WorkdirLock(workdir).__enter__()
    finally:
        proc.kill()
        proc.wait()
    with checkpoints.WorkdirLock(workdir):  # the kernel dropped the dead process's lock
        pass


# ------------------------------------------------------------------------------------ config mistakes


@pytest.mark.parametrize("override, field", [
    ({"checkpoint.every_steps": 0}, "config.checkpoint.every_steps must be >= 1"),
    ({"log_every_steps": 0}, "config.log_every_steps must be >= 1"),
    ({"batch_size": 4}, "config.batch_size=4 must be a multiple of the 8 devices"),  # conftest's 8-device mesh
])
def test_config_mistakes_are_refused_before_training(tmp_path, override, field):
    with pytest.raises(UserError) as e:
        train(tiny_train_config(num_steps=2, **override), str(tmp_path / "run"))
    assert field in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before the checkpoints, the compile


class EditedBatches:
    """The training iterator with `edit(batch, index)` applied to every batch it yields."""

    def __init__(self, inner, edit):
        self.inner, self.edit, self.index = inner, edit, 0

    def __next__(self):
        batch = next(self.inner)
        self.edit(batch, self.index)
        self.index += 1
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def edit_batches(monkeypatch, edit):
    from owl_jax.training import data_source

    real = data_source.make_data_iterator
    monkeypatch.setattr(data_source, "make_data_iterator", lambda *a, **k: EditedBatches(real(*a, **k), edit))


def test_batches_without_answer_tokens_warn(tmp_path, monkeypatch, caplog):
    """A seq_len that cuts every answer leaves nothing to learn: the console says so."""
    edit_batches(monkeypatch, lambda batch, _: batch["loss_mask"].fill(0))
    caplog.set_level("WARNING")
    train(tiny_train_config(num_steps=2, seq_len=24), str(tmp_path / "run"))
    assert any("no answer token in the batch" in r.getMessage() and "seq_len=24" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("log_every_steps", [1, 100])
def test_a_non_finite_loss_stops_the_run_before_it_is_saved(tmp_path, monkeypatch, log_every_steps):
    """NaN pixels in step 3's batch: the run stops with the step named, whether the step is logged
    (log_every_steps=1) or only saved (step 4's checkpoint); the good checkpoint of step 2 stays the
    newest, so a rerun resumes from it."""

    def poison(batch, index):
        if index == 2:
            batch["pixel_values"][:] = np.nan

    edit_batches(monkeypatch, poison)
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=f"step {3 if log_every_steps == 1 else 4}: loss nan") as e:
        train(tiny_train_config(num_steps=6, log_every_steps=log_every_steps), workdir)
    assert "last checkpoint: 2" in str(e.value)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]


# ------------------------------------------------------------------------------------ command line


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("module", ["owl_jax.train", "owl_jax.demo.run", "owl_jax.demo.towers", "owl_jax.aot"])
def test_help_exits_zero_and_lists_the_flags(module):
    r = _cli(module, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--config" in r.stdout and (module == "owl_jax.aot" or "--workdir" in r.stdout)


def test_config_typo_is_one_line(tmp_path):
    r = _cli("owl_jax.train", f"--config={REPO}/configs/tiny.py", f"--workdir={tmp_path}/w", "--config.optim.lrr=1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and 'Did you mean "lr"' in r.stderr, r.stderr


def test_cli_from_a_relative_workdir_logs_progress_as_info_and_exits_zero(tmp_path):
    from conftest import TINY_TRAIN_FLAGS

    r = _cli("owl_jax.train", f"--config={REPO}/configs/tiny.py", "--workdir=runs/cli", *TINY_TRAIN_FLAGS,
             "--config.num_steps=2", "--config.checkpoint.every_steps=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isdir(tmp_path / "runs" / "cli" / "checkpoints" / "2")
    # absl's prefix: I (info) or W/E, then the date; the progress bar may share a line with it
    for said in ("mesh {", "compiling the training step", "compiled and dispatched the first step"):
        assert re.search(r"I\d{4} [^\n]*train\.py:\d+\] " + re.escape(said), r.stderr), (said, r.stderr[-3000:])
    ours = re.findall(r"[WE]\d{4} [^\n]*(?:train|checkpoints)\.py:\d+\][^\n]*", r.stderr)
    assert not ours, ours  # routine progress is not a warning
