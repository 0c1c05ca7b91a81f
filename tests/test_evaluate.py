"""The OwlEval runner (python -m owl_jax.evaluate owleval) over the real 82 questions / 50 images."""
import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import small_owl_config
from owl_jax import evaluate
from owl_jax.data.conversation import SYSTEM_PROMPT
from owl_jax.data.tokenizer import train_tokenizer
from owl_jax.params_io import save_params
from test_generate import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWLEVAL = os.environ.get("OWLEVAL_DIR", os.path.join(REPO, "..", "shared", "data", "owleval"))
needs_data = pytest.mark.skipif(not os.path.exists(os.path.join(OWLEVAL, "questions.jsonl")),
                                reason=f"no OwlEval data at {OWLEVAL} (set OWLEVAL_DIR)")
FIELDS = ["image", "question_id", "question", "answer", "model_id"]


class RecordingOwl:
    """Stands in for Owl: records the requests, answers 'A<question>'."""

    def __init__(self):
        self.requests = []

    def images(self, paths):
        assert all(os.path.exists(p) for p in paths)
        return [np.zeros((4, 4, 3), np.float32) for _ in paths]

    def generate(self, requests, batch_size, sampling, progress):
        self.requests += requests
        progress(len(requests))
        return ["A" + r["messages"][-1]["content"] for r in requests]


@needs_data
def test_conversations_keep_earlier_answers_in_the_context(tmp_path):
    questions = evaluate.read_jsonl(os.path.join(OWLEVAL, "questions.jsonl"))
    convs = evaluate.owleval_conversations(questions)
    assert sum(map(len, convs)) == 82 and len(convs) == len({q["image"] for q in questions}) == 50
    owl = RecordingOwl()
    rows = evaluate.run_owleval(owl, OWLEVAL, str(tmp_path / "a.jsonl"), progress=False)
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    assert all(r["answer"] == "A" + r["question"] for r in rows)
    by_last = {r["messages"][-1]["content"]: r["messages"] for r in owl.requests}
    for conv in convs:
        messages = by_last[conv[-1]["question"]]
        assert [m["content"] for m in messages] == [x for q in conv for x in (q["question"], "A" + q["question"])][:-1]


@needs_data
def test_owleval_runner_writes_82_answers_with_a_tiny_model(tmp_path):
    questions = evaluate.read_jsonl(os.path.join(OWLEVAL, "questions.jsonl"))
    ckpt = tmp_path / "tiny"
    cfg = small_owl_config()
    # Positions for the longest conversation (8 rounds, the earlier answers in context): 256 are too few.
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=1024, max_position_embeddings=1024))
    save_params(str(ckpt), random_params(cfg, seed=11), cfg)
    # A tokenizer that knows the questions keeps the prompts (and the compiled buckets) short.
    train_tokenizer([SYSTEM_PROMPT] + [q["question"] for q in questions], str(ckpt / "tokenizer"), vocab_size=1000)
    out = tmp_path / "answers.jsonl"
    argv = ["owleval", "--checkpoint", str(ckpt), "--data", OWLEVAL, "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "64"]
    assert evaluate.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 82
    reference = evaluate.read_jsonl(os.path.join(OWLEVAL, "mplug_owl_7b_answers.jsonl"))
    assert all(list(r) == list(reference[0]) == FIELDS for r in rows)  # the released answers' format
    for row, q in zip(rows, questions):
        assert (row["image"], row["question_id"], row["question"]) == (q["image"], q["question_id"], q["question"])
        assert isinstance(row["answer"], str) and row["model_id"] == "owl_jax:tiny"
    assert any(r["image"] == "49.jpg" for r in rows)  # a PNG named .jpg
