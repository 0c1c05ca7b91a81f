"""Benchmark runners. `python -m owl_jax.evaluate owleval --checkpoint DIR --data DIR --out answers.jsonl`

OwlEval (DESIGN 4): every question of `questions.jsonl`; consecutive questions on one image form one
multi-turn conversation (earlier answers stay in the context). Conversations advance round by round
(all first questions, then all second questions, ...), each round in batches. Output: one JSON line
per question, in the order of questions.jsonl, in the format of `mplug_owl_7b_answers.jsonl`:
``{"image", "question_id", "question", "answer", "model_id"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from owl_jax.data.text import PROMPT_TOKENIZATIONS
from owl_jax.generate import Sampling


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def owleval_conversations(questions: Sequence[dict]) -> list[list[dict]]:
    """Consecutive questions on the same image -> one conversation (a list of questions)."""
    conversations: list[list[dict]] = []
    for q in questions:
        if conversations and conversations[-1][-1]["image"] == q["image"]:
            conversations[-1].append(q)
        else:
            conversations.append([q])
    return conversations


def run_owleval(owl, data_dir: str, out_path: str | None = None, batch_size: int = 16,
                sampling: Sampling = Sampling(max_new_tokens=512), model_id: str = "owl_jax",
                progress: bool = True) -> list[dict]:
    """Answers every OwlEval question with `owl` (an `owl_jax.api.Owl`); writes them to `out_path`."""
    from tqdm import tqdm

    questions = read_jsonl(os.path.join(data_dir, "questions.jsonl"))
    conversations = owleval_conversations(questions)
    image_dir = os.path.join(data_dir, "images")
    pixels = {name: owl.images([os.path.join(image_dir, name)])[0]
              for name in dict.fromkeys(q["image"] for q in questions)}
    answers: dict[int, str] = {}
    bar = tqdm(total=len(questions), desc="owleval", unit="q", disable=not progress, file=sys.stderr)
    for r in range(max(len(c) for c in conversations)):
        active = [c for c in conversations if len(c) > r]
        requests = []
        for conv in active:
            messages = []
            for q in conv[:r]:
                messages += [{"role": "user", "content": q["question"]},
                             {"role": "assistant", "content": answers[q["question_id"]]}]
            messages.append({"role": "user", "content": conv[r]["question"]})
            requests.append({"images": [pixels[conv[r]["image"]]], "messages": messages})
        outs = owl.generate(requests, batch_size=batch_size, sampling=sampling, progress=bar.update)
        for conv, answer in zip(active, outs):
            answers[conv[r]["question_id"]] = answer
    bar.close()
    rows = [{"image": q["image"], "question_id": q["question_id"], "question": q["question"],
             "answer": answers[q["question_id"]], "model_id": model_id} for q in questions]
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owl_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    o = sub.add_parser("owleval", help="OwlEval: 82 questions on 50 images, answers as JSONL")
    o.add_argument("--checkpoint", required=True, help="owl_jax params dir")
    o.add_argument("--tokenizer", default=None, help="tokenizer dir or .model (default: in the checkpoint dir)")
    o.add_argument("--data", required=True, help="OwlEval dir (questions.jsonl, images/)")
    o.add_argument("--out", required=True, help="answers .jsonl")
    o.add_argument("--batch-size", type=int, default=16)
    o.add_argument("--max-new-tokens", type=int, default=512)
    o.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    o.add_argument("--temperature", type=float, default=1.0)
    o.add_argument("--top-k", type=int, default=0)
    o.add_argument("--top-p", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--model-id", default=None, help="model_id field (default: owl_jax:<checkpoint dir name>)")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--prompt-tokenization", choices=PROMPT_TOKENIZATIONS, default="release",
                   help="release: as the released processor (text split on <image> only); training: as in training")
    args = parser.parse_args(argv)

    from owl_jax.api import load

    owl = load(args.checkpoint, tokenizer=args.tokenizer, prompt_tokenization=args.prompt_tokenization)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model_id = args.model_id or "owl_jax:" + os.path.basename(os.path.normpath(args.checkpoint))
    rows = run_owleval(owl, args.data, args.out, args.batch_size, sampling, model_id, progress=not args.no_progress)
    print(f"wrote {len(rows)} answers to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
