"""ShapesWorld: a procedural multimodal dataset, generated locally and deterministically from a seed.

Images are 224x224: 1-4 shapes (circle, square, triangle, star) in 8 colours on a plain or noisy
grey background, each shape in its own region (left, right, top, bottom, center), so positions are
unambiguous. About a third of the images also carry a rendered word of 3-6 capital letters in the
middle band (shapes then avoid the center region).

Splits (train and test drawn from different seed streams; a test sample's (scene, conversation)
never occurs in train, where the scene is compared by its content: shapes, colours, regions, word):

* ``captions_train`` / ``captions_test`` (stage 1): ``Human: <image>`` then the AI's one-sentence
  caption naming every shape, e.g. "A red circle on the left and a blue star at the top."
* ``text_train`` (the tiny LLaMA's pretraining, owl_jax.demo.towers): captions and instructions drawn like the two
  train splits (and disjoint from their test splits), plus quizzes (a scene, then up to 5 distinct
  questions about it), with no images: every ``<image>`` is written out as its scene told in
  object words, one token a shape ("<red-star-left><blue-circle-top>.", `tell`).
  Reading a scene from the context, not guessing it, is what the frozen LLM must already know for
  stage 1 to teach the vision side to speak to it (LLaMA learns that from its own pretraining; a
  tiny LLM trained on image-less text does not).
* ``instructions_train`` / ``instructions_test`` (stage 2), categories (``category`` field):
  colour, shape, count, position (single image); two_image (which has more shapes; same colour?);
  reading (the rendered word); multi_turn (2-3 questions on one image); text_only (arithmetic,
  spelling backwards, counting letters: no image). Every sample records the last ``question`` and
  its exact expected ``answer`` (lower-case words, digits, or the upper-case word; keyed where the
  question picks one of several shapes, `ask`) for exact-match evaluation, and its ``scene``
  (JSON) so answers can be checked against the drawing.

`owl_jax.demo.dataset.prepare` also trains the SentencePiece tokenizer on the train text and adds
the object words (`OBJECT_WORDS`) to it.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from owl_jax.data import records
from owl_jax.data.conversation import IMAGE_TAG, build_conversation, caption_conversation
from owl_jax.demo.draw import COLOURS, encode_jpeg, render_scene

SHAPES = ("circle", "square", "triangle", "star")
# Region centres on the 224-px canvas. A shape's radius is 22-29 px and its centre within 6 px of its region's,
# so no two shapes touch and none leaves the canvas; at the 112 px the tiny ViT sees, smaller shapes (16-24)
# left circle and square, triangle and star confused one time in six (docs/notes/research_log.md, "Larger shapes").
REGIONS = {"left": (36, 112), "right": (188, 112), "top": (112, 36), "bottom": (112, 188), "center": (112, 112)}
REGION_ORDER = ("left", "top", "center", "right", "bottom")
REGION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

CATEGORIES = ("colour", "shape", "count", "position", "two_image", "reading", "multi_turn", "text_only")
CATEGORY_WEIGHTS = (0.13, 0.13, 0.13, 0.13, 0.12, 0.12, 0.1, 0.14)
SPLITS = ("captions_train", "captions_test", "instructions_train", "instructions_test", "text_train")
_SPLIT_CODE = {s: i + 1 for i, s in enumerate(SPLITS)}
DEFAULT_SIZES = {"captions_train": 4000, "captions_test": 200, "instructions_train": 12000, "instructions_test": 400,
                 "text_train": 16000}
# text_train's mix: captions, quizzes (a told scene and up to QUIZ_TURNS questions), text-only quizzes
# (up to QUIZ_TURNS of arithmetic, spelling backwards, counting letters: one task a conversation left
# the tiny LLaMA 0% of its sums after 16000 of them), the rest instructions. Captions are copies of the
# told scene, long and soon easy: at a fifth of the items they were most of the loss's tokens.
TEXT_CAPTION_SHARE = 0.1
TEXT_QUIZ_SHARE = 0.45
TEXT_TASK_SHARE = 0.25
QUIZ_TURNS = 5
RENDER_BLOCK = 256
WORD_PROB = 0.3

# ---------------------------------------------------------------- scenes


def random_word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(LETTERS), size=int(rng.integers(3, 7))))


def sample_scene(rng: np.random.Generator, n_shapes: int | None = None, word: bool | None = None) -> dict:
    """A random scene: {"shapes": [...], "word": str, "background": {...}} (JSON-able)."""
    if word is None:
        word = rng.random() < WORD_PROB
    regions = [r for r in REGION_ORDER if not (word and r == "center")]
    n = int(n_shapes if n_shapes is not None else rng.integers(1, 5))
    chosen = sorted(rng.choice(regions, size=n, replace=False).tolist(), key=REGION_ORDER.index)
    shapes = []
    for region in chosen:
        cx, cy = REGIONS[region]
        shapes.append({
            "shape": str(rng.choice(SHAPES)),
            "colour": str(rng.choice(list(COLOURS))),
            "region": region,
            "x": int(cx + rng.integers(-6, 7)),
            "y": int(cy + rng.integers(-6, 7)),
            "r": int(rng.integers(22, 30)),
        })
    background = {"kind": "noise" if rng.random() < 0.5 else "plain", "grey": int(rng.integers(95, 166)),
                  "seed": int(rng.integers(0, 2**31 - 1))}
    return {"shapes": shapes, "word": random_word(rng) if word else "", "background": background}


def scene_key(scene: dict) -> tuple:
    """What a scene shows (not where exactly): the identity used for train/test disjointness."""
    return (tuple((s["shape"], s["colour"], s["region"]) for s in scene["shapes"]), scene["word"])


# ---------------------------------------------------------------- language


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: dict) -> str:
    """The caption: every shape with its colour and position, then the word if any."""
    parts = [f"{'an' if s['colour'][0] in 'aeiou' else 'a'} {s['colour']} {s['shape']} {REGION_PHRASE[s['region']]}"
             for s in scene["shapes"]]
    text = _join(parts)
    text = text[0].upper() + text[1:] + "."
    if scene["word"]:
        text += f" The word {scene['word']} is written in the middle."
    return text


def object_word(shape: dict) -> str:
    """One shape as one word of the tokenizer: "<red-star-left>"."""
    return f"<{shape['colour']}-{shape['shape']}-{shape['region']}>"


OBJECT_WORDS = tuple(object_word({"colour": c, "shape": s, "region": r})
                     for c in COLOURS for s in SHAPES for r in REGION_ORDER)


def tell(scene: dict) -> str:
    """The scene told in object words, one a shape ("<red-star-left><blue-circle-top>."), then the
    written word as `describe` tells it. A question about one shape is then answered from one
    position of the text: with the shape's words spread over several positions (`describe`), the
    tiny LLaMA must first gather them in one before it can look the shape up, which it learns far
    more slowly (docs/notes/research_log.md, "Object words and keyed answers")."""
    text = "".join(object_word(s) for s in scene["shapes"]) + "."
    if scene["word"]:
        text += f" The word {scene['word']} is written in the middle."
    return text


def _unique(scene, attr):
    vals = [s[attr] for s in scene["shapes"]]
    return [s for s in scene["shapes"] if vals.count(s[attr]) == 1]


def ask(kind: str, scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) about one scene; None when the scene cannot support `kind`.

    A question about one of several shapes is answered keyed: the words that pick the shape out,
    then what was asked ("What colour is the star?" -> "star red", "Where is the red star?" ->
    "red star left"). The key, said right before the answer, and the scene told one token a shape
    (`tell`) make the answer a lookup from the token just read, which the tiny LLaMA learns in
    hundreds of steps instead of thousands (docs/notes/research_log.md, "Object words and keyed
    answers")."""
    shapes = scene["shapes"]
    if kind == "colour":
        s = shapes[int(rng.integers(len(shapes)))]
        if len(shapes) == 1:
            return "What colour is the shape?", s["colour"]
        if s in _unique(scene, "shape") and rng.random() < 0.5:
            return f"What colour is the {s['shape']}?", f"{s['shape']} {s['colour']}"
        return f"What colour is the shape {REGION_PHRASE[s['region']]}?", f"{s['region']} {s['colour']}"
    if kind == "shape":
        s = shapes[int(rng.integers(len(shapes)))]
        if len(shapes) == 1:
            return "What shape is in the image?", s["shape"]
        if s in _unique(scene, "colour") and rng.random() < 0.5:
            return f"What shape is the {s['colour']} object?", f"{s['colour']} {s['shape']}"
        return f"What shape is {REGION_PHRASE[s['region']]}?", f"{s['region']} {s['shape']}"
    if kind == "count":
        if rng.random() < 0.6:
            return "How many shapes are there?", str(len(shapes))
        if rng.random() < 0.5:
            c = str(rng.choice(list(COLOURS)))
            return f"How many {c} shapes are there?", str(sum(s["colour"] == c for s in shapes))
        t = str(rng.choice(SHAPES))
        return f"How many {t}s are there?", str(sum(s["shape"] == t for s in shapes))
    if kind == "position":
        pairs = [(s["colour"], s["shape"]) for s in shapes]
        unique = [s for s in shapes if pairs.count((s["colour"], s["shape"])) == 1]
        if not unique:
            return None
        s = unique[int(rng.integers(len(unique)))]
        return f"Where is the {s['colour']} {s['shape']}?", f"{s['colour']} {s['shape']} {s['region']}"
    if kind == "reading":
        if not scene["word"]:
            return None
        return "What word is written in the image?", scene["word"]
    raise ValueError(kind)


