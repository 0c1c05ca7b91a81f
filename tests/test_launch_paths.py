"""Remote (gs://) workdirs for metrics and params dirs, tested against an in-memory stand-in for GCS
registered with fsspec (what etils.epath uses for gs:// when TensorFlow is not used). This checks
the path handling only; nothing here talks to real GCS."""
import json
import os
import struct

import fsspec
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from owl_jax import params_io
from owl_jax.training.metrics import MetricsWriter


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return "/" + path.lstrip("/")


@pytest.fixture
def fake_gcs(monkeypatch):
    import importlib

    from etils.epath import backend

    registry = importlib.import_module("fsspec.registry")  # fsspec.registry is also a read-only mapping
    monkeypatch.setenv("EPATH_USE_TF", "0")  # epath's gs:// goes through fsspec, i.e. FakeGCS
    saved = {k: registry._registry.get(k) for k in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    yield FakeGCS.store
    for name, impl in saved.items():
        if impl is None:
            registry._registry.pop(name, None)
        else:
            fsspec.register_implementation(name, impl, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()


def _scalars(event_file_bytes: bytes) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out, pos = [], 0
    while pos < len(event_file_bytes):
        (length,) = struct.unpack("<Q", event_file_bytes[pos:pos + 8])
        data = event_file_bytes[pos + 12:pos + 12 + length]
        pos += 12 + length + 4
        event = event_pb2.Event.FromString(data)
        for v in event.summary.value:
            out.append((v.tag, event.step, v.simple_value))
    return out


def test_metrics_to_a_gs_workdir(fake_gcs):
    run = epath.Path("gs://bucket/owl/run")
    w = MetricsWriter(str(run), "stage1", sync_every_s=3600)
    w.write(1, {"loss": 2.0})
    assert not (run / "metrics.jsonl").exists()  # staged locally until the next sync
    w.sync()
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    w.write(2, {"loss": 1.5})
    w.close()
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(l["stage"], l["step"], l["loss"]) for l in lines] == [("stage1", 1, 2.0), ("stage1", 2, 1.5)]
    (event_file,) = (run / "tensorboard").iterdir()
    assert _scalars(event_file.read_bytes()) == [("stage1/loss", 1, 2.0), ("stage1/loss", 2, 1.5)]
    assert not os.path.exists(w._local)  # the staging directory is gone

    # A resumed run (a new process) appends to the same metrics.jsonl, in a new event file.
    w = MetricsWriter(str(run), "stage1", sync_every_s=0)
    w.write(3, {"loss": 1.0})  # sync_every_s=0: copied at once
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    w.close()
    assert len(list((run / "tensorboard").iterdir())) == 2


def test_metrics_only_process_0_writes(tmp_path, fake_gcs):
    for workdir in (str(tmp_path / "run"), "gs://bucket/other"):
        w = MetricsWriter(workdir, "stage1", enabled=False)  # what jax.process_index() != 0 gives
        w.write(1, {"loss": 1.0})
        w.sync()
        w.close()
    assert not os.path.exists(tmp_path / "run") and fake_gcs == {}


def test_metrics_local_workdir_is_written_in_place(tmp_path):
    w = MetricsWriter(str(tmp_path / "run"), "stage2_lora")
    w.write(5, {"loss": 0.5})
    assert (tmp_path / "run" / "metrics.jsonl").read_text().strip()  # flushed at every write, no staging
    w.close()
    (event_file,) = (tmp_path / "run" / "tensorboard").iterdir()
    assert _scalars(event_file.read_bytes()) == [("stage2_lora/loss", 5, 0.5)]


def test_params_dir_config_on_gs(fake_gcs):
    """params_io keeps gs:// paths as URIs (before: os.path.abspath turned them into local paths)."""
    from conftest import small_owl_config

    cfg = small_owl_config()
    d = epath.Path("gs://bucket/owl/params")
    with pytest.raises(FileNotFoundError, match="gs://bucket/owl/params/owl_config.json"):
        params_io.load_config(str(d))
    d.mkdir(parents=True, exist_ok=True)
    from owl_jax.models.config import owl_config_to_dict

    (d / params_io.CONFIG_FILE).write_text(json.dumps(owl_config_to_dict(cfg)))
    assert params_io.load_config("gs://bucket/owl/params") == cfg
    assert str(params_io._path("gs://bucket/owl/params")) == "gs://bucket/owl/params"
    assert str(params_io._path("relative/dir")) == os.path.abspath("relative/dir")
