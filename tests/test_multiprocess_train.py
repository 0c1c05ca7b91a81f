"""Two training processes (gloo, 4 CPU devices each, mesh data 2 x fsdp 4) on the real grain
pipeline, launched by launch/local.sh or one by one:

- they train, checkpoint and export together;
- a SIGTERM that reaches process 0 alone, in the middle of a checkpoint interval, stops both at the
  same step and saves it; the rerun reads on from each process's own (mid-epoch) data position and
  ends bit-identical to the uninterrupted run;
- with that newest checkpoint damaged, both processes agree to resume from the one before;
- a busy workdir is refused by both;
- one process with 8 devices (mesh fsdp 8) restores their checkpoint exactly and trains on, its
  data stream restarted as documented.
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
from flax import traverse_util
from test_resume import assert_same_params, flat_params, start_preemptible, wait_for_file

from conftest import (
    REPO,
    SHAPESWORLD_VOCAB,
    TINY_TRAIN_FLAGS,
    LoggedProcess,
    damage_checkpoint,
    free_port,
    subprocess_env,
    tiny_train_config,
)

STEPS = ["--config.num_steps=4", "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False"]


def data_overrides(dataset_dir):
    # 16 captions: each process reads 8 of them, 4 a step, so an epoch is 2 steps.
    return {"data.source": "tfds", "data.dataset": "shapesworld", "data.dataset_dir": dataset_dir,
            "data.split": "captions_train", "data.read_threads": 1, "model.llm.vocab_size": SHAPESWORLD_VOCAB,
            "seq_len": 96}


def train_args(workdir, dataset_dir):
    data = [f"--config.{k}={v}" for k, v in data_overrides(dataset_dir).items()]
    return ["--config=configs/tiny.py", f"--workdir={workdir}", *TINY_TRAIN_FLAGS, *data, "--config.mesh.data=2",
            *STEPS]


def two_processes(args, preemptible_marker=None, hang_before_step=0):
    """Starts process 0 and 1 of a 2-process run (4 fake CPU devices each); process 0 may wait for a
    signal before a step's batches (tests/preemptible_train.py)."""
    port = free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = []
    for i in range(2):
        full = [*args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
        if preemptible_marker:
            procs.append(start_preemptible(full, hang_before_step, preemptible_marker, env=env))
        else:
            procs.append(LoggedProcess([sys.executable, "-m", "owl_jax.train", *full], cwd=REPO,
                                       env=subprocess_env(**env), stdout=subprocess.DEVNULL))
    return procs


def wait_all(procs, timeout=600):
    """[(exit code, stderr)] of every process; a process left hanging is killed."""
    results = []
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, proc.stderr_text()))
    return results


def metric_steps(workdir):
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shapesworld_dir):
    """The uninterrupted 2-process run, through launch/local.sh: (workdir, log dir)."""
    root = tmp_path_factory.mktemp("straight")
    workdir, logs = str(root / "run"), str(root / "logs")
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "--devices-per-process=4",
                        f"--log-dir={logs}", "2", *train_args(workdir, shapesworld_dir)],
                       cwd=REPO, env=subprocess_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + "".join(open(f"{logs}/process_{i}.log").read()[-2000:] for i in (0, 1))
    return workdir, logs


def test_local_sh_trains_checkpoints_and_exports_from_both_processes(straight):
    workdir, logs = straight
    assert sorted(os.listdir(logs)) == ["process_0.log", "process_1.log"]
    assert "2 processes" in open(f"{logs}/process_0.log").read()  # train.py's mesh line
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    positions = json.load(open(os.path.join(workdir, "checkpoints", "4", "data", "metadata")))
    assert positions["process_count"] == 2 and len(positions["processes"]) == 2
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1  # process 0 only
    assert metric_steps(workdir) == [1, 2, 3, 4]  # each step logged once: process 1 wrote nothing
    assert os.path.isdir(os.path.join(workdir, "params"))  # gathered from both processes


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, shapesworld_dir):
    """A 2-process run whose process 0 alone gets SIGTERM before step 4 (step 2 was saved, 4 is due):
    (workdir, [(exit code, stderr)] of both)."""
    root = tmp_path_factory.mktemp("preempted")
    workdir, marker = str(root / "run"), str(root / "hanging")
    procs = two_processes(train_args(workdir, shapesworld_dir), preemptible_marker=marker, hang_before_step=3)
    wait_for_file(marker, procs)
    procs[0].send_signal(15)
    return workdir, wait_all(procs, timeout=300)


