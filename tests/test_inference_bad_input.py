"""Generation, the Python API and the OwlEval runner take requests, files and checkpoints as untrusted
input: each mistake is one line naming the file / field / number (exit 2 from the command lines),
found before the params load where it can be, and a crashed OwlEval run loses no answers."""
import builtins
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import owl_jax
from owl_jax import evaluate, params_io
from owl_jax import generate as generate_cli
from owl_jax.data.tokenizer import load_tokenizer
from owl_jax.inference import owleval
from owl_jax.inference.engine import Generator, Sampling, make_batch
from owl_jax.models.config import owl_config_to_dict

from conftest import QUESTIONS, small_owl_config


@pytest.fixture
def bare_ckpt(tmp_path, owl_dir, monkeypatch):
    """owl_dir's config without its params, and loading params fails the test: a check that passes
    here ran before the params would load."""
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(os.path.join(owl_dir, "owl_config.json"), d)

    def no_params(directory):
        raise AssertionError(f"params of {directory} loaded before the request was checked")

    monkeypatch.setattr(params_io, "load_params", no_params)
    return str(d)


def _cli(capsys, argv, **kw):
    """Runs the generate CLI (8 new tokens unless told: the default 512 is past the small model's
    positions): (exit code, stderr)."""
    code = generate_cli.main(argv if "--max_new_tokens" in argv else argv + ["--max_new_tokens", "8"], **kw)
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # no traceback
    return lines[0]


# 1 --------------------------------------------------------------------------------------------


def test_tokenizer_larger_than_the_vocabulary_is_refused_at_load(tmp_path, owl_dir, capsys, monkeypatch):
    ckpt = tmp_path / "small_vocab"
    cfg = small_owl_config()  # vocab 128; owl_dir's tokenizer has more
    ckpt.mkdir()
    (ckpt / "owl_config.json").write_text(json.dumps(owl_config_to_dict(cfg)))
    n = len(load_tokenizer(owl_dir))
    assert n > 128
    monkeypatch.setattr(params_io, "load_params", lambda d: pytest.fail("params loaded"))
    with pytest.raises(ValueError) as e:
        owl_jax.load(str(ckpt), tokenizer=owl_dir)
    assert f"tokenizer {owl_dir} has {n} tokens" in str(e.value) and "vocabulary of 128" in str(e.value)
    code, err = _cli(capsys, ["--checkpoint", str(ckpt), "--tokenizer", owl_dir, "--prompt", "hi"])
    assert code == 2 and f"{n} tokens" in _one_error_line(err) and owl_dir in err


# 2 --------------------------------------------------------------------------------------------


def test_prompt_and_max_new_tokens_past_the_positions_are_refused(owl, image_files, bare_ckpt, owl_dir, capsys):
    jpg, _ = image_files
    limit = owl.cfg.llm.max_position_embeddings  # 256
    prompt = len(owl.encode(owl.prompt_text(1, QUESTIONS[0])))
    with pytest.raises(ValueError) as e:
        owl.chat(images=[jpg], messages=QUESTIONS[0], max_new_tokens=limit - prompt + 1)
    assert f"has {prompt} tokens" in str(e.value) and f"max_position_embeddings {limit}" in str(e.value)
    with pytest.raises(ValueError, match="request 1 has"):  # before any batch runs
        owl.generate([{"messages": "Hi"}, {"images": [jpg], "messages": QUESTIONS[0]}],
                     max_new_tokens=limit - prompt + 1)
    with pytest.raises(ValueError, match=f"question_id 7 has {prompt} tokens"):  # as the OwlEval runner names them
        owl.generate([{"images": [jpg], "messages": QUESTIONS[0], "name": "question_id 7"}],
                     max_new_tokens=limit - prompt + 1)
    batch = make_batch([owl.encode(owl.prompt_text(0, "Hi"))], None, [0], owl.cfg)
    with pytest.raises(ValueError, match=f"max_position_embeddings {limit}"):
        Generator(owl.params, owl.cfg).generate(batch, Sampling(max_new_tokens=limit))

    base = ["--checkpoint", bare_ckpt, "--tokenizer", owl_dir, "--prompt", QUESTIONS[0]]
    code, err = _cli(capsys, base + ["--max_new_tokens", str(limit)])
    assert code == 2 and f"--max_new_tokens {limit}: expected 1 to {limit - 1}" in _one_error_line(err)
    code, err = _cli(capsys, base + ["--image", jpg, "--max_new_tokens", str(limit - prompt + 1)])
    assert code == 2 and f"--prompt has {prompt} tokens" in _one_error_line(err)


