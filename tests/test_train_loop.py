"""The training loop on a real (tiny) TFDS dataset: a finite number of epochs ends the run cleanly
(saved, exported, and a rerun finds it done); a tokenizer larger than the model's vocabulary is
refused before the first step."""
import json
import os

import pytest

from owl_jax.train import train

from conftest import SHAPESWORLD_VOCAB, tiny_train_config


def _config(dataset_dir, **overrides):
    return tiny_train_config(**{
        "data.source": "tfds", "data.dataset": "shapesworld", "data.dataset_dir": dataset_dir,
        "data.split": "captions_train", "data.num_epochs": 1, "data.read_threads": 1,
        "model.llm.vocab_size": SHAPESWORLD_VOCAB, "seq_len": 96, "num_steps": 50, "checkpoint.every_steps": 50,
        **overrides})


def test_one_epoch_ends_the_run_saved_and_exported(shapesworld_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train(_config(shapesworld_dir), workdir)  # 16 captions in batches of 8: two steps, then the data ends
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    saved = json.load(open(os.path.join(workdir, "checkpoints", "2", "metrics", "metrics")))
    assert 0 < saved["loss"] < 100  # ranked by a real loss, so retention policies can drop it later
    positions = json.load(open(os.path.join(workdir, "checkpoints", "2", "data", "metadata")))
    assert positions["process_count"] == 1 and len(positions["processes"]) == 1
    assert os.path.isdir(os.path.join(workdir, "params"))
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [1, 2]

    train(_config(shapesworld_dir), workdir)  # the rerun resumes at the end of the data: nothing more to do
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == [1, 2]


def test_tokenizer_larger_than_the_vocabulary_is_refused(shapesworld_dir, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer at .*tokenizer has \d+ tokens, more than "
                                         r"config.model.llm.vocab_size=64"):
        train(_config(shapesworld_dir, **{"model.llm.vocab_size": 64}), str(tmp_path / "run"))


def test_retention_holds_across_restarts(tmp_path):
    """keep=1 + keep_best: the latest and the best checkpoint survive, also of an earlier run (whose
    metrics orbax must have written to disk, else BestN keeps them forever)."""
    workdir = str(tmp_path / "run")
    keep = {"checkpoint.every_steps": 1, "checkpoint.keep": 1, "checkpoint.keep_best": True}
    train(tiny_train_config(num_steps=3, **keep), workdir)
    train(tiny_train_config(num_steps=6, **keep), workdir)
    kept = sorted(int(x) for x in os.listdir(os.path.join(workdir, "checkpoints")))
    losses = {
        json.loads(line)["step"]: json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))
    }
    assert kept == sorted({6, min(losses, key=losses.get)}), (kept, losses)


def test_resumed_run_drops_the_metrics_of_steps_it_takes_again(tmp_path):
    from owl_jax.training.metrics import MetricsWriter

    rows = [{"stage": "stage0", "step": 9}] + [{"stage": "stage1", "step": s, "loss": 1.0} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "stage1", "st')
    writer = MetricsWriter(str(tmp_path), "stage1", resume_step=3)  # killed at 5 (and mid-line), saved at 3
    writer.write(4, {"loss": 0.5})
    writer.close()
    got = [(r["stage"], r["step"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    assert got == [("stage0", 9), ("stage1", 1), ("stage1", 2), ("stage1", 3), ("stage1", 4)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "stage1", "st')  # cut again
    MetricsWriter(str(tmp_path), "stage1").close()  # no resume step: every whole row stays
    assert [(r["stage"], r["step"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))] == got