def _text_only(rng: np.random.Generator) -> tuple[str, str]:
    k = int(rng.integers(4))
    if k == 0:
        a, b = (int(x) for x in rng.integers(0, 50, size=2))
        return f"What is {a} plus {b}?", str(a + b)
    if k == 1:
        a, b = sorted((int(x) for x in rng.integers(0, 50, size=2)), reverse=True)
        return f"What is {a} minus {b}?", str(a - b)
    w = random_word(rng)
    if k == 2:
        return f"Spell the word {w} backwards.", w[::-1]
    return f"How many letters are in the word {w}?", str(len(w))


def _two_image(rng: np.random.Generator) -> tuple[list[dict], tuple[str, str]]:
    if rng.random() < 0.5:
        n1, n2 = (int(x) for x in rng.choice(np.arange(1, 5), size=2, replace=False))
        scenes = [sample_scene(rng, n_shapes=n1), sample_scene(rng, n_shapes=n2)]
        return scenes, ("Which image has more shapes, the first or the second?", "first" if n1 > n2 else "second")
    a, b = sample_scene(rng, n_shapes=1), sample_scene(rng, n_shapes=1)
    same = rng.random() < 0.5
    if same:
        b["shapes"][0]["colour"] = a["shapes"][0]["colour"]
    elif b["shapes"][0]["colour"] == a["shapes"][0]["colour"]:
        b["shapes"][0]["colour"] = str(rng.choice([c for c in COLOURS if c != a["shapes"][0]["colour"]]))
    return [a, b], ("Are the shapes in the two images the same colour?", "yes" if same else "no")