# 3 --------------------------------------------------------------------------------------------


def test_cli_reads_images_and_tokenizer_before_the_params(bare_ckpt, owl_dir, image_files, tmp_path, capsys):
    jpg, _ = image_files
    missing = str(tmp_path / "typo.jpg")
    code, err = _cli(capsys, ["--checkpoint", bare_ckpt, "--tokenizer", owl_dir, "--image", jpg, "--image", missing,
                              "--prompt", "hi"])
    assert code == 2 and f"image {missing}: no such file" in _one_error_line(err)
    code, err = _cli(capsys, ["--checkpoint", bare_ckpt, "--tokenizer", str(tmp_path / "nope"), "--prompt", "hi"])
    assert code == 2 and str(tmp_path / "nope") in _one_error_line(err)
    code, err = _cli(capsys, ["--checkpoint", bare_ckpt, "--prompt", "hi"])  # no tokenizer beside the config
    assert code == 2 and f"no tokenizer in {bare_ckpt}" in _one_error_line(err)


# 4 --------------------------------------------------------------------------------------------


def test_truncated_jpeg_error_names_the_file(owl, image_files, bare_ckpt, owl_dir, tmp_path, capsys):
    jpg, _ = image_files
    broken = tmp_path / "broken.jpg"
    data = open(jpg, "rb").read()
    broken.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as e:
        owl.images([str(broken)])
    assert f"image {broken}: cannot decode it" in str(e.value) and "truncated" in str(e.value)
    code, err = _cli(capsys, ["--checkpoint", bare_ckpt, "--tokenizer", owl_dir, "--image", str(broken),
                              "--prompt", "hi"])
    assert code == 2 and str(broken) in _one_error_line(err)


# 5 --------------------------------------------------------------------------------------------


def test_damaged_tokenizer_model_is_named(tmp_path, owl_dir, bare_ckpt, capsys):
    damaged = tmp_path / "tok"
    shutil.copytree(owl_dir, damaged, ignore=shutil.ignore_patterns("params", "owl_config.json"))
    model = damaged / "tokenizer.model"
    model.write_bytes(np.random.default_rng(0).integers(0, 256, model.stat().st_size, dtype=np.uint8).tobytes())
    for path in (damaged, model):
        with pytest.raises(ValueError) as e:
            load_tokenizer(str(path))
        assert str(e.value).startswith(f"{model} is not a SentencePiece model") and "tiktoken" not in str(e.value)
    code, err = _cli(capsys, ["--checkpoint", bare_ckpt, "--tokenizer", str(damaged), "--prompt", "hi"])
    assert code == 2 and f"{model} is not a SentencePiece model" in _one_error_line(err)


# 6 --------------------------------------------------------------------------------------------


def test_image_tags_in_a_question_are_refused_in_user_terms(owl, owl_dir, image_files, bare_ckpt, capsys):
    jpg, _ = image_files
    code, err = _cli(capsys, ["--checkpoint", bare_ckpt, "--tokenizer", owl_dir, "--image", jpg,
                              "--prompt", "<image> <image> Which differs?"])
    assert code == 2 and "--prompt has 2 <image> tag(s) and 1 --image was given" in _one_error_line(err)
    with pytest.raises(ValueError, match=r"the messages hold 1 <image> tag\(s\) and 1 image\(s\)"):
        owl.chat(images=[jpg], messages="<image> What is it?")
    with pytest.raises(ValueError, match=r"the prompt has 2 <image> tags but 1 image\(s\)"):
        owl.generate([{"images": [jpg], "prompt": "<image><image> AI: "}])


def test_interactive_question_with_a_tag_is_refused_and_the_chat_goes_on(owl_dir, owl, image_files, capsys):
    jpg, _ = image_files
    out = io.StringIO()
    code = generate_cli.main(["--checkpoint", owl_dir, "--image", jpg, "--interactive", "--max_new_tokens", "3"],
                             stdin=io.StringIO(f"<image> {QUESTIONS[0]}\n{QUESTIONS[0]}\n"), stdout=out)
    assert code == 0
    assert "the question has 1 <image> tag(s)" in _one_error_line(capsys.readouterr().err)
    answer = owl.chat(images=[jpg], messages=QUESTIONS[0], max_new_tokens=3)
    assert out.getvalue() == f"Human: Human: AI: {answer}\nHuman: "  # asked as the first question


# 7: OwlEval -----------------------------------------------------------------------------------


