"""The OwlEval runner (python -m owl_jax.evaluate owleval): on a small OwlEval-format dir written here
(the default suite), and over the real 82 questions / 50 images (`-m real_data`)."""
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from owl_jax import evaluate
from owl_jax.data.conversation import SYSTEM_PROMPT, build_prompt
from owl_jax.data.image import preprocess, to_rgb
from owl_jax.data.text import encode_prompt
from owl_jax.data.tokenizer import load_tokenizer, train_tokenizer
from owl_jax.inference import owleval
from owl_jax.inference.engine import Generator, Sampling, make_batch, trim
from owl_jax.models.config import LoraConfig
from owl_jax.params_io import load_params, save_params

from conftest import REPO, peaked_params, small_owl_config

OWLEVAL = os.environ.get("OWLEVAL_DIR", os.path.join(REPO, "..", "shared", "data", "owleval"))
FIELDS = ["image", "question_id", "question", "answer", "model_id"]

# Rows as in the release's questions.jsonl: consecutive questions on one image are one conversation
# (here of 1, 2 and 3 rounds); 3.jpg holds a PNG, as the release's 49.jpg does.
QUESTIONS = [
    {"image": "1.jpg", "question_id": 1, "question": "What is funny about this image?", "ability": "a,b,e",
     "category": ["single_turn"]},
    {"image": "2.jpg", "question_id": 2, "question": "Where is the frisbee in the image?", "ability": "a,b",
     "category": ["single_turn", "multi_turn"]},
    {"image": "2.jpg", "question_id": 3, "question": "Where is the man in the image?", "ability": "a,b",
     "category": ["multi_turn"]},
    {"image": "3.jpg", "question_id": 4, "question": "How many bedrooms are there in this floor plan?",
     "ability": "a,c,e", "category": ["single_turn", "multi_turn"]},
    {"image": "3.jpg", "question_id": 5, "question": "Is there a bathroom in master bedroom?", "ability": "a,c",
     "category": ["multi_turn"]},
    {"image": "3.jpg", "question_id": 6, "question": "Is the terrace bigger than the kitchen?", "ability": "a,c,e",
     "category": ["multi_turn"]},
]


@pytest.fixture(scope="module")
def owleval_dir(tmp_path_factory):
    """questions.jsonl and images/ as in the released OwlEval dir, small."""
    d = tmp_path_factory.mktemp("owleval")
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    for name, size, fmt in (("1.jpg", (60, 80), "JPEG"), ("2.jpg", (48, 48), "JPEG"), ("3.jpg", (70, 40), "PNG")):
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(d / "images" / name, format=fmt)
    (d / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return str(d)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small owl (unmerged LoRA, the configs' dropout rates) with a tokenizer that knows the questions."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = small_owl_config(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.05))
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=384))
    save_params(str(d), peaked_params(cfg, seed=11), cfg)
    train_tokenizer([SYSTEM_PROMPT] + [q["question"] for q in QUESTIONS], str(d / "tokenizer"), vocab_size=384)
    return str(d)


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


def _check_conversations(data_dir, out, num_questions, num_images):
    questions = owleval.read_jsonl(os.path.join(data_dir, "questions.jsonl"))
    convs = owleval.owleval_conversations(questions)
    assert sum(map(len, convs)) == num_questions and len(convs) == len({q["image"] for q in questions}) == num_images
    owl = RecordingOwl()
    rows = owleval.run_owleval(owl, data_dir, out, progress=False)
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    assert all(r["answer"] == "A" + r["question"] for r in rows)
    by_last = {r["messages"][-1]["content"]: r["messages"] for r in owl.requests}
    for conv in convs:
        messages = by_last[conv[-1]["question"]]
        assert [m["content"] for m in messages] == [x for q in conv for x in (q["question"], "A" + q["question"])][:-1]


def test_conversations_keep_earlier_answers_in_the_context(owleval_dir, tmp_path):
    _check_conversations(owleval_dir, str(tmp_path / "a.jsonl"), num_questions=6, num_images=3)


@pytest.mark.real_data
def test_conversations_keep_earlier_answers_in_the_context_over_the_real_questions(tmp_path):
    assert os.path.exists(os.path.join(OWLEVAL, "questions.jsonl")), f"no OwlEval data at {OWLEVAL} (set OWLEVAL_DIR)"
    _check_conversations(OWLEVAL, str(tmp_path / "a.jsonl"), num_questions=82, num_images=50)


