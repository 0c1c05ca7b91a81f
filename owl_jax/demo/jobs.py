"""What the demo's two programs (the main job, owl_jax.demo.run, and the towers, owl_jax.demo.towers)
share: their config file and its resolution, owl_jax.train's config for one of their trainings,
exact-match evaluation on the held-out questions, and JSON records written whole."""
from __future__ import annotations

import json
import os
import time

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")


def merge(dst, src, where: str = "config") -> None:
    """Recursively sets `src`'s leaves (dicts or ConfigDicts) into the ConfigDict `dst`; unknown keys
    are an error (a typo in a stage section must not pass silently)."""
    from owl_jax.cli import UserError

    for key, value in (src.items() if hasattr(src, "items") else []):
        if key not in dst:
            raise UserError(f"{where}.{key}: no such field")
        if hasattr(value, "items") and hasattr(dst[key], "items"):
            merge(dst[key], value, f"{where}.{key}")
        else:
            dst[key] = value.to_dict() if hasattr(value, "to_dict") else value


def resolve_config(config, quick: bool = False, blank_images: bool = False, from_scratch: bool = False):
    """The job's config with --quick / --blank_images / --from_scratch applied (a copy)."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    if quick:
        merge(config, config.quick)
    if blank_images:
        config.blank_images = True
    if from_scratch:
        config.from_scratch = True
    return config


def train_config(model, overrides, where: str, data_dir: str, init_dir: str, blank_images: bool = False):
    """owl_jax.train's config: base_config(model) with `overrides` (named `where` in errors) merged,
    reading the ShapesWorld build in `data_dir` and starting from the params dir `init_dir`."""
    from owl_jax.configs import base_config
    from owl_jax.models.config import owl_config_from_dict

    tc = base_config(owl_config_from_dict(model.to_dict()))
    merge(tc, overrides, where)
    tc.data.source = "tfds"
    tc.data.dataset = "shapesworld"
    tc.data.dataset_dir = data_dir
    tc.data.tokenizer_path = os.path.join(data_dir, "tokenizer")
    tc.data.blank_images = blank_images
    tc.init.params_dir = init_dir
    return tc


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def evaluate(params_dir: str, data_dir: str, eval_cfg, blank_images: bool, desc: str,
             scenes_as_text: bool = False) -> dict:
    """Exact-match accuracy per ability category on the held-out split (batched greedy decoding).

    `scenes_as_text`: every image is written out as its scene told in object words instead, as the
    towers' text tells it (the LLM alone)."""
    import sys

    from tqdm import tqdm

    import owl_jax
    from owl_jax.demo.dataset import iter_test_questions
    from owl_jax.demo.report import score

    t0 = time.time()
    # The job's own model answers in its training format (the release tokenises prompts otherwise).
    owl = owl_jax.load(params_dir, tokenizer=os.path.join(data_dir, "tokenizer"), prompt_tokenization="training")
    questions = list(iter_test_questions(data_dir, eval_cfg.split, image_size=owl.cfg.vision.image_size,
                                         blank_images=blank_images, scenes_as_text=scenes_as_text))
    if eval_cfg.max_questions:
        questions = questions[: eval_cfg.max_questions]
    requests = [{"prompt": q["prompt"], "images": list(q["pixel_values"])} for q in questions]
    bar = tqdm(total=len(requests), desc=f"eval {desc}", unit="q", file=sys.stderr)
    predictions = owl.generate(requests, batch_size=eval_cfg.batch_size, max_new_tokens=eval_cfg.max_new_tokens,
                               progress=bar.update)
    bar.close()
    rows = [{"index": q["index"], "category": q["category"], "question": q["question"], "answer": q["answer"],
             "prediction": p} for q, p in zip(questions, predictions)]
    for r in rows:
        r["correct"] = r["prediction"].strip() == r["answer"].strip()
    return {"accuracy": score(rows), "answers": rows, "wall_s": time.time() - t0}