def _owleval_dir(root, rows, images=("a.jpg", "b.jpg", "c.jpg")):
    """DATA/questions.jsonl (rows: dicts, or raw lines) + DATA/images with small JPEGs."""
    data = root / "owleval"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in images:
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(data / "images" / name, format="JPEG")
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (data / "questions.jsonl").write_text("".join(line + "\n" for line in lines))
    return data


def _q(qid, image, question=None):
    return {"image": image, "question_id": qid, "question": question or f"Question {qid}?"}


# Three conversations: a.jpg 3 rounds, b.jpg 1, c.jpg 2.
CONVERSATIONS = [_q(1, "a.jpg"), _q(2, "a.jpg"), _q(3, "a.jpg"), _q(4, "b.jpg"), _q(5, "c.jpg"), _q(6, "c.jpg")]


class EchoOwl:
    """Stands in for Owl: the answer spells out the conversation it was asked in, so a resumed
    conversation that lost its earlier answers answers differently."""

    def __init__(self):
        self.asked = []

    def images(self, paths):
        return [np.zeros((4, 4, 3), np.float32) for _ in paths]

    def generate(self, requests, batch_size, sampling, progress):
        self.asked += [r["messages"][-1]["content"] for r in requests]
        progress(len(requests))
        return ["A[" + " | ".join(m["content"] for m in r["messages"]) + "]" for r in requests]


def _run(data, out):
    return owleval.run_owleval(EchoOwl(), str(data), str(out), progress=False)


def test_owleval_refuses_a_duplicate_question_id(tmp_path):
    data = _owleval_dir(tmp_path, [_q(1, "a.jpg"), _q(2, "a.jpg"), _q(1, "b.jpg")])
    with pytest.raises(ValueError) as e:
        _run(data, tmp_path / "out.jsonl")
    assert str(e.value).startswith(f"{data / 'questions.jsonl'}: question_id 1 on line 1 and on line 3")


@pytest.mark.parametrize("lines, expected", [
    ([], ": no questions"),
    ([json.dumps(_q(1, "a.jpg")), '{"image": "b.jpg", "question_id": 2'], " line 2: not JSON"),
    ([json.dumps(_q(1, "a.jpg")), "", "[1, 2]"], " line 3: expected a JSON object"),
    ([json.dumps({"image": "a.jpg", "question_id": 1})], " line 1: no 'question' field"),
    ([json.dumps({"image": "a.jpg", "question": "Q?"})], " line 1: no 'question_id' field"),
    ([json.dumps({"question_id": 1, "question": "Q?"})], " line 1: no 'image' field"),
    ([json.dumps({"image": "a.jpg", "question_id": [1], "question": "Q?"})], " line 1: 'question_id' is [1]"),
], ids=["empty", "broken", "not_an_object", "no_question", "no_id", "no_image", "bad_id"])
def test_owleval_questions_file_errors_name_the_line(tmp_path, capsys, lines, expected):
    data = _owleval_dir(tmp_path, lines)
    with pytest.raises(ValueError) as e:
        _run(data, tmp_path / "out.jsonl")
    assert str(e.value).startswith(str(data / "questions.jsonl") + expected)
    code = evaluate.main(["owleval", "--checkpoint", str(tmp_path / "none"), "--data", str(data),
                          "--out", str(tmp_path / "out.jsonl")])
    assert code == 2 and expected in _one_error_line(capsys.readouterr().err)


def test_owleval_resumes_after_a_crash_without_asking_again(tmp_path, monkeypatch, capsys):
    data = _owleval_dir(tmp_path, CONVERSATIONS)
    whole = tmp_path / "whole.jsonl"
    _run(data, whole)

    out = tmp_path / "out.jsonl"
    crashing = EchoOwl()
    calls = []

    def generate(requests, **kw):
        calls.append(len(requests))
        if len(calls) == 2:
            raise RuntimeError("killed in round 2")
        return EchoOwl.generate(crashing, requests, **kw)

    monkeypatch.setattr(crashing, "generate", generate)
    with pytest.raises(RuntimeError):
        owleval.run_owleval(crashing, str(data), str(out), progress=False)
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in saved] == [1, 4, 5]  # round 1, on disk as it ended
    with open(out, "a") as f:
        f.write('{"image": "a.jpg", "question_id": 2, "quest')  # a row cut off mid-write

    again = EchoOwl()
    rows = owleval.run_owleval(again, str(data), str(out), progress=False)
    assert again.asked == ["Question 2?", "Question 6?", "Question 3?"]  # nothing saved is asked again
    assert out.read_text() == whole.read_text()  # the same answers (the saved ones in context), in order
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4, 5, 6]
    err = capsys.readouterr().err
    assert "3 of 6 questions answered already" in err and "dropped 1 unfinished last line" in err
    assert not os.path.exists(str(out) + ".tmp")

    finished = EchoOwl()  # a rerun of a finished run asks nothing
    owleval.run_owleval(finished, str(data), str(out), progress=False)
    assert finished.asked == [] and out.read_text() == whole.read_text()


