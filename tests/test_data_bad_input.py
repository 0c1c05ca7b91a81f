"""owl_jsonl treats a crawled dataset as untrusted: image paths stay under the image root, and the
prepare command fails early and clearly on wrong inputs instead of leaving empty or near-empty builds."""
import builtins
import json
import os

import numpy as np
import pytest
from PIL import Image

from owl_jax.data import conversation as conv
from owl_jax.data import owl_jsonl, prepare, records

ONE = conv.build_conversation(1, [("What is in the image?", "noise")])
TEXT = conv.build_conversation(0, [("What is 2 plus 2?", "4")])


def _img(path):
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG")


def _jsonl(path, images_per_row):
    """One row per entry: a list of image paths (one-image conversation) or None (text-only)."""
    rows = [{"text": TEXT} if ims is None else {"image": ims, "text": ONE} for ims in images_per_row]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def outside_layout(tmp_path):
    """images/good.jpg; outside/secret.jpg (a valid image); images/link.jpg -> outside/secret.jpg."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    _img(images / "good.jpg")
    secret = outside / "secret.jpg"
    _img(secret)
    os.symlink(secret, images / "link.jpg")
    return images, str(secret)


def _main(*args):
    return prepare.main(list(args))


def _report(out):
    with open(os.path.join(records.builder_dir(str(out), "owl_jsonl"), "report.json")) as f:
        return json.load(f)


def test_images_outside_root_are_refused_unread(tmp_path, outside_layout, monkeypatch):
    images, secret = outside_layout
    jsonl = _jsonl(tmp_path / "train.jsonl", [["good.jpg"], ["../outside/secret.jpg"], [secret], ["link.jpg"]])
    opened = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    builder = prepare.prepare_owl_jsonl(str(tmp_path / "out"), [str(jsonl)], str(images))
    monkeypatch.undo()

    assert builder.report.written == {"train": 1}
    assert builder.report.counts == {"outside_image_root": 3}
    assert builder.report.examples["outside_image_root"] == [
        "train.jsonl:2 (../outside/secret.jpg)", f"train.jsonl:3 ({secret})", "train.jsonl:4 (link.jpg)"]
    assert os.path.realpath(images / "good.jpg") in opened  # the recorder sees image reads
    assert os.path.realpath(secret) not in opened


def test_allow_images_outside_root_admits_absolute_path(tmp_path, outside_layout):
    images, secret = outside_layout
    jsonl = _jsonl(tmp_path / "train.jsonl", [[secret]])
    out = tmp_path / "out"
    assert _main(f"--jsonl={jsonl}", f"--images={images}", f"--out={out}", "--allow_images_outside_root") == 0
    report = _report(out)
    assert report["written"] == {"train": 1} and report["counts"] == {}
    src = records.data_source(str(out), "owl_jsonl", "train")
    with open(secret, "rb") as f:
        assert src[0]["images"][0] == f.read()


def test_nul_in_image_path_is_a_bad_image_field(tmp_path):
    report = records.BuildReport()
    line = json.dumps({"image": ["a\0.jpg"], "text": ONE})
    assert owl_jsonl.parse_row(line, "t.jsonl:1", str(tmp_path), report) is None
    assert report.counts == {"bad_image_field": 1}


@pytest.mark.parametrize("flag", ["--jsonl", "--val_jsonl"])
def test_missing_jsonl_file_is_an_error_and_writes_nothing(tmp_path, capsys, flag):
    (tmp_path / "images").mkdir()
    good = _jsonl(tmp_path / "train.jsonl", [None])
    missing = tmp_path / "nope.jsonl"
    files = {"--jsonl": f"{good},{missing}", "--val_jsonl": str(missing)}
    if flag == "--val_jsonl":
        files["--jsonl"] = str(good)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _main(*(f"{k}={v}" for k, v in files.items()), f"--images={tmp_path / 'images'}", f"--out={out}")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag}: {missing} is not a file (expected a JSONL file" in err
    assert not out.exists()


@pytest.mark.parametrize("images_flag", ["nowhere", ""])
def test_images_not_a_directory_is_an_error_before_building(tmp_path, capsys, images_flag):
    jsonl = _jsonl(tmp_path / "train.jsonl", [None, ["a.jpg"]])
    out = tmp_path / "out"
    args = [f"--jsonl={jsonl}", f"--out={out}"] + ([f"--images={tmp_path / images_flag}"] if images_flag else [])
    with pytest.raises(SystemExit) as e:
        _main(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    shown = str(tmp_path / images_flag) if images_flag else "(not given)"
    assert f"--images={shown} is not a directory, but train.jsonl:2 names images" in err
    assert not out.exists()


def test_text_only_rows_need_no_images(tmp_path):
    jsonl = _jsonl(tmp_path / "train.jsonl", [None, None])
    out = tmp_path / "out"
    assert _main(f"--jsonl={jsonl}", f"--out={out}") == 0
    assert _report(out)["written"] == {"train": 2}


@pytest.mark.parametrize("present,fails", [(0, True), (1, True), (2, False)])
def test_wrong_image_root_fails_and_removes_the_build(tmp_path, capsys, present, fails):
    """Of 4 image rows, `present` have their file under --images; more than half missing fails."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(present):
        _img(images / f"{i}.jpg")
    jsonl = _jsonl(tmp_path / "train.jsonl", [[f"{i}.jpg"] for i in range(4)] + [None])
    out = tmp_path / "out"
    args = (f"--jsonl={jsonl}", f"--images={images}", f"--out={out}")
    if not fails:
        assert _main(*args) == 0
        assert _report(out)["counts"] == {"missing_image": 2}
        return
    with pytest.raises(SystemExit) as e:
        _main(*args)
    assert e.value.code == 2
    captured = capsys.readouterr()
    missing = 4 - present
    assert f"missing_image: {missing} (first at train.jsonl:" in captured.out  # the report is still shown
    err = captured.err.strip().splitlines()[-1]  # one line after TFDS's progress bars
    assert err.startswith("error: ")
    assert (f"{missing} of 4 rows that name images were skipped (missing_image={missing}, outside_image_root=0) "
            f"with image root {images}; is --images the right directory?") in err
    version = str(owl_jsonl.OwlJsonl.VERSION)
    assert f"removed the build {out / 'owl_jsonl' / version}" in err
    assert not (out / "owl_jsonl" / version).exists()


