"""Remote (gs://) workdirs. Metrics and params dirs are tested against an in-memory stand-in for GCS
registered with fsspec (what etils.epath uses for gs:// when TensorFlow is not used); a whole
training run (checkpoints, resume, exported params) against a local GCS server that both
tensorstore (orbax's arrays) and gcsfs talk to. Nothing here talks to real GCS."""
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


@pytest.fixture
def gcs_emulator(monkeypatch):
    """A local GCS server (gcp-storage-emulator, in memory, bucket "bucket"): orbax's arrays go to it
    through tensorstore's GCS driver, and everything else through gcsfs, as on Cloud Storage."""
    from etils.epath import backend
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.handlers import objects

    from conftest import free_port

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        # GCS names the object's generation on every read (x-goog-generation); tensorstore refuses a
        # read without it ("Malformed StorageGeneration"), and the emulator does not send it.
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - absent: download answered 404
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    monkeypatch.setattr(objects, "download", download_with_generation)  # objects.get(alt=media) calls it
    for _, methods in emulator.HANDLERS:
        if methods.get(emulator.GET) is download:
            monkeypatch.setitem(methods, emulator.GET, download_with_generation)
    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("EPATH_USE_TF", "0")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's array files
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "unused")  # the emulator takes any token
    fsspec.filesystem("gs").clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield url
    server.stop()
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_checkpoints_and_params_on_a_gs_workdir(gcs_emulator, tmp_path):
    """A run on gs:// saves its checkpoints there, resumes from them, and exports params there that load
    back; the parameters equal those of the same run on a local disk."""
    from flax import traverse_util

    from owl_jax.train import train

    from conftest import tiny_train_config

    run = epath.Path("gs://bucket/owl/run")
    train(tiny_train_config(num_steps=2), str(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    assert (run / "params" / params_io.CONFIG_FILE).exists()
    train(tiny_train_config(num_steps=4), str(run))  # resumes from gs://.../checkpoints/2
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]

    local = str(tmp_path / "run")
    train(tiny_train_config(num_steps=4), local)
    remote_params, remote_cfg = params_io.load_params(str(run / "params"))
    local_params, local_cfg = params_io.load_params(os.path.join(local, "params"))
    assert remote_cfg == local_cfg
    remote_params, local_params = (traverse_util.flatten_dict(p, sep="/") for p in (remote_params, local_params))
    assert remote_params.keys() == local_params.keys()
    for k in local_params:
        assert (remote_params[k] == local_params[k]).all(), k
