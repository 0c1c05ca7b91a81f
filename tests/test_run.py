"""The main job (python -m owl_jax.demo.run): a CI-sized smoke run of the same command, plus its parts.

The smoke run (--quick: small towers pretrained first, a small ShapesWorld, a smaller owl, 60 steps
a stage) must complete, its losses must fall within every stage, the report and plots must be
written, the export must load back bit-exact, and a rerun must skip what is finished.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import random_owl_params, small_owl_config, subprocess_env


def _run_quick(workdir):
    """The README's command as a user types it: from the workdir's parent, the workdir relative."""
    env = subprocess_env()
    # the job runs on one CPU device, as a user's would (conftest fakes 8 for the sharding tests)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    cwd = os.path.dirname(os.path.dirname(workdir))
    proc = subprocess.run(
        [sys.executable, "-m", "owl_jax.demo.run", f"--workdir={os.path.relpath(workdir, cwd)}", "--quick"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(absolute workdir, stdout) of the quick main job run as `--workdir=runs/NAME` from a temporary
    current directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    os.makedirs(cwd / "runs")
    workdir = str(cwd / "runs" / "owl_quick")
    return workdir, _run_quick(workdir)


def _losses(workdir, stage):
    rows = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


def test_quick_run_completes_and_losses_fall(quick_run):
    workdir, stdout = quick_run
    for stage in ("towers/llm", "stage1", "stage2"):
        losses = _losses(workdir, stage)
        assert len(losses) == 60 and np.all(np.isfinite(losses))
        assert np.mean(losses[-6:]) < np.mean(losses[:6]), (stage, losses)
        committed = os.listdir(os.path.join(workdir, stage, "checkpoints"))
        assert "60" in committed and not [c for c in committed if "tmp" in c], (stage, committed)
    assert "sample questions" in stdout and "stage 2 exact match" in stdout


def test_quick_run_report_and_plots(quick_run):
    workdir, _ = quick_run
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert set(report["stages"]) == {"stage1", "stage2"}
    for stage in report["stages"].values():
        acc = stage["accuracy"]
        assert acc["all"]["total"] == 32  # the quick instructions_test split, every question evaluated
        assert sum(v["total"] for k, v in acc.items() if k not in ("all", "image_questions")) == 32
        assert all(0 <= v["accuracy"] <= 1 for v in acc.values())
        assert stage["wall_s"] > 0
    assert "text_only" in report["blind_baselines"] and report["samples"]
    # what stage 1 started from: the towers made first (--quick implies --from_scratch)
    towers = report["towers"]
    assert towers["dir"] == os.path.join(workdir, "towers", "pretrained")
    assert towers["llm_accuracy_scenes_told"]["all"]["total"] == 32
    probes = {"colour", "shape", "region", "count", "letters"}
    assert set(towers["vit_probes"]) == set(towers["random_vit_probes"]) == probes
    assert report["host"]["cores"] == os.cpu_count() and report["host"]["jax"] == jax.__version__
    for name in ("loss.png", "accuracy.png", "attention.png"):
        with open(os.path.join(workdir, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_quick_run_export_loads_back_bit_exact(quick_run):
    """The export is stage 2's params with each LoRA folded into its kernel, W + (alpha / r) A @ B
    (owl_jax's layout: kernel float[L, in, out], lora_a float[L, in, r], lora_b float[L, r, out], on
    the LLM projections named by cfg.lora.target_modules), computed here with numpy from the saved
    params, not with the exporter's own merge."""
    from owl_jax.convert import from_torch
    from owl_jax.models.config import LoraConfig
    from owl_jax.params_io import load_params

    workdir, _ = quick_run
    params, cfg = load_params(os.path.join(workdir, "stage2", "params"))
    assert cfg.lora.rank > 0  # stage 2 trained LoRA; the export merges it
    flat = traverse_util.flatten_dict(params)
    block = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn"),
             **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "mlp")}
    carriers = {p[:-1] for p in flat if p[-1] in ("lora_a", "lora_b")}
    assert carriers == {("language_model", "model", "layers", block[m], m) for m in cfg.lora.target_modules}, carriers
    scale = np.float32(cfg.lora.alpha / cfg.lora.rank)
    expected = {}
    for path, value in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue  # the release's layout has no place for them: they live on in the kernels
        if path[:-1] in carriers and path[-1] == "kernel":
            a, b = flat[path[:-1] + ("lora_a",)], flat[path[:-1] + ("lora_b",)]
            assert a.shape == value.shape[:2] + (cfg.lora.rank,) and b.shape == (
                value.shape[0],
                cfg.lora.rank,
                value.shape[2],
            )
            assert np.abs(b).max() > 0, path  # trained: the merge moves the kernel
            value = (value.astype(np.float32) + scale * np.matmul(a.astype(np.float32), b.astype(np.float32))).astype(
                value.dtype
            )
        expected[path] = value
    back, report = from_torch(dataclasses.replace(cfg, lora=LoraConfig()), released=os.path.join(workdir, "export"))
    assert not report.initialised
    back = traverse_util.flatten_dict(back)
    assert set(back) == set(expected)
    for path, value in expected.items():
        assert back[path].dtype == value.dtype, path
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))
    assert os.path.exists(os.path.join(workdir, "export", "tokenizer.model"))


