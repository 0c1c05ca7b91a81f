"""Metrics to the console (tqdm), TensorBoard event files and workdir/metrics.jsonl; process 0 only."""
from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
    def __init__(self, workdir: str, stage: str):
        self.enabled = jax.process_index() == 0
        self.stage = stage
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        self._jsonl.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