def test_sigterm_to_one_process_stops_both_saved_at_the_same_step(preempted):
    workdir, results = preempted
    for code, stderr in results:
        assert code == 75, stderr[-3000:]
        assert "stopped by SIGTERM at step 3" in stderr, stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
    positions = json.load(open(os.path.join(workdir, "checkpoints", "3", "data", "metadata")))
    assert positions["process_count"] == 2 and len(positions["processes"]) == 2


def _resume(workdir, dataset_dir):
    results = wait_all(two_processes(train_args(workdir, dataset_dir)))
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    return results


def test_two_process_resume_from_the_sigterm_save_matches_the_uninterrupted_run(preempted, straight, shapesworld_dir,
                                                                                tmp_path):
    workdir = str(tmp_path / "resumed")
    shutil.copytree(preempted[0], workdir)  # the fixture's workdir stays as the SIGTERM left it
    results = _resume(workdir, shapesworld_dir)
    assert "resumed from" in results[0][1] and "step 3" in results[0][1]
    assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))
    assert_same_params(flat_params(workdir), flat_params(straight[0]))


def test_two_processes_agree_to_skip_a_damaged_newest_checkpoint(preempted, straight, shapesworld_dir, tmp_path):
    workdir = str(tmp_path / "damaged")
    shutil.copytree(preempted[0], workdir)
    damage_checkpoint(os.path.join(workdir, "checkpoints", "3"), "state_cut")
    results = _resume(workdir, shapesworld_dir)
    assert "checkpoint step 3" in results[0][1] and "skipped" in results[0][1], results[0][1][-3000:]
    assert "resumed from" in results[0][1] and "step 2" in results[0][1]
    (skipped,) = os.listdir(os.path.join(workdir, "checkpoints_skipped"))
    assert skipped.startswith("3-")
    # from step 2 the data positions still line up: the same parameters as the uninterrupted run
    assert_same_params(flat_params(workdir), flat_params(straight[0]))


def test_both_processes_refuse_a_busy_workdir(shapesworld_dir, tmp_path):
    workdir = tmp_path / "busy"
    workdir.mkdir()
    with open(workdir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on somewhere\n")
        held.flush()
        results = wait_all(two_processes(train_args(str(workdir), shapesworld_dir)), timeout=300)
    for code, stderr in results:
        assert code == 2 and f"{workdir} is in use by" in stderr, stderr[-3000:]
    assert "pid 4242 on somewhere" in results[0][1]  # process 0 names the holder
    assert not os.path.exists(workdir / "checkpoints")


def test_one_process_on_another_mesh_restores_the_two_process_checkpoint(straight, shapesworld_dir, tmp_path, caplog):
    """Processes 2 -> 1 and mesh data 2 x fsdp 4 -> fsdp 8: the state is restored bit for bit; the
    data stream starts over (positions of 2 processes' shards do not map onto 1)."""
    import orbax.checkpoint as ocp

    from owl_jax.sharding import make_mesh
    from owl_jax.train import train
    from owl_jax.training.trainer import Trainer

    config = tiny_train_config(num_steps=5, **data_overrides(shapesworld_dir), **{"checkpoint.every_steps": 2})
    mesh = make_mesh(config.mesh.to_dict())
    assert jax.process_count() == 1 and dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    trainer = Trainer(config, mesh)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state, trainer.state_shardings
    )
    with ocp.CheckpointManager(os.path.join(straight[0], "checkpoints"), item_names=("state", "data")) as manager:
        restored = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    assert int(restored["step"]) == 4
    for leaf, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(trainer.state_shardings)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    ours = traverse_util.flatten_dict(jax.device_get(trainer.params(restored)), sep="/")
    assert_same_params(ours, flat_params(straight[0]))

    workdir = str(tmp_path / "one")
    shutil.copytree(straight[0], workdir)
    shutil.rmtree(os.path.join(workdir, "params"))
    with caplog.at_level("WARNING"):
        train(config, workdir)
    assert "from 2 processes, this run has 1: the data stream starts from its beginning" in caplog.text
    assert metric_steps(workdir) == [1, 2, 3, 4, 5]
    # the newest two, and the lowest-loss one if it is older (checkpoint.keep_best): data-dependent
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = {r["step"]: r["loss"] for r in rows}
    best = min((2, 4, 5), key=losses.get)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted({"4", "5", str(best)})
