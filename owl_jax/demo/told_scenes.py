"""Told-scene samples for owl_jax.demo.llm_probe: a ShapesWorld scene told as text (or one object
word a shape), then questions about it, each answer opened (or not) by words that name the object
asked about."""
import re

import jax.numpy as jnp

from owl_jax.demo import scenes as sw

RESTATED = (  # question -> the answer's opening, which names the object asked about
    (re.compile(r"What (?:colour|shape) is (the .+)\?"), r"\1 is"),
    (re.compile(r"What shape is ((?:on|at|in) .+)\?"), r"the shape \1 is"),
    (re.compile(r"Where is (the .+)\?"), r"\1 is"),
)


def restated(question: str) -> str:
    """--restate: "What colour is the star?" -> "the star is" (the answer then follows); "" for the
    questions that name no object (counts, the written word)."""
    for pattern, opening in RESTATED:
        if pattern.fullmatch(question):
            return pattern.sub(opening, question)
    return ""


_REGION = r"(?:on|at|in) the (left|right|top|bottom|center)"
KEYED = (  # question -> the words naming the object asked about, said right before a keyed answer
    re.compile(r"What colour is the (circle|square|triangle|star)\?"),
    re.compile(rf"What colour is the shape {_REGION}\?"),
    re.compile(r"What shape is the (\w+) object\?"),
    re.compile(rf"What shape is {_REGION}\?"),
    re.compile(r"Where is the (\w+ \w+)\?"),
)


def keyed(question: str) -> str:
    """--key_answers: "What colour is the star?" -> "star", "What shape is on the left?" -> "left",
    "Where is the red star?" -> "red star"; "" where the question names no one object."""
    for pattern in KEYED:
        if m := pattern.fullmatch(question):
            return m[1]
    return ""


def object_rows(embedding, encode):
    """float[V, D] with each object word's row (`scenes.OBJECT_WORDS`, one token each) the sum of the
    rows of its colour, shape and region words."""
    words = [(c, s, r) for c in sw.COLOURS for s in sw.SHAPES for r in sw.REGION_ORDER]
    ids = [encode(sw.object_word({"colour": c, "shape": s, "region": r})) for c, s, r in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError("the tokenizer does not hold the object words as tokens (add scenes.OBJECT_WORDS)")
    rows = jnp.stack([embedding[jnp.asarray(encode(f" {c} {s} {r}"))].sum(0) for c, s, r in words])
    return embedding.at[jnp.asarray([i[0] for i in ids])].set(rows)


def scene_sample(item, encode, opening=None, order_rng=None, tell=None) -> tuple[list[int], list[int]]:
    """(ids, answer) of a told-scene sample: answer is 2 on the answers' tokens (EOS included), 1 on
    an opening (`opening(question)`: `restated` or `keyed`; trained on, not scored), 0 elsewhere.
    Each scene told by `tell` (default `scenes.describe`); with `order_rng` its shapes in a random
    order (else in the regions' fixed order)."""
    tell = tell or sw.describe

    def told(scene):
        if order_rng is None:
            return tell(scene)
        order = order_rng.permutation(len(scene["shapes"]))
        return tell(scene | {"shapes": [scene["shapes"][i] for i in order]})

    turns = [("Describe.", item["caption"])] if item["category"] == "caption" else item["turns"]
    ids = [1] + encode(" ".join(told(s) for s in item["scenes"]))
    answer = [0] * len(ids)
    for q, a in turns:
        opening_words = opening(q) if opening else ""
        p, o = encode(" Q: " + q + " A:"), encode(" " + opening_words) if opening_words else []
        ans = encode(" " + a) + [2]
        ids += p + o + ans
        answer += [0] * len(p) + [1] * len(o) + [2] * len(ans)
    return ids, answer
