"""The OwlEval runner; its command line is `python -m owl_jax.evaluate owleval` (owl_jax/evaluate.py).

OwlEval: every question of `questions.jsonl`; consecutive questions on one image form one
multi-turn conversation (earlier answers stay in the context). Conversations advance round by round
(all first questions, then all second questions, ...), each round in batches. Output: one JSON line
per question, in the order of questions.jsonl, in the format of `mplug_owl_7b_answers.jsonl`:
``{"image", "question_id", "question", "answer", "model_id"}``.

The questions file is data, checked before the model loads: every row needs `image`, `question` and
a unique `question_id`, and every image must be a file inside DATA/images. Each round's answers are
appended to the out file as soon as the round ends; a rerun with the same out file keeps them and
asks only the rest (a conversation resumes after its saved answers, with them in its context). At
the end the file is rewritten in the order of questions.jsonl.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from owl_jax.cli import UserError
from owl_jax.inference.sampling import Sampling

# Each field a question row needs: the types it may have, and those types in words.
_QUESTION_FIELDS = {"image": (str, "a string"), "question": (str, "a string"),
                    "question_id": ((int, str), "an int or a string")}


def _parse_line(path: str, n: int, raw: bytes) -> dict:
    """Line `n` of the JSON-lines file `path` as a dict; anything else is an error naming both."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} line {n}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {n}: not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
    return row


def _numbered_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a JSON-lines file."""
    with open(path, "rb") as f:
        return [(n, _parse_line(path, n, line)) for n, line in enumerate(f, 1) if line.strip()]


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); a bad line is an error naming its number."""
    return [row for _, row in _numbered_rows(path)]


def _is_id(x: Any) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def _check_fields(row: dict, where: str) -> None:
    for field, (kinds, expected) in _QUESTION_FIELDS.items():
        if field not in row:
            raise UserError(f"{where}: no {field!r} field")
        if not isinstance(row[field], kinds) or isinstance(row[field], bool):
            raise UserError(f"{where}: {field!r} is {row[field]!r}: expected {expected}")


def _image_file(image_dir: str, name: str, where: str) -> str:
    """The real path of image `name` under `image_dir` (itself a real path). Names come from a data
    file: one that leads outside (`../x.jpg`, an absolute path, a symlink out) is refused by its
    path alone, before anything opens it."""
    path = os.path.realpath(os.path.join(image_dir, name))
    if os.path.commonpath([image_dir, path]) != image_dir:
        raise UserError(f"{where}: image {name!r} resolves to {path}, outside {image_dir}: "
                        "images must be files in DATA/images")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {name!r}: no such file in {image_dir}")
    return path


