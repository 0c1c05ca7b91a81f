r"""What a trained owl says about each shape: its greedy captions of the held-out caption scenes,
scored object by object against the truth.

    python -m owl_jax.demo.caption_words --params=WORKDIR/stage1/params --data=WORKDIR/data

Exact match over a whole caption hides where it fails. Here each shape the truth names is found in
the caption by its place ("... a blue star at the top ..."), and its colour and kind are checked
there; the kinds' confusion matrix shows which shapes the vision side cannot yet tell apart. The
written word is checked whole.
"""
from __future__ import annotations

import re
import sys
from typing import Iterable

import ml_collections
from absl import flags

from owl_jax.cli import parse_flags
from owl_jax.demo import scenes as sw

_PLACE = {phrase: region for region, phrase in sw.REGION_PHRASE.items()}
_OBJECT = re.compile(r"\b(?:an?|An?) (\w+) (\w+) (" + "|".join(map(re.escape, _PLACE)) + ")")
_WORD = re.compile(r"The word (\S+) is written")


def caption_objects(caption: str) -> dict[str, tuple[str, str]]:
    """{region: (colour, shape)} for every "a COLOUR SHAPE PLACE" of a caption in `describe`'s grammar."""
    return {_PLACE[m.group(3)]: (m.group(1), m.group(2)) for m in _OBJECT.finditer(caption)}


def written_word(caption: str) -> str | None:
    m = _WORD.search(caption)
    return m.group(1) if m else None


def score_captions(pairs: Iterable[tuple[str, str]]) -> dict:
    """(truth, prediction) captions -> counts: the truth's objects, those whose place the prediction
    names, and of those the right colour and the right kind; the words written and read; the kinds'
    confusion {truth: {predicted: n}} over the placed objects."""
    counts = dict.fromkeys(("objects", "placed", "colour", "shape", "words", "words_read", "captions", "exact"), 0)
    confusion = {s: dict.fromkeys(sw.SHAPES, 0) for s in sw.SHAPES}
    for truth, pred in pairs:
        counts["captions"] += 1
        counts["exact"] += truth.strip() == pred.strip()
        said = caption_objects(pred)
        for region, (colour, shape) in caption_objects(truth).items():
            counts["objects"] += 1
            if region not in said:
                continue
            counts["placed"] += 1
            counts["colour"] += said[region][0] == colour
            counts["shape"] += said[region][1] == shape
            if said[region][1] in confusion[shape]:
                confusion[shape][said[region][1]] += 1
        if (word := written_word(truth)) is not None:
            counts["words"] += 1
            counts["words_read"] += written_word(pred) == word
    return {"counts": counts, "shape_confusion": confusion}


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("params", None, "an owl params dir (e.g. WORKDIR/stage1/params)", flag_values=fv)
    flags.DEFINE_string("data", None, "the main job's ShapesWorld dir (WORKDIR/data)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "captions decoded at once", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    f = parse_flags(argv, _flags(), __doc__, required=("params", "data"))
    from owl_jax.demo.jobs import evaluate  # loads the model code: after the flags, so --help is instant

    cfg = ml_collections.ConfigDict({"split": "captions_test", "batch_size": f.batch_size, "max_new_tokens": 48,
                                     "max_questions": 0})
    rows = evaluate(f.params, f.data, cfg, False, "captions")["answers"]
    result = score_captions((r["answer"], r["prediction"]) for r in rows)
    c = result["counts"]
    print(f"{c['captions']} captions, {c['exact']} exact; of {c['objects']} shapes {c['placed']} placed, colour "
          f"{c['colour']}, kind {c['shape']}; words read {c['words_read']} of {c['words']}")
    print("kind confusion (rows: the truth):  " + "  ".join(sw.SHAPES))
    for shape, row in result["shape_confusion"].items():
        print(f"  {shape:9s} " + "  ".join(f"{row[s]:5d}" for s in sw.SHAPES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