def test_quick_run_rerun_skips_finished_work(quick_run):
    workdir, _ = quick_run
    before = json.load(open(os.path.join(workdir, "report.json")))
    stdout = _run_quick(workdir)
    assert stdout.count("finished earlier") == 2
    after = json.load(open(os.path.join(workdir, "report.json")))
    assert after["stages"]["stage2"]["accuracy"] == before["stages"]["stage2"]["accuracy"]


# ------------------------------------------------------------------------------------ parts


def test_text_only_option_drops_images_and_placeholders():
    from owl_jax.data.conversation import build_conversation, caption_conversation, drop_images
    from owl_jax.data.pipeline import SampleOptions, encode_sample
    from owl_jax.data.text import encode_conversation

    turns = [("What colour is the circle?", "red"), ("Where is it?", "left")]
    assert drop_images(build_conversation(2, turns)) == build_conversation(0, turns)
    assert "<image>" not in drop_images(caption_conversation("A red circle on the left."))

    class CharTokenizer:  # enough of a tokenizer for encode_conversation
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [3 + (ord(ch) % 50) for ch in s]}

    text = build_conversation(1, turns)
    image = np.zeros((4, 4, 3), np.uint8)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    with_images = encode_sample(text, [buf.getvalue()], CharTokenizer(), SampleOptions(max_len=400, image_size=8,
                                                                                      image_token_count=3))
    text_only = encode_sample(
        text,
        [buf.getvalue()],
        CharTokenizer(),
        SampleOptions(max_len=400, image_size=8, image_token_count=3, text_only=True),
    )
    assert with_images["num_images"] == 1 and (with_images["input_ids"] == -1).sum() == 3
    assert text_only["num_images"] == 0 and text_only["images"].shape[0] == 0
    assert not (text_only["input_ids"] == -1).any()
    expected = encode_conversation(build_conversation(0, turns), CharTokenizer(), 400, 3)
    n = len(expected.ids)
    np.testing.assert_array_equal(text_only["input_ids"][:n], expected.ids)
    np.testing.assert_array_equal(text_only["loss_mask"][:n], expected.loss_mask)
    assert text_only["loss_mask"].sum() == with_images["loss_mask"].sum()  # the same answers are learned


def test_abstractor_attention_hook():
    """The sown probabilities are a distribution over [queries; CLS + patches] and leave the output alone."""
    from owl_jax.demo.report import abstractor_attention
    from owl_jax.models.owl import MplugOwl

    cfg = small_owl_config()
    params = random_owl_params(cfg)
    pixels = np.random.default_rng(0).normal(size=(3, 56, 56, 3)).astype(np.float32)
    model = MplugOwl(cfg)
    plain = model.apply({"params": params}, pixels, method=MplugOwl.encode_images)
    hooked, inter = model.apply({"params": params}, pixels, method=MplugOwl.encode_images, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(hooked))
    (probs,) = jax.tree_util.tree_leaves(inter)
    q, g = cfg.abstractor.num_queries, cfg.vision.image_size // cfg.vision.patch_size
    assert probs.shape == (cfg.abstractor.num_layers, 3, cfg.abstractor.num_heads, q, q + 1 + g * g)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
    for layer in range(cfg.abstractor.num_layers):
        maps = abstractor_attention(params, cfg, pixels, layer)
        assert maps.shape == (3, q, g, g)
        np.testing.assert_allclose(maps, np.asarray(probs)[layer].mean(1)[:, :, q + 1:].reshape(3, q, g, g), rtol=1e-6)


