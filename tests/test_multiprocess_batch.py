"""Two processes (gloo): each process's images (and clips) land where the mesh puts its devices, and
every sample's `image_start` (`video_start`) points at its own, whatever the device order; and the training loop's
per-process values (data positions) are exchanged whole."""
import json
import subprocess
import sys

import jax
import pytest

from conftest import REPO, free_port, subprocess_env

WORKER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from owl_jax.training.multihost import all_processes
from owl_jax.training.trainer import global_batch

by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))  # p0 p0 p1 p1
orders = {"process_major": by_process, "reversed": by_process[2:] + by_process[:2],
          "interleaved": [by_process[i] for i in (0, 2, 1, 3)],
          "one_split": [by_process[i] for i in (0, 2, 3, 1)]}  # process 1 is one run, process 0 is not
# Two samples a process, two images each; a sample's id is the value its first image holds.
local = {"pixel_values": (100 * pid + np.arange(4, dtype=np.float32)).reshape(1, 4, 1, 1, 1),
         "image_start": np.array([[0, 2]], np.int32),
         "input_ids": np.array([[100 * pid, 100 * pid + 2]], np.int32),
         # and two clips each, of one frame: a sample's first clip holds its id + 10
         "video_pixels": (100 * pid + 10 + np.arange(4, dtype=np.float32)).reshape(1, 4, 1, 1, 1, 1),
         "video_start": np.array([[0, 2]], np.int32)}
report = {"gathered": all_processes({"process": pid, "pad": "x" * (7 * pid)})}
for name, devices in orders.items():
    mesh = Mesh(np.array(devices), ("data",))
    shardings = {k: NamedSharding(mesh, P(None, "data")) for k in local}
    try:
        batch = global_batch(local, shardings)
    except ValueError as e:
        report[name] = {"error": str(e)}
        continue
    full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in batch.items()}
    first_image = full["pixel_values"][0, full["image_start"][0], 0, 0, 0]
    first_clip = full["video_pixels"][0, full["video_start"][0], 0, 0, 0, 0]
    report[name] = {"sample_ids": full["input_ids"][0].tolist(), "first_images": first_image.tolist(),
                    "first_clips": (first_clip - 10).tolist()}
print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    script = tmp_path_factory.mktemp("worker") / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[7:]) for out, _ in outs]


@pytest.mark.parametrize("order", ["process_major", "reversed"])
def test_every_sample_reads_its_own_images(reports, order):
    for report in reports:
        r = report[order]
        assert sorted(r["sample_ids"]) == [0, 2, 100, 102]
        assert r["first_images"] == r["sample_ids"]  # each row's image_start finds the row's own first image
        assert r["first_clips"] == r["sample_ids"]  # and its video_start its own first clip


@pytest.mark.parametrize("order", ["interleaved", "one_split"])
def test_a_process_whose_images_are_not_one_run_is_refused_by_all(reports, order):
    for report in reports:  # every process refuses: none goes on to wait in a collective alone
        assert "process 0's image slots" in report[order]["error"] and "not one run" in report[order]["error"]


def test_per_process_values_are_gathered_whole(reports):
    expected = [{"process": 0, "pad": ""}, {"process": 1, "pad": "x" * 7}]
    assert [r["gathered"] for r in reports] == [expected, expected]


def test_unshardable_batch_is_refused_with_several_processes(monkeypatch):
    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer

    from conftest import tiny_train_config

    trainer = Trainer(tiny_train_config(**{"mesh.data": 2}), make_mesh({"data": 2, "fsdp": 4}))
    shapes = {"input_ids": (1, 8, 24), "pixel_values": (1, 6, 28, 28, 3)}
    assert trainer.batch_shardings(shapes)["pixel_values"].is_fully_replicated  # one process: replicated
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"config.max_images_per_batch=6 must be a multiple of the 8 devices"):
        trainer.batch_shardings(shapes)