def _instruction(rng: np.random.Generator) -> dict:
    category = str(rng.choice(CATEGORIES, p=CATEGORY_WEIGHTS))
    if category == "text_only":
        return {"category": category, "scenes": [], "turns": [_text_only(rng)]}
    if category == "two_image":
        scenes, qa = _two_image(rng)
        return {"category": category, "scenes": scenes, "turns": [qa]}
    if category == "multi_turn":
        scene = sample_scene(rng)
        kinds = ["colour", "shape", "count", "position"] + (["reading"] if scene["word"] else [])
        n = int(rng.integers(2, 4))
        picks = rng.choice(kinds, size=n, replace=False).tolist()
        turns = [t for t in (ask(k, scene, rng) for k in picks) if t is not None]
        return {"category": category, "scenes": [scene], "turns": turns} if len(turns) >= 2 else None
    scene = sample_scene(rng, word=True if category == "reading" else None)
    qa = ask(category, scene, rng)
    return {"category": category, "scenes": [scene], "turns": [qa]} if qa is not None else None


def _caption(rng: np.random.Generator) -> dict:
    scene = sample_scene(rng)
    return {"category": "caption", "scenes": [scene], "caption": describe(scene)}


def _quiz(rng: np.random.Generator, max_turns: int = QUIZ_TURNS) -> dict | None:
    """One scene, then up to `max_turns` distinct questions about it (a multi-turn conversation):
    many binding examples (the colour *of the star*) per told scene, for the LLM's pretraining."""
    scene = sample_scene(rng)
    kinds = ["colour", "shape", "count", "position"] + (["reading"] if scene["word"] else [])
    turns: dict[str, tuple[str, str]] = {}
    for _ in range(3 * max_turns):
        qa = ask(str(rng.choice(kinds)), scene, rng)
        if qa is not None and len(turns) < max_turns:
            turns.setdefault(qa[0], qa)  # a repeated question could be answered by copying the first answer
    return {"category": "multi_turn", "scenes": [scene], "turns": list(turns.values())} if len(turns) >= 2 else None


def _text_quiz(rng: np.random.Generator, max_turns: int = QUIZ_TURNS) -> dict:
    """2 to `max_turns` text-only tasks in one conversation (the arithmetic needs many examples)."""
    turns = dict(_text_only(rng) for _ in range(int(rng.integers(2, max_turns + 1))))  # distinct questions
    return {"category": "text_only", "scenes": [], "turns": list(turns.items())}


def _text_item(rng: np.random.Generator) -> dict | None:
    u = rng.random()
    if u < TEXT_CAPTION_SHARE:
        return _caption(rng)
    if u < TEXT_CAPTION_SHARE + TEXT_QUIZ_SHARE:
        return _quiz(rng)
    if u < TEXT_CAPTION_SHARE + TEXT_QUIZ_SHARE + TEXT_TASK_SHARE:
        return _text_quiz(rng)
    return _instruction(rng)