def test_owleval_answers_are_the_greedy_decoding_of_each_question_in_its_conversation(owleval_dir, tiny_checkpoint,
                                                                                       tmp_path):
    """Every answer is the decoded greedy tokens of its question's prompt (the release's template and
    tokenisation, the earlier rounds' answers in context) and its image, computed here without the
    runner or the API."""
    out = tmp_path / "answers.jsonl"
    argv = ["owleval", "--checkpoint", tiny_checkpoint, "--data", owleval_dir, "--out", str(out),
            "--max_new_tokens", "4", "--batch_size", "4", "--noprogress"]
    assert evaluate.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(r) for r in rows] == [FIELDS] * len(QUESTIONS)  # the released answers' format
    for row, q in zip(rows, QUESTIONS):
        assert (row["image"], row["question_id"], row["question"]) == (q["image"], q["question_id"], q["question"])
        assert row["model_id"] == "owl_jax:" + os.path.basename(tiny_checkpoint)

    params, cfg = load_params(tiny_checkpoint)
    tokenizer = load_tokenizer(os.path.join(tiny_checkpoint, "tokenizer"))
    gen = Generator(params, cfg, vocab_limit=len(tokenizer))

    def greedy(image, turns, question):
        ids = encode_prompt(build_prompt(1, turns, question), tokenizer, cfg.tokens_per_image, "release")
        pixels = preprocess(to_rgb(Image.open(os.path.join(owleval_dir, "images", image))), cfg.vision.image_size)
        # Four rows as the runner's batches (--batch_size 4): its compiled programs serve here too.
        out = gen.generate(make_batch([ids], [pixels], [1], cfg, min_batch=4), Sampling(max_new_tokens=4))
        return trim(out["tokens"][0], int(out["length"][0]), cfg.llm.eos_token_id)

    expected, turns = [], []
    for q, previous in zip(QUESTIONS, [None] + QUESTIONS[:-1]):
        if previous is None or previous["image"] != q["image"]:
            turns = []
        expected.append(greedy(q["image"], turns, q["question"]))
        turns = turns + [(q["question"], tokenizer.decode(expected[-1], skip_special_tokens=True))]
    assert [r["answer"] for r in rows] == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]
    # The answers tell the images apart: another image, the same question, other tokens.
    assert all(expected) and greedy("2.jpg", [], QUESTIONS[0]["question"]) != expected[0]


@pytest.mark.real_data
def test_owleval_runner_writes_82_answers_with_a_tiny_model(tmp_path):
    assert os.path.exists(os.path.join(OWLEVAL, "questions.jsonl")), f"no OwlEval data at {OWLEVAL} (set OWLEVAL_DIR)"
    questions = owleval.read_jsonl(os.path.join(OWLEVAL, "questions.jsonl"))
    ckpt = tmp_path / "tiny"
    cfg = small_owl_config()
    # Positions for the longest conversation (8 rounds, the earlier answers in context): 256 are too few.
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=1024, max_position_embeddings=1024))
    save_params(str(ckpt), peaked_params(cfg, seed=11), cfg)
    # A tokenizer that knows the questions keeps the prompts (and the compiled buckets) short.
    train_tokenizer([SYSTEM_PROMPT] + [q["question"] for q in questions], str(ckpt / "tokenizer"), vocab_size=1000)
    out = tmp_path / "answers.jsonl"
    argv = ["owleval", "--checkpoint", str(ckpt), "--data", OWLEVAL, "--out", str(out),
            "--max_new_tokens", "4", "--batch_size", "64"]
    assert evaluate.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 82
    reference = owleval.read_jsonl(os.path.join(OWLEVAL, "mplug_owl_7b_answers.jsonl"))
    assert all(list(r) == list(reference[0]) == FIELDS for r in rows)  # the released answers' format
    for row, q in zip(rows, questions):
        assert (row["image"], row["question_id"], row["question"]) == (q["image"], q["question_id"], q["question"])
        assert isinstance(row["answer"], str) and row["model_id"] == "owl_jax:tiny"
    assert any(r["image"] == "49.jpg" for r in rows)  # a PNG named .jpg
