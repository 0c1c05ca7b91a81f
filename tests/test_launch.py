"""The launchers' command lines: launch/local.sh (its real 2-process training is in
test_multiprocess_train.py), launch/tpu_pod.sh and launch/gpu_slurm.sbatch, checked through
--dry-run / DRY_RUN=1, and local.sh stopping every process when one fails."""
import os
import shlex
import subprocess
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LAUNCH = os.path.join(ROOT, "launch")


def _run(cmd, env=None, timeout=60, **kw):
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, **kw)


def _lines(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.strip().splitlines()]


def _bash_parses(command: str) -> None:
    r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert r.returncode == 0, (command, r.stderr)


# ------------------------------------------------------------------------------------ local
# launch/local.sh really training: tests/test_multiprocess_train.py


def test_local_stops_every_process_when_one_fails(tmp_path):
    fake = tmp_path / "fake_python"  # process 1 fails at once; process 0 would wait for ever
    fake.write_text("#!/usr/bin/env bash\n"
                    "for a in \"$@\"; do [[ $a == --process_id=1 ]] && { echo boom >&2; exit 3; }; done\n"
                    "exec sleep 300\n")
    fake.chmod(0o755)
    start = time.time()
    r = _run(["bash", f"{LAUNCH}/local.sh", "--port=1", f"--log-dir={tmp_path}/logs", "2", "--config=x"],
             env={"PYTHON": str(fake)}, timeout=60)
    assert r.returncode == 3
    assert "process 1" in r.stderr and "boom" in r.stderr
    assert time.time() - start < 30  # process 0 was stopped, not waited for


def test_local_dry_run_and_usage():
    r = _run(["bash", f"{LAUNCH}/local.sh", "--dry-run", "--port=4567", "--devices-per-process=4", "2",
              "--config=configs/tiny.py", "--workdir=/tmp/w"], env={"PYTHON": "python", "XLA_FLAGS": "--xla_foo=1"})
    assert r.returncode == 0, r.stderr
    expected = ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=4", "python",
                "-m", "owl_jax.train", "--config=configs/tiny.py", "--workdir=/tmp/w",
                "--coordinator_address=127.0.0.1:4567", "--num_processes=2"]
    assert _lines(r.stdout) == [expected + ["--process_id=0"], expected + ["--process_id=1"]]
    assert _run(["bash", f"{LAUNCH}/local.sh", "two"]).returncode == 2
    assert _run(["bash", f"{LAUNCH}/local.sh", "--devices-per-process=0", "2"]).returncode == 2


# -------------------------------------------------------------------------------------- TPU
TPU_ARGS = ["--tpu=owl-v5e-16", "--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--project=my-proj",
            "--config=configs/mplug_owl_llama7b.py:stage1", "--workdir=gs://my-bucket/owl/stage1"]
GFLAGS = ["--zone=us-west4-a", "--project=my-proj"]


def test_tpu_pod_dry_run_prints_every_command():
    r = _run(["bash", f"{LAUNCH}/tpu_pod.sh", "--dry-run", *TPU_ARGS, "--create", "--spot", "--",
              "--config.num_steps=10", "--config.data.dataset_dir=gs://my-bucket/data dir"])
    assert r.returncode == 0, r.stderr
    create, tar, scp, unpack, install, train = _lines(r.stdout)
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "owl-v5e-16", *GFLAGS,
                      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert (
        tar[:2] == ["bash", "-c"]
        and f"cd {ROOT} && git ls-files" in tar[2]
        and "/tmp/owl_jax_src_owl-v5e-16.tgz" in tar[2]
    )
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/owl_jax_src_owl-v5e-16.tgz",
                   "owl-v5e-16:owl_jax_src.tgz", *GFLAGS, "--worker=all"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "owl-v5e-16", *GFLAGS, "--worker=all"]
    for line in (unpack, install, train):
        assert line[:-1] == ssh and line[-1].startswith("--command=")
        _bash_parses(line[-1][len("--command="):])
    assert "tar -xzf ~/owl_jax_src.tgz -C $HOME/owl_jax" in unpack[-1]
    assert '-e "$HOME/owl_jax[tpu]" gcsfs tensorboardX' in install[-1] and "--python 3.11" in install[-1]
    remote = train[-1][len("--command="):]
    assert ("$HOME/owl_venv/bin/python -m owl_jax.train --config=configs/mplug_owl_llama7b.py:stage1 "
            "--workdir=gs://my-bucket/owl/stage1 --config.num_steps=10 "
            "--config.data.dataset_dir=gs://my-bucket/data\\ dir") in remote
    assert "gcloud storage cp -q ~/owl_train.log gs://my-bucket/owl/stage1/logs/$(hostname).log" in remote
    assert remote.endswith("exit $rc")