def write_scenes_as_text(text: str, scenes: list[dict]) -> str:
    """`text` with its i-th ``<image>`` replaced by scenes[i] told in object words (`tell`; text_train)."""
    parts = text.split(IMAGE_TAG)
    if len(parts) != len(scenes) + 1:
        raise ValueError(f"{len(parts) - 1} image tags for {len(scenes)} scenes")
    return parts[0] + "".join(tell(sc) + rest for sc, rest in zip(scenes, parts[1:]))


def _to_record(split: str, render: bool, index: int, item_key: tuple[dict, str]) -> dict:
    item, key = item_key
    scenes = item["scenes"]
    if item["category"] == "caption":
        text = caption_conversation(item["caption"])
        question, answer = "", item["caption"]
    else:
        text = build_conversation(len(scenes), item["turns"])
        question, answer = item["turns"][-1]
    as_text = split == "text_train"
    if as_text:
        text = write_scenes_as_text(text, scenes)
    return records.empty_record(
        text=text,
        images=[encode_jpeg(render_scene(s)) for s in scenes] if render and not as_text else [],
        task_type=f"shapesworld_{split.split('_')[0]}",
        source=f"shapesworld/{split}/{index}",
        category=item["category"],
        question=question,
        answer=answer,
        scene=json.dumps(scenes, sort_keys=True),
    ) | {"_key": key}


def sample_key(item: dict) -> str:
    """Identity for disjointness: scene contents + the whole conversation."""
    if item["category"] == "caption":
        conv = item["caption"]
    else:
        conv = json.dumps(item["turns"])
    return json.dumps([[scene_key(s) for s in item["scenes"]], conv])


def generate(split: str, n: int, seed: int, exclude: set | None = None, render: bool = True) -> Iterator[dict]:
    """The `n` records of `split` in order (deterministic in (split, n, seed, exclude)).

    Samples whose `sample_key` is in `exclude` (the test keys, for train splits) or already drawn
    are skipped and redrawn. Images are drawn RENDER_BLOCK records at a time on a thread per core
    (numpy's noise, the drawing and the JPEG encoder let go of the GIL: 1.9x on 2 cores).
    """
    items = _draw(split, n, seed, exclude or set())
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for start in range(0, n, RENDER_BLOCK):
            block = list(itertools.islice(items, RENDER_BLOCK))
            yield from pool.map(functools.partial(_to_record, split, render), itertools.count(start), block)


def _draw(split: str, n: int, seed: int, exclude: set) -> Iterator[tuple[dict, str]]:
    """`generate`'s samples and their keys, undrawn."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown ShapesWorld split {split!r}; one of {SPLITS}")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    make = {"captions": _caption, "instructions": _instruction, "text": _text_item}[split.split("_")[0]]
    seen: set = set()
    produced, attempts = 0, 0
    while produced < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"ShapesWorld {split}: could not draw {n} distinct samples")
        item = make(rng)
        if item is not None and len(item.get("turns", ())) > 1:
            item = _without_held_out_turns(item, exclude)
        if item is None:
            continue
        key = sample_key(item)
        if key in exclude or key in seen:
            continue
        seen.add(key)
        yield item, key
        produced += 1


def _without_held_out_turns(item: dict, exclude: set) -> dict | None:
    """A conversation of several turns less those that are held-out questions on their own, about the
    same scenes (the world is small: one-shape scenes recur, and a quiz or multi-turn conversation
    would otherwise teach some held-out answers). None when too few turns are left: a text-only quiz
    needs one, a conversation about a scene two."""
    turns = [t for t in item["turns"]
             if sample_key({"category": item["category"], "scenes": item["scenes"], "turns": [t]}) not in exclude]
    return item | {"turns": turns} if len(turns) >= (1 if not item["scenes"] else 2) else None


def split_keys(split: str, n: int, seed: int) -> set:
    return {r["_key"] for r in generate(split, n, seed, render=False)}


def generate_all(sizes: dict, seed: int, render: bool = True) -> dict[str, Iterator[dict]]:
    """Generators for every split in `sizes`; train splits exclude their test split's samples
    (text_train: both test splits', compared as if its scenes were images)."""
    gens, test_keys = {}, {}
    for split, n in sizes.items():
        exclude = None
        if split.endswith("_train"):
            tests = (
                ("captions_test", "instructions_test") if split == "text_train" else (split.replace("_train", "_test"),)
            )
            for t in tests:  # each test split's keys drawn once, shared by the train splits that avoid it
                if t not in test_keys:
                    test_keys[t] = split_keys(t, sizes.get(t, DEFAULT_SIZES[t]), seed)
            exclude = set().union(*(test_keys[t] for t in tests))
        gens[split] = generate(split, n, seed, exclude=exclude, render=render)
    return gens
