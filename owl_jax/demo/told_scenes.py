"""Told-scene samples for owl_jax.demo.llm_probe (a ShapesWorld scene told as text or in object
words, then questions about it), and the object words' first embeddings (the towers' LLM starts
its text from them)."""
import jax.numpy as jnp

from owl_jax.demo import scenes as sw


def object_rows(embedding, encode):
    """float[V, D] with each object word's row (`scenes.OBJECT_WORDS`, one token each) the sum of the
    rows of its colour, shape and region words."""
    words = [(c, s, r) for c in sw.COLOURS for s in sw.SHAPES for r in sw.REGION_ORDER]
    ids = [encode(sw.object_word({"colour": c, "shape": s, "region": r})) for c, s, r in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError("the tokenizer does not hold the object words as tokens (add scenes.OBJECT_WORDS)")
    rows = jnp.stack([embedding[jnp.asarray(encode(f"{c} {s} {r}"))].sum(0) for c, s, r in words])
    return jnp.asarray(embedding).at[jnp.asarray([i[0] for i in ids])].set(rows)


def scene_sample(item, encode, order_rng=None, tell=None) -> tuple[list[int], list[int]]:
    """(ids, answer) of a told-scene sample: answer is 1 on the answers' tokens (EOS included), 0
    elsewhere. Each scene told by `tell` (default `scenes.describe`); with `order_rng` its shapes in
    a random order (else in the regions' fixed order)."""
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
        p, ans = encode(" Q: " + q + " A:"), encode(" " + a) + [2]
        ids += p + ans
        answer += [0] * len(p) + [1] * len(ans)
    return ids, answer