def read_questions(data_dir: str) -> tuple[list[dict], dict[str, str]]:
    """`data_dir`/questions.jsonl, checked: (rows in file order, image name -> its real path).

    Answers are matched to questions by `question_id`, so a repeated id is refused (one answer would
    land on another question). Errors name the file and line."""
    path = os.path.join(data_dir, "questions.jsonl")
    image_dir = os.path.realpath(os.path.join(data_dir, "images"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (an OwlEval dir holds questions.jsonl and images/)")
    numbered = _numbered_rows(path)
    if not numbered:
        raise UserError(f"{path}: no questions")
    lines: dict[Any, int] = {}
    images: dict[str, str] = {}
    for n, row in numbered:
        where = f"{path} line {n}"
        _check_fields(row, where)
        qid = row["question_id"]
        if qid in lines:
            raise UserError(f"{path}: question_id {qid!r} on line {lines[qid]} and on line {n}: ids must be unique")
        lines[qid] = n
        if row["image"] not in images:
            images[row["image"]] = _image_file(image_dir, row["image"], where)
    return [row for _, row in numbered], images


def owleval_conversations(questions: Sequence[dict]) -> list[list[dict]]:
    """Consecutive questions on the same image -> one conversation (a list of questions)."""
    conversations: list[list[dict]] = []
    for q in questions:
        if conversations and conversations[-1][-1]["image"] == q["image"]:
            conversations[-1].append(q)
        else:
            conversations.append([q])
    return conversations


def _saved_answer(row: dict, where: str, by_id: dict, model_id: str) -> tuple[Any, str]:
    """(question_id, answer) of an out-file row, refused unless it is this run's: the same question
    (id, image and text) and the same model_id."""
    for field in ("question_id", "answer"):
        if field not in row:
            raise UserError(f"{where}: no {field!r} field: not an answers file of this runner; choose another --out")
    qid = row["question_id"]
    q = by_id.get(qid) if _is_id(qid) else None
    if q is None or (row.get("image"), row.get("question")) != (q["image"], q["question"]):
        raise UserError(f"{where}: the answer to question_id {qid!r} is for a question not in questions.jsonl; "
                        "choose another --out")
    if row.get("model_id") != model_id:
        raise UserError(f"{where}: answered by model_id {row.get('model_id')!r}, this run is {model_id!r}; "
                        "choose another --out")
    if not isinstance(row["answer"], str):
        raise UserError(f"{where}: 'answer' is {row['answer']!r}: expected a string")
    return qid, row["answer"]


def read_answers(out_path: str, questions: Sequence[dict], model_id: str) -> tuple[dict, int]:
    """The answers an earlier run saved in `out_path`: (question_id -> answer, unfinished lines
    dropped). Text after the last newline is a row the run stopped in the middle of writing: dropped
    (and counted) unless it is whole. For an id saved twice the later row wins (rows are appended in
    time order)."""
    if not os.path.exists(out_path):
        return {}, 0
    by_id = {q["question_id"]: q for q in questions}
    with open(out_path, "rb") as f:
        lines = f.read().split(b"\n")
    saved: dict = {}
    unfinished = 0
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        if n == len(lines):  # no newline after it
            try:
                row = _parse_line(out_path, n, raw)
            except UserError:
                unfinished = 1
                continue
        else:
            row = _parse_line(out_path, n, raw)
        qid, answer = _saved_answer(row, f"{out_path} line {n}", by_id, model_id)
        saved[qid] = answer
    return saved, unfinished


def _resume(out_path: str | None, questions: Sequence[dict], model_id: str) -> dict:
    """The answers already in `out_path` (question_id -> answer), said on stderr."""
    if not out_path:
        return {}
    saved, unfinished = read_answers(out_path, questions, model_id)
    if saved or unfinished:
        dropped = f"; dropped {unfinished} unfinished last line" if unfinished else ""
        print(f"{out_path}: {len(saved)} of {len(questions)} questions answered already, kept (delete the file to "
              f"start over){dropped}", file=sys.stderr)
    return saved


def _row(q: dict, answer: str, model_id: str) -> dict:
    return {"image": q["image"], "question_id": q["question_id"], "question": q["question"], "answer": answer,
            "model_id": model_id}


def _write_rows(path: str, rows: Sequence[dict]) -> None:
    """Replaces `path` with `rows` at once (tmp + os.replace): a crash leaves the old file or the new
    one, never a part."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _answered_prefix(conv: Sequence[dict], saved: dict) -> int:
    """How many of a conversation's questions, from the first, have saved answers. Later questions
    are asked (again): a saved answer after a gap was given without the gap's answer in context."""
    k = 0
    while k < len(conv) and conv[k]["question_id"] in saved:
        k += 1
    return k


def _request(conv: Sequence[dict], r: int, answers: dict, pixels: dict) -> dict:
    """Question r of a conversation, with the earlier questions and their answers as context."""
    messages = []
    for q in conv[:r]:
        messages += [{"role": "user", "content": q["question"]},
                     {"role": "assistant", "content": answers[q["question_id"]]}]
    messages.append({"role": "user", "content": conv[r]["question"]})
    return {"images": [pixels[conv[r]["image"]]], "messages": messages,
            "name": f"question_id {conv[r]['question_id']!r}"}


def answer_owleval(owl, questions: Sequence[dict], pixels: dict, out_path: str | None = None, batch_size: int = 16,
                   sampling: Sampling = Sampling(max_new_tokens=512), model_id: str = "owl_jax",
                   saved: dict | None = None, progress: bool = True) -> list[dict]:
    """Answers `questions` (from `read_questions`) with `owl` (an `owl_jax.inference.api.Owl`) on `pixels`
    (image name -> float32 [S, S, 3]). Questions answered in `saved` (question_id -> answer, from
    `read_answers`) are not asked again. Each round's answers are appended to `out_path` (flushed)
    as they come; at the end it holds every answer, in question order."""
    from tqdm import tqdm

    saved = saved or {}
    conversations = owleval_conversations(questions)
    starts = [_answered_prefix(conv, saved) for conv in conversations]
    answers = {q["question_id"]: saved[q["question_id"]] for conv, k in zip(conversations, starts) for q in conv[:k]}
    out = None
    if out_path:  # the saved answers alone first: no unfinished line for the appends to follow
        _write_rows(out_path, [_row(q, answers[q["question_id"]], model_id)
                               for q in questions if q["question_id"] in answers])
        out = open(out_path, "a", encoding="utf-8")
    bar = tqdm(total=len(questions), initial=len(answers), desc="owleval", unit="q", disable=not progress,
               file=sys.stderr)
    try:
        for r in range(max(len(c) for c in conversations)):
            active = [c for c, k in zip(conversations, starts) if k <= r < len(c)]
            if not active:
                continue
            requests = [_request(conv, r, answers, pixels) for conv in active]
            outs = owl.generate(requests, batch_size=batch_size, sampling=sampling, progress=bar.update)
            for conv, answer in zip(active, outs):
                answers[conv[r]["question_id"]] = answer
                if out is not None:
                    out.write(json.dumps(_row(conv[r], answer, model_id), ensure_ascii=False) + "\n")
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
    finally:
        bar.close()
        if out is not None:
            out.close()
    rows = [_row(q, answers[q["question_id"]], model_id) for q in questions]
    if out_path:
        _write_rows(out_path, rows)
    return rows


def run_owleval(owl, data_dir: str, out_path: str | None = None, batch_size: int = 16,
                sampling: Sampling = Sampling(max_new_tokens=512), model_id: str = "owl_jax",
                progress: bool = True) -> list[dict]:
    """Answers every OwlEval question in `data_dir` with `owl` (an `owl_jax.inference.api.Owl`) into `out_path`,
    keeping the answers an earlier run saved there (see the module docstring)."""
    questions, image_files = read_questions(data_dir)
    saved = _resume(out_path, questions, model_id)
    pixels = {name: owl.images([path])[0] for name, path in image_files.items()}
    return answer_owleval(owl, questions, pixels, out_path, batch_size, sampling, model_id, saved, progress)
