"""Two processes on localhost (jax.distributed, gloo collectives, 2 x 4 CPU devices) train and
checkpoint; one process with 8 devices restores that checkpoint."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from conftest import TINY_TRAIN_FLAGS, tiny_train_config
from owl_jax import params_io
from owl_jax.sharding import make_mesh
from owl_jax.training.trainer import Trainer

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_one_process_restores(tmp_path):
    workdir = str(tmp_path / "run")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "owl_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}", *TINY_TRAIN_FLAGS,
             "--config.num_steps=3", "--config.checkpoint.every_steps=3", "--config.mesh.data=2",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-4000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    exported, _ = params_io.load_params(os.path.join(workdir, "params"))  # written by process 0

    config = tiny_train_config(num_steps=3)
    config.mesh.update(data=2)
    trainer = Trainer(config, make_mesh(config.mesh.to_dict()))  # 1 process, 8 devices
    assert jax.device_count() == 8
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state, trainer.state_shardings
    )
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data")) as manager:
        restored = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    assert int(restored["step"]) == 3
    ours = traverse_util.flatten_dict(jax.device_get(trainer.params(restored)), sep="/")
    theirs = traverse_util.flatten_dict(exported, sep="/")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert np.array_equal(ours[k], theirs[k]), k
    first = ours["vision_model/embeddings/cls_token"]
    assert restored["trainable"]["vision_model"]["embeddings"]["cls_token"].sharding.mesh.devices.size == 8
    assert np.isfinite(first).all()