def test_host_description_names_the_cpu_and_the_features_that_change_bf16_results(tmp_path):
    from owl_jax.demo.report import host_description

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    host = host_description(str(cpuinfo))
    assert host["cpu"] == "AMD EPYC 9B14" and host["cpu_features"] == ["avx2", "avx512f", "avx512_bf16"]
    assert host_description(str(tmp_path / "missing"))["cpu_features"] == []


def test_scoring_and_blind_baselines():
    from owl_jax.demo.report import blind_baselines, score

    rows = [{"category": "colour", "answer": "red", "prediction": " red"},
            {"category": "colour", "answer": "red", "prediction": "Red"},
            {"category": "text_only", "answer": "12", "prediction": "12"}]
    s = score(rows)
    assert s["colour"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert s["image_questions"]["total"] == 2 and s["all"]["correct"] == 2
    train = [{"category": "count", "question": "How many red shapes are there?", "answer": "0"}] * 3 + \
            [{"category": "count", "question": "How many shapes are there?", "answer": "2"}] * 2 + \
            [{"category": "count", "question": "How many shapes are there?", "answer": "3"}]
    test = [{"category": "count", "question": "How many red shapes are there?", "answer": "0"},
            {"category": "count", "question": "How many shapes are there?", "answer": "3"},
            {"category": "count", "question": "How many blue shapes are there?", "answer": "0"}]
    b = blind_baselines(train, test)
    assert b["count"]["prior"] == pytest.approx(2 / 3)  # per-question prior; unseen question: category prior
    assert b["count"]["uniform"] == pytest.approx(1 / 3)


def test_captions_scored_shape_by_shape():
    from owl_jax.demo.caption_words import score_captions
    from owl_jax.demo.scenes import describe

    scene = {"shapes": [{"colour": "red", "shape": "circle", "region": "left"},
                        {"colour": "orange", "shape": "star", "region": "top"}], "word": "KEPLO"}
    said = {"shapes": [{"colour": "red", "shape": "square", "region": "left"},
                       {"colour": "orange", "shape": "star", "region": "bottom"}], "word": "KEPLA"}
    truth = describe(scene)
    assert truth == "A red circle on the left and an orange star at the top. The word KEPLO is written in the middle."
    result = score_captions([(truth, describe(said)), (truth, truth)])
    assert result["counts"] == {"objects": 4, "placed": 3, "colour": 3, "shape": 2, "words": 2, "words_read": 1,
                                "captions": 2, "exact": 1}
    assert result["shape_confusion"]["circle"] == {"circle": 1, "square": 1, "triangle": 0, "star": 0}
    assert result["shape_confusion"]["star"]["star"] == 1 and sum(result["shape_confusion"]["star"].values()) == 1


def test_caption_words_on_the_quick_run(quick_run, capsys):
    from owl_jax.demo import caption_words

    workdir, _ = quick_run
    assert caption_words.main([f"--params={workdir}/stage1/params", f"--data={workdir}/data"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 captions, ") and "kind confusion" in out, out  # --quick holds 8 held-out captions


def test_towers_made_for_other_held_out_splits_or_tokens_are_refused(tmp_path):
    """Stage 1 must start from towers that left out the questions this config evaluates on, and train
    on data tokenised by the towers' own tokenizer."""
    from owl_jax.cli import UserError
    from owl_jax.demo import config as job_config
    from owl_jax.demo.run import check_held_out, check_same_tokenizer

    config = job_config.get_config()
    made_for = {"seed": config.prepare.seed, "captions_test": config.prepare.sizes.captions_test,
                "instructions_test": config.prepare.sizes.instructions_test}
    check_held_out({"held_out": made_for}, config, "towers.json")
    config.prepare.sizes.instructions_test += 100  # questions the towers may have trained on
    with pytest.raises(UserError, match="instructions_test"):
        check_held_out({"held_out": made_for}, config, "towers.json")

    for name, content in (("data", b"one"), ("towers", b"one"), ("other", b"two")):
        os.makedirs(tmp_path / name / "tokenizer")
        (tmp_path / name / "tokenizer" / "tokenizer.model").write_bytes(content)
    check_same_tokenizer(str(tmp_path / "data"), str(tmp_path / "towers"))
    with pytest.raises(UserError, match="other towers"):
        check_same_tokenizer(str(tmp_path / "data"), str(tmp_path / "other"))
