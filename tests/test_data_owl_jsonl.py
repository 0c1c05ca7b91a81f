"""owl_jsonl: released-format JSONL -> TFDS ArrayRecord; every bad-row kind is counted, the build completes."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from owl_jax.data import conversation as conv
from owl_jax.data import records

from conftest import subprocess_env


def _img(path, mode="RGB", fmt="JPEG", size=(40, 30)):
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    img.save(path, format=fmt)


GOOD1 = conv.build_conversation(1, [("What is in the image?", "noise")])
GOOD2 = conv.build_conversation(2, [("Are they the same?", "no")])
MULTI = conv.build_conversation(1, [("Q1?", "A1"), ("Q2?", "A2")])
TEXT = conv.build_conversation(0, [("What is 2 plus 2?", "4")])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsonl")
    images = root / "images"
    images.mkdir()
    _img(images / "good.jpg")
    _img(images / "good2.jpg")
    _img(images / "cmyk.jpg", mode="CMYK")
    _img(images / "png_inside.jpg", fmt="PNG")
    _img(images / "grey.png", mode="L", fmt="PNG")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    rows = [
        {"image": ["good.jpg"], "text": GOOD1, "task_type": "llava_sft"},                 # 1 ok
        {"image": ["good.jpg", "good2.jpg"], "text": GOOD2, "task_type": "llava_sft"},    # 2 ok
        {"text": TEXT, "task_type": "gpt4instruct_sft"},                                  # 3 ok text-only
        {"image": "good2.jpg", "text": MULTI},                                            # 4 ok, str image
        {"image": ["nope.jpg"], "text": GOOD1},                                           # 5 missing_image
        {"image": ["broken.jpg"], "text": GOOD1},                                         # 6 unreadable_image
        {"image": ["cmyk.jpg"], "text": GOOD1},                                           # 7 converted
        {"image": ["png_inside.jpg"], "text": GOOD1},                                     # 8 wrong_extension
        {"image": ["good.jpg"], "task_type": "x"},                                        # 9 no_text
        {"image": ["good.jpg"], "text": GOOD2},                                           # 10 more tags
        {"image": ["good.jpg", "good2.jpg"], "text": GOOD1},                              # 11 more images
        "{not json",                                                                      # 12 bad_json
        {"image": ["good.jpg"], "caption": "A noisy picture."},                           # 13 caption row
        "",                                                                               # 14 blank
        {"image": ["grey.png"], "text": GOOD1},                                           # 15 converted (L)
        {"image": [3], "text": GOOD1},                                                    # 16 bad_image_field
        {"text": "   "},                                                                  # 17 no_text
        {"image": [], "text": GOOD1},                                                     # 18 more tags
    ]
    jsonl = root / "train.jsonl"
    jsonl.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    val = root / "val.jsonl"
    val.write_text(json.dumps({"text": TEXT}) + "\n")
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "owl_jax.data.prepare", f"--jsonl={jsonl}",
         f"--val_jsonl={val}", f"--images={images}", f"--out={out}"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_every_bad_row_kind_is_counted(built):
    out, stdout = built
    report = json.load(open(os.path.join(records.builder_dir(str(out), "owl_jsonl"), "report.json")))
    assert report["counts"] == {
        "missing_image": 1, "unreadable_image": 1, "converted_image": 2, "wrong_extension": 1, "no_text": 2,
        "more_tags_than_images": 2, "more_images_than_tags": 1, "bad_json": 1, "bad_image_field": 1,
    }
    assert report["written"] == {"train": 9, "validation": 1}
    ex = report["examples"]
    assert ex["missing_image"] == ["train.jsonl:5 (nope.jpg)"]
    assert ex["unreadable_image"] == ["train.jsonl:6 (broken.jpg)"]
    assert ex["wrong_extension"] == ["train.jsonl:8 (png_inside.jpg is PNG)"]
    assert [e.split(" ")[0] for e in ex["converted_image"]] == ["train.jsonl:7", "train.jsonl:15"]
    assert ex["no_text"] == ["train.jsonl:9", "train.jsonl:17"]
    assert ex["more_tags_than_images"] == ["train.jsonl:10", "train.jsonl:18"]
    assert ex["more_images_than_tags"] == ["train.jsonl:11"]
    assert ex["bad_json"] == ["train.jsonl:12"] and ex["bad_image_field"] == ["train.jsonl:16"]
    # the command prints the report
    assert "missing_image: 1 (first at train.jsonl:5 (nope.jpg))" in stdout
    assert "records written: train=9, validation=1" in stdout


def test_records_are_readable_and_repaired(built):
    out, _ = built
    src = records.data_source(str(out), "owl_jsonl", "train")
    assert len(src) == 9
    by_line = {records.as_str(r["source"]).split(":")[1]: r for r in (src[i] for i in range(len(src)))}
    assert sorted(by_line, key=int) == ["1", "2", "3", "4", "7", "8", "11", "13", "15"]
    for line, rec in by_line.items():
        text = records.as_str(rec["text"])
        assert text.count("<image>") == len(rec["images"]), line
        for b in rec["images"]:
            img = Image.open(io.BytesIO(b))
            assert img.mode == "RGB" and img.format in ("JPEG", "PNG")
    assert records.as_str(by_line["1"]["task_type"]) == "llava_sft"
    assert len(by_line["3"]["images"]) == 0
    assert len(by_line["11"]["images"]) == 1  # extra image dropped
    assert records.as_str(by_line["13"]["text"]) == conv.caption_conversation("A noisy picture.")
    idx = records.num_images_index(str(out), "owl_jsonl", "train")
    assert idx.tolist() == [len(src[i]["images"]) for i in range(len(src))]
    assert len(records.data_source(str(out), "owl_jsonl", "validation")) == 1


def test_pipeline_reads_owl_jsonl(built, tmp_path):
    from owl_jax.data import pipeline
    from owl_jax.data.tokenizer import train_tokenizer

    out, _ = built
    tok = train_tokenizer([GOOD1, GOOD2, MULTI, TEXT] * 10, str(tmp_path / "tok"), vocab_size=300)
    cfg = pipeline.default_config()
    cfg.update(dataset="owl_jsonl", dataset_dir=str(out), split="train", tokenizer_path=tok, batch_size=4,
               max_len=96, max_images_per_batch=4, image_size=16, image_token_count=4, num_epochs=1,
               shuffle=False, return_index=True)
    it = pipeline.make_iterator(cfg, 0, 1)
    batches = list(it)
    seen = sorted(i for b in batches for i in b["index"].tolist() if i >= 0)
    assert seen == list(range(9))
    for b in batches:
        assert (b["input_ids"] == -1).sum(1).tolist() == (4 * b["num_images"]).tolist()
    assert it.stats["samples"] == 9