def test_tpu_pod_dry_run_resume_git_and_detach():
    r = _run(
        ["bash", f"{LAUNCH}/tpu_pod.sh", "--dry-run", *TPU_ARGS, "--skip-setup", "--detach", "--env=OWL_DISTRIBUTED=on"]
    )
    assert r.returncode == 0, r.stderr
    (train,) = _lines(r.stdout)  # a resume: no create, copy or install, only the training command
    remote = train[-1][len("--command="):]
    _bash_parses(remote)
    assert remote.startswith("nohup bash -c ") and "OWL_DISTRIBUTED=on" in remote
    inner = shlex.split(remote)[3]  # what each worker's background bash runs
    _bash_parses(inner)
    assert (
        "> ~/owl_train.log 2>&1" in inner and "-m owl_jax.train --config=configs/mplug_owl_llama7b.py:stage1" in inner
    )

    r = _run(["bash", f"{LAUNCH}/tpu_pod.sh", "--dry-run", *TPU_ARGS, "--code=git", "--repo=https://example.com/owl_jax.git",
              "--ref=v0.1"])
    clone = _lines(r.stdout)[0]
    assert clone[-1] == ("--command=rm -rf $HOME/owl_jax && git clone https://example.com/owl_jax.git $HOME/owl_jax "
                         "&& git -C $HOME/owl_jax checkout v0.1")


@pytest.mark.parametrize("args", [TPU_ARGS[1:], [*TPU_ARGS, "--code=git"], [*TPU_ARGS, "stray"]])
def test_tpu_pod_rejects_incomplete_arguments(args):
    r = _run(["bash", f"{LAUNCH}/tpu_pod.sh", "--dry-run", *args])
    assert r.returncode == 2 and r.stdout == ""


# ------------------------------------------------------------------------------------ SLURM
def test_slurm_dry_run_prints_sbatch_and_srun():
    args = ["--config=configs/mplug_owl_llama7b.py:stage1", "--workdir=/shared/owl/stage1", "--config.mesh.fsdp=-1"]
    r = _run(["bash", f"{LAUNCH}/gpu_slurm.sbatch", *args], env={"DRY_RUN": "1", "PYTHON": "/venv/bin/python"})
    assert r.returncode == 0, r.stderr
    sbatch, srun = _lines(r.stdout)
    assert sbatch == ["sbatch", f"{LAUNCH}/gpu_slurm.sbatch", *args]
    assert srun == ["srun", "--kill-on-bad-exit=1", "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92", "/venv/bin/python",
                    "-m", "owl_jax.train", *args]
    # inside an allocation only the srun line; SRUN_EXTRA is passed on
    r = _run(["bash", f"{LAUNCH}/gpu_slurm.sbatch", *args],
             env={"DRY_RUN": "1", "SLURM_JOB_ID": "7", "SRUN_EXTRA": "--label", "PYTHON": "python"})
    assert _lines(r.stdout) == [
        [
            "srun",
            "--kill-on-bad-exit=1",
            "--label",
            "env",
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
            "python",
            "-m",
            "owl_jax.train",
            *args,
        ]
    ]
    # outside SLURM without DRY_RUN it refuses; --config/--workdir are required
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    assert subprocess.run(["bash", f"{LAUNCH}/gpu_slurm.sbatch", *args], env=env, capture_output=True).returncode == 2
    assert _run(["bash", f"{LAUNCH}/gpu_slurm.sbatch", "--config=c"], env={"DRY_RUN": "1"}).returncode == 2


def test_slurm_directives_come_before_any_command():
    """sbatch stops reading #SBATCH lines at the first command."""
    lines = open(f"{LAUNCH}/gpu_slurm.sbatch").read().splitlines()
    first_command = next(i for i, l in enumerate(lines[1:], 1) if l.strip() and not l.startswith("#"))
    directives = [i for i, l in enumerate(lines) if l.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    assert "#SBATCH --signal=TERM@300" in lines  # SIGTERM before the time limit: train.py saves and exits
