"""Metrics to TensorBoard event files and workdir/metrics.jsonl; process 0 only (the console bar is
train.py's, also process 0 only).

Local workdirs are written in place. A remote workdir (any `scheme://`, e.g. `gs://bucket/run`)
is written through a local staging directory that is copied to `WORKDIR/metrics.jsonl` and
`WORKDIR/tensorboard/` with `etils.epath` every `sync_every_s` seconds and at `close()` (which
train.py reaches on a normal end and on SIGTERM preemption). Object stores cannot append, so each
sync rewrites the files that changed; a resumed run first downloads the existing metrics.jsonl so
it keeps appending to one history. A SIGKILL loses at most the last `sync_every_s` of metrics,
never checkpoints (orbax writes those to the workdir itself).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid

import jax

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def is_remote(path: str) -> bool:
    return "://" in str(path)


class MetricsWriter:
    """`resume_step`: the step a training run starts from (0: from scratch). The rows its stage logged
    after that step (taken before a kill, after the last checkpoint) are dropped: the run takes those
    steps again. None keeps every row. A line a kill cut short is always dropped."""

    def __init__(self, workdir: str, stage: str, sync_every_s: float = 60.0, enabled: bool | None = None,
                 resume_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.stage = stage
        self.workdir = str(workdir)
        self.remote = is_remote(self.workdir)
        self.sync_every_s = sync_every_s
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        if self.remote:
            from etils import epath

            self._local = tempfile.mkdtemp(prefix="owl_metrics_")
            remote_jsonl = epath.Path(self.workdir) / JSONL
            if remote_jsonl.exists():
                with open(os.path.join(self._local, JSONL), "wb") as f:
                    f.write(remote_jsonl.read_bytes())
        else:
            self._local = self.workdir
            os.makedirs(self._local, exist_ok=True)
        self._synced: dict[str, tuple[int, int]] = {}
        self._last_sync = time.monotonic()
        # A unique suffix keeps two runs that start within the same second (a quick resume) apart.
        self._tb = SummaryWriter(os.path.join(self._local, TENSORBOARD), filename_suffix=f".{uuid.uuid4().hex[:8]}")
        jsonl = os.path.join(self._local, JSONL)
        if os.path.exists(jsonl):
            with open(jsonl) as f:
                rows = f.readlines()
            kept = [r for r in rows if r.endswith("\n") and not _after(r, stage, resume_step)]
            if len(kept) < len(rows):
                with open(jsonl, "w") as f:
                    f.writelines(kept)
        self._jsonl = open(jsonl, "a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        self._jsonl.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self.remote and time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Copies new or changed staged files to a remote workdir (no-op for a local one)."""
        if not (self.enabled and self.remote):
            return
        self._tb.flush()
        self._jsonl.flush()
        self._upload()

    def _upload(self) -> None:
        from etils import epath

        for root, _, files in os.walk(self._local):
            for name in files:
                local = os.path.join(root, name)
                st = os.stat(local)
                key = (st.st_size, st.st_mtime_ns)
                rel = os.path.relpath(local, self._local)
                if self._synced.get(rel) == key:
                    continue
                target = epath.Path(self.workdir) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(local, "rb") as f:
                    target.write_bytes(f.read())
                self._synced[rel] = key
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self._tb.close()
        self._jsonl.close()
        if self.remote:
            self._upload()
            shutil.rmtree(self._local, ignore_errors=True)


def _after(row: str, stage: str, step: int | None) -> bool:
    try:
        r = json.loads(row)
    except json.JSONDecodeError:  # a line cut by a kill mid-write
        return True
    return step is not None and r.get("stage") == stage and r.get("step", 0) > step
