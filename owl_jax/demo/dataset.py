r"""ShapesWorld as a TFDS dataset: the builder, its tokenizer, and the evaluation questions of a
prepared split (owl_jax/demo/scenes.py draws the scenes and writes the conversations).

    python -m owl_jax.demo.dataset --out=DIR [--seed=0] [--vocab_size=1024] [--overwrite]
        [--sizes=captions_train=4000,captions_test=200,instructions_train=12000,instructions_test=400,text_train=16000]

writes DIR/shapesworld/1.0.0/ (with owl_meta/ and report.json, as `owl_jax.data.prepare` does for
owl_jsonl) and the SentencePiece tokenizer trained on the train text, the object words added, to
DIR/tokenizer, where the pipeline looks for a dataset's tokenizer when config.data.tokenizer_path
is empty. The main job (owl_jax.demo.run) builds it into WORKDIR/data itself.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from owl_jax.cli import absolute, fail, parse_flags
from owl_jax.data import records
from owl_jax.data.conversation import build_prompt, parse_turns
from owl_jax.data.image import load_and_preprocess
from owl_jax.data.prepare import build, write_metadata
from owl_jax.data.tokenizer import load_tokenizer, train_tokenizer
from owl_jax.demo import scenes
from owl_jax.demo.scenes import DEFAULT_SIZES, generate_all, write_scenes_as_text


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
        return tfds.core.DatasetInfo(builder=self, description=scenes.__doc__, features=records.features(),
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


OBJECT_WORD = re.compile("|".join(map(re.escape, scenes.OBJECT_WORDS)))
TOKENIZER_TEXTS = 40000  # conversations the tokenizer is trained on (the vocabulary is closed well before)


def tokenizer_texts(sizes: dict, seed: int, limit: int = TOKENIZER_TEXTS) -> list[str]:
    """The text the ShapesWorld tokenizer is trained on: train-split conversations, at most `limit`,
    drawn from every train split in proportion to its size."""
    train_sizes = {s: n for s, n in sizes.items() if s.endswith("_train")}
    total = sum(train_sizes.values())
    take = {s: max(1, n * limit // total) if total > limit else n for s, n in train_sizes.items()}
    # the object words are added whole afterwards (`add_object_words`): no pieces spent on them
    return [OBJECT_WORD.sub("", rec["text"]) for s, gen in generate_all(take, seed, render=False).items()
            for rec in gen]


def add_object_words(tok_dir: str, vocab_size: int) -> None:
    """Adds `scenes.OBJECT_WORDS` (one token each) to the tokenizer in `tok_dir`, after its
    SentencePiece pieces; a tokenizer that holds them already is left as it is."""
    tok = load_tokenizer(tok_dir)
    if tok.add_tokens(list(scenes.OBJECT_WORDS)):  # the number of tokens new to it
        if len(tok) > vocab_size:
            raise ValueError(f"{tok_dir}: {len(tok)} tokens with the object words, more than the "
                             f"vocabulary's {vocab_size}")
        tok.save_pretrained(tok_dir)


# The rendered words are read, spelt backwards and counted letter by letter: no token may hold a
# capital letter with anything but lower-case letters after it ("Human" stays one token, "HELLO"
# is five), single capitals aside.
SINGLE_CAPITALS = r"^(?![A-Z]$).*[A-Z](?![a-z])"


def iter_test_questions(dataset_dir: str, split: str = "instructions_test", image_size: int = 224,
                        blank_images: bool = False, categories=None, scenes_as_text: bool = False) -> Iterator[dict]:
    """Evaluation records of a prepared ShapesWorld split, in record order.

    ``scenes_as_text``: no images; each ``<image>`` of the prompt is written out as its scene told
    in object words, as in text_train (what the LLM alone answers when it is told the scene).

    Yields dicts: ``index``, ``source``, ``category``, ``question``, ``answer`` (exact expected
    string), ``history`` (earlier (question, answer) turns, for multi_turn), ``prompt`` (the
    generation prompt ending in "AI: ", from `conversation.build_prompt`), ``num_images``,
    ``pixel_values`` float32[k, image_size, image_size, 3] (CLIP-normalised; zeros, the mean
    colour, if `blank_images`), ``scene`` (list of scene dicts).
    """

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


def prepare(out: str, seed: int = 0, sizes: dict | None = None, vocab_size: int = 1024, overwrite: bool = False,
            tokenizer: str = ""):
    """Generates ShapesWorld into `out` and trains its tokenizer into `out`/tokenizer (or copies the
    tokenizer dir `tokenizer`: the one pretrained towers were trained with), object words added: at
    most `vocab_size` tokens in all."""
    import shutil

    sizes = dict(sizes or DEFAULT_SIZES)
    builder = ShapesWorld(data_dir=out, file_format="array_record", sizes=sizes, seed=seed)
    if build(builder, overwrite):
        write_metadata(builder, list(sizes))
    tok_dir = os.path.join(out, "tokenizer")
    if overwrite or not os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
        if tokenizer:
            shutil.copytree(tokenizer, tok_dir, dirs_exist_ok=True)
        else:
            train_tokenizer(tokenizer_texts(sizes, seed), tok_dir, vocab_size=vocab_size - len(scenes.OBJECT_WORDS),
                            drop_pieces=SINGLE_CAPITALS)
        add_object_words(tok_dir, vocab_size)
    return builder


def _parse_sizes(text: str) -> dict:
    sizes = dict(DEFAULT_SIZES)
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k.strip() not in sizes or not v.strip().isdigit():
            fail(f"--sizes: {part!r} is not split=N with a known split ({', '.join(sizes)})")
        sizes[k.strip()] = int(v)
    return {k: v for k, v in sizes.items() if v > 0}


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "output directory (config.data.dataset_dir)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "generation seed", flag_values=fv)
    flags.DEFINE_string("sizes", "", "split=N,... (unlisted splits keep their defaults; 0 skips a split)",
                        flag_values=fv)
    flags.DEFINE_integer("vocab_size", 1024, "tokenizer vocabulary (max), the 160 object words included",
                         flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "rebuild an existing dataset and retrain its tokenizer", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = parse_flags(argv, _flags(), __doc__, required=("out",))
    sizes = _parse_sizes(args.sizes)
    out = absolute(args.out)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.time()
    builder = prepare(out, args.seed, sizes, args.vocab_size, args.overwrite)
    print(f"\n== {builder.name} -> {builder.data_dir} ({time.time() - t0:.1f}s)")
    if builder.report.written:
        print(builder.report.format())
    tok_dir = os.path.join(out, "tokenizer")
    print(f"tokenizer: {tok_dir} (vocab {len(load_tokenizer(tok_dir))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
