"""ShapesWorld as a TFDS dataset: the builder `python -m owl_jax.data.prepare` runs, the text its
tokenizer is trained on, and the evaluation questions of a prepared split (owl_jax/data/shapesworld.py
draws the scenes and writes the conversations)."""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from owl_jax.data import records, shapesworld
from owl_jax.data.shapesworld import DEFAULT_SIZES, generate_all, write_scenes_as_text


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """ShapesWorld as ArrayRecord shards. Sizes and seed are given at construction."""

    name = "shapesworld"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "captions + instructions, 224x224 JPEG images."}

    def __init__(self, *, sizes: dict | None = None, seed: int = 0, **kwargs):
        self._sizes = dict(sizes or DEFAULT_SIZES)
        self._seed = seed
        self.report = records.BuildReport()
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=shapesworld.__doc__, features=records.features(),
                                     metadata=tfds.core.MetadataDict(seed=self._seed, sizes=self._sizes))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, gen)
                for split, gen in generate_all(self._sizes, self._seed).items()}

    def _generate_examples(self, split, gen):
        for i, rec in enumerate(gen):
            rec.pop("_key")
            self.report.written[split] += 1
            self.report.written[f"{split}:{rec['category']}"] += 1
            yield i, rec


def tokenizer_texts(sizes: dict, seed: int) -> Iterator[str]:
    """The text the ShapesWorld tokenizer is trained on: every train-split conversation."""
    for split, gen in generate_all({s: n for s, n in sizes.items() if s.endswith("_train")}, seed,
                                   render=False).items():
        for rec in gen:
            yield rec["text"]


def iter_test_questions(dataset_dir: str, split: str = "instructions_test", image_size: int = 224,
                        blank_images: bool = False, categories=None, scenes_as_text: bool = False) -> Iterator[dict]:
    """Evaluation records of a prepared ShapesWorld split, in record order.

    ``scenes_as_text``: no images; each ``<image>`` of the prompt is written out as its scene's
    caption, as in text_train (what the LLM alone answers when it is told the scene).

    Yields dicts: ``index``, ``source``, ``category``, ``question``, ``answer`` (exact expected
    string), ``history`` (earlier (question, answer) turns, for multi_turn), ``prompt`` (the
    generation prompt ending in "AI: ", from `conversation.build_prompt`), ``num_images``,
    ``pixel_values`` float32[k, image_size, image_size, 3] (CLIP-normalised; zeros, the mean
    colour, if `blank_images`), ``scene`` (list of scene dicts).
    """
    from owl_jax.data.conversation import build_prompt, parse_turns
    from owl_jax.data.image import load_and_preprocess

    src = records.data_source(dataset_dir, "shapesworld", split)
    for i in range(len(src)):
        rec = src[i]
        category = records.as_str(rec["category"])
        if categories is not None and category not in categories:
            continue
        text = records.as_str(rec["text"])
        answer = records.as_str(rec["answer"])
        if category == "caption":  # prompt = the text up to the caption (ends in "AI: ")
            history, question, prompt = [], "", text[: len(text) - len(answer)]
        else:
            n_images, turns = parse_turns(text)
            history, question = turns[:-1], turns[-1][0]
            prompt = build_prompt(n_images, history, question)
        images = list(rec["images"])
        scenes = json.loads(records.as_str(rec["scene"]) or "[]")
        if scenes_as_text:
            prompt, images = write_scenes_as_text(prompt, scenes), []
        if blank_images:
            pixels = np.zeros((len(images), image_size, image_size, 3), np.float32)
        else:
            pixels = np.stack([load_and_preprocess(b, image_size) for b in images]) if images else \
                np.zeros((0, image_size, image_size, 3), np.float32)
        yield {
            "index": i,
            "source": records.as_str(rec["source"]),
            "category": category,
            "question": question,
            "answer": answer,
            "history": history,
            "prompt": prompt,
            "num_images": len(images),
            "pixel_values": pixels,
            "scene": scenes,
        }