def test_owleval_counts_an_unfinished_last_line_and_refuses_other_answers(tmp_path, capsys):
    data = _owleval_dir(tmp_path, CONVERSATIONS)
    out = tmp_path / "out.jsonl"
    _run(data, out)
    rows = out.read_text().splitlines()
    out.write_text(rows[0] + "\n" + rows[1][:20])
    again = EchoOwl()
    owleval.run_owleval(again, str(data), str(out), progress=False)
    assert "1 of 6 questions answered already" in capsys.readouterr().err
    out.write_text(rows[0] + "\n" + rows[1][:20] + "\n" + rows[2] + "\n")  # broken inside: not a cut-off write
    with pytest.raises(ValueError, match=re.escape(f"{out} line 2: not JSON")):
        _run(data, out)
    out.write_text(rows[0] + "\n")
    with pytest.raises(
        ValueError, match=re.escape(f"{out} line 1: answered by model_id 'owl_jax', this run is 'other'")
    ):
        owleval.run_owleval(EchoOwl(), str(data), str(out), model_id="other", progress=False)


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_owleval_refuses_images_outside_the_data_dir_without_reading_them(tmp_path, monkeypatch, capsys, kind):
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(secret, format="JPEG")
    name = {"parent": "../../secret.jpg", "absolute": str(secret), "symlink": "link.jpg"}[kind]
    data = _owleval_dir(tmp_path, [_q(1, "a.jpg"), _q(2, name)])
    if kind == "symlink":
        os.symlink(secret, data / "images" / "link.jpg")
    opened = []
    real_open, real_image_open = builtins.open, Image.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    monkeypatch.setattr(Image, "open", lambda f, *a, **k: (opened.append(str(f)), real_image_open(f, *a, **k))[1])
    owl = EchoOwl()
    with pytest.raises(ValueError) as e:
        owleval.run_owleval(owl, str(data), str(tmp_path / "out.jsonl"), progress=False)
    assert str(e.value).startswith(f"{data / 'questions.jsonl'} line 2: image {name!r} resolves to {secret}, outside")
    code = evaluate.main(["owleval", "--checkpoint", str(tmp_path / "none"), "--data", str(data),
                          "--out", str(tmp_path / "out.jsonl")])
    assert code == 2 and f"line 2: image {name!r}" in _one_error_line(capsys.readouterr().err)
    assert str(secret) not in opened and not any(p.endswith("secret.jpg") for p in opened)
    assert owl.asked == []


# 8 --------------------------------------------------------------------------------------------


def test_cli_paths_are_relative_to_the_current_directory(tmp_path, owl_dir, owl, image_files, monkeypatch, capsys):
    jpg, _ = image_files
    data = _owleval_dir(tmp_path, [_q(1, "a.jpg", QUESTIONS[0]), _q(2, "a.jpg", QUESTIONS[1])], images=("a.jpg",))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = lambda p: os.path.relpath(p, work)  # noqa: E731
    assert not os.path.isabs(rel(owl_dir)) and not os.path.isabs(rel(jpg))

    out = io.StringIO()
    code = generate_cli.main(["--checkpoint", rel(owl_dir), "--tokenizer", rel(owl_dir), "--image", rel(jpg),
                              "--prompt", QUESTIONS[0], "--max_new_tokens", "3"], stdout=out)
    assert code == 0, capsys.readouterr().err
    assert out.getvalue() == "AI: " + owl.chat(images=[jpg], messages=QUESTIONS[0], max_new_tokens=3) + "\n"

    code = evaluate.main(["owleval", "--checkpoint", rel(owl_dir), "--tokenizer", rel(owl_dir), "--data", rel(data),
                          "--out", "answers/out.jsonl", "--max_new_tokens", "3", "--batch_size", "1", "--noprogress"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (work / "answers" / "out.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2]
    assert rows[0]["answer"] == owl.chat(
        images=[str(data / "images" / "a.jpg")], messages=QUESTIONS[0], max_new_tokens=3
    )
    assert rows[0]["model_id"] == "owl_jax:" + os.path.basename(owl_dir)