def test_build_prints_no_download_lines(tmp_path, capfd):
    jsonl = _jsonl(tmp_path / "train.jsonl", [None])
    val = _jsonl(tmp_path / "val.jsonl", [None])
    out = tmp_path / "out"
    assert _main(f"--jsonl={jsonl}", f"--val_jsonl={val}", f"--out={out}") == 0
    printed = capfd.readouterr()
    built = out / "owl_jsonl" / str(owl_jsonl.OwlJsonl.VERSION)
    assert f"building owl_jsonl from 2 file(s) into {built}\n" in printed.out
    assert "records written: train=1, validation=1" in printed.out
    for text in (printed.out, printed.err):
        assert "Downloading and preparing" not in text and "downloaded and prepared" not in text


def test_relative_paths_are_taken_from_the_current_directory(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    _img(data / "images" / "a.jpg")
    _jsonl(data / "train.jsonl", [["a.jpg"], None])
    _jsonl(data / "val.jsonl", [["a.jpg"]])
    monkeypatch.chdir(tmp_path)
    assert _main("--jsonl=data/train.jsonl", "--val_jsonl=data/val.jsonl", "--images=data/images", "--out=out") == 0
    assert f"into {tmp_path / 'out' / 'owl_jsonl' / str(owl_jsonl.OwlJsonl.VERSION)}" in capsys.readouterr().out
    monkeypatch.chdir(data)  # the build does not depend on the directory it was made from
    report = _report(tmp_path / "out")
    assert report["written"] == {"train": 2, "validation": 1} and report["counts"] == {}
    assert len(records.data_source(str(tmp_path / "out"), "owl_jsonl", "validation")[0]["images"]) == 1
