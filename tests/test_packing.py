"""Packed rows: several samples in one row, each seeing only itself (attention, RoPE positions, images)."""
import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.batch import BOS_ID, IMAGE_PLACEHOLDER_ID
from owl_jax.losses import answer_loss
from owl_jax.models.llama import segment_positions
from owl_jax.models.owl import MplugOwl
from tests.conftest import SHAPESWORLD_VOCAB, random_owl_params, small_owl_config


def _sample(rng, cfg, length: int, num_images: int):
    """(ids, loss mask, images): BOS, text, `num_images` placeholder runs, an answer (loss) at the end."""
    p = cfg.tokens_per_image
    ids = [BOS_ID] + rng.integers(3, cfg.llm.vocab_size, 3).tolist()
    for _ in range(num_images):
        ids += [IMAGE_PLACEHOLDER_ID] * p + rng.integers(3, cfg.llm.vocab_size, 2).tolist()
    ids += rng.integers(3, cfg.llm.vocab_size, length - len(ids)).tolist()
    loss = [0] * (length - 5) + [1] * 5
    size = cfg.vision.image_size
    images = rng.normal(size=(num_images, size, size, 3)).astype(np.float32)
    return np.asarray(ids, np.int32), np.asarray(loss, np.int32), images


def _rows(rows, seq_len: int, max_images: int, size: int):
    """A batch whose b-th row holds the samples rows[b] in order (attention_mask 1, 2, ...),
    right-padded; the images in row order. Returns (batch, loss_mask int32[B, T])."""
    b = len(rows)
    ids, seg, loss = (np.zeros((b, seq_len), np.int32) for _ in range(3))
    images, counts = [], []
    for r, samples in enumerate(rows):
        pos = 0
        for i, (x, lm, im) in enumerate(samples):
            ids[r, pos:pos + len(x)], seg[r, pos:pos + len(x)], loss[r, pos:pos + len(x)] = x, i + 1, lm
            pos += len(x)
            images += list(im)
        counts.append(sum(len(im) for _, _, im in samples))
    pixels = np.zeros((max_images, size, size, 3), np.float32)
    if images:
        pixels[:len(images)] = np.stack(images)
    counts = np.asarray(counts, np.int32)
    return dict(input_ids=ids, attention_mask=seg, pixel_values=pixels, num_images=counts,
                image_start=(np.cumsum(counts) - counts).astype(np.int32)), loss


@pytest.fixture(scope="module")
def setup():
    cfg = small_owl_config()
    params = random_owl_params(cfg, seed=1, perturb_seed=2)
    rng = np.random.default_rng(0)
    p = cfg.tokens_per_image
    samples = [_sample(rng, cfg, 9 + p, 1), _sample(rng, cfg, 12, 0), _sample(rng, cfg, 14 + 2 * p, 2)]
    return cfg, params, samples


def _packed_and_alone(cfg, params, samples, seq_len=96):
    """Row 0 packs every sample; row 1 + i holds sample i alone. Returns (batch, loss mask, logits,
    [the packed row's logits of sample i], [sample i's logits alone])."""
    batch, loss = _rows([samples] + [[s] for s in samples], seq_len, 8, cfg.vision.image_size)
    logits = MplugOwl(cfg).apply({"params": params}, **batch)
    packed, alone, pos = [], [], 0
    for i, (x, _, _) in enumerate(samples):
        packed.append(np.asarray(logits[0, pos:pos + len(x)]))
        alone.append(np.asarray(logits[1 + i, :len(x)]))
        pos += len(x)
    return batch, loss, logits, packed, alone


@pytest.mark.parametrize("run", [{}, {"causal_query_block": 32}, {"attention_impl": "jax"}])
def test_packed_logits_and_losses_equal_each_sample_alone(setup, run):
    cfg, params, samples = setup
    cfg = dataclasses.replace(cfg, **run)
    batch, loss_mask, logits, packed, alone = _packed_and_alone(cfg, params, samples)
    ids = jnp.asarray(batch["input_ids"])
    for i in range(len(samples)):
        np.testing.assert_allclose(packed[i], alone[i], atol=1e-5, err_msg=f"sample {i}")
        # the sample's answer loss, read from the packed row, is its loss alone
        in_row0 = np.zeros_like(loss_mask)
        in_row0[0] = batch["attention_mask"][0] == i + 1
        alone_row = np.zeros_like(loss_mask)
        alone_row[1 + i] = 1
        got, _ = answer_loss(logits, ids, jnp.asarray(loss_mask * in_row0))
        want, _ = answer_loss(logits, ids, jnp.asarray(loss_mask * alone_row))
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def _per_sample_logits(cfg, params, samples, seq_len=96):
    return _packed_and_alone(cfg, params, samples, seq_len)[3]


def test_changing_one_sample_changes_no_other(setup):
    cfg, params, samples = setup
    before = _per_sample_logits(cfg, params, samples)
    rng = np.random.default_rng(5)
    for changed in range(3):
        x, lm, im = samples[changed]
        x = x.copy()
        x[-3:] = rng.integers(3, cfg.llm.vocab_size, 3)
        im = im + 1.0  # a different image too, where it has one
        edited = list(samples)
        edited[changed] = (x, lm, im)
        after = _per_sample_logits(cfg, params, edited)
        for i in range(3):
            if i == changed:
                assert np.abs(after[i] - before[i]).max() > 1e-3  # the edit is visible where it belongs
            else:
                np.testing.assert_array_equal(after[i], before[i])


def test_positions_restart_at_each_sample():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]])


def test_splash_kernel_keeps_samples_apart():
    """The TPU kernel (Pallas' interpreter here) on a packed row: the einsum path's outputs."""
    from owl_jax.models.attention import attention
    from owl_jax.models.llama import segment_mask

    rng = np.random.default_rng(3)
    b, t, h, dh = 2, 256, 2, 128
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32) for _ in range(3))
    seg = np.zeros((b, t), np.int32)
    seg[0, :100], seg[0, 100:130], seg[0, 130:250] = 1, 2, 3
    seg[1, :256] = 1
    seg = jnp.asarray(seg)
    want = attention(q, k, v, segment_mask(seg), causal=True, segment_ids=seg)
    got = attention(q, k, v, segment_mask(seg), impl="splash", causal=True, segment_ids=seg)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
    # and the einsum path keeps them apart: sample 2's outputs do not move with sample 1's keys
    k2 = k.at[0, :100].add(1.0)
    moved = attention(q, k2, v, segment_mask(seg), causal=True)
    np.testing.assert_array_equal(np.asarray(moved)[0, 100:250], np.asarray(want)[0, 100:250])


# ------------------------------------------------------------------ the pipeline's packer

def _pipeline_cfg(dataset_dir, **kw):
    from owl_jax.data import pipeline

    cfg = pipeline.default_config()
    cfg.update(dataset="shapesworld", split="instructions_train", dataset_dir=dataset_dir, batch_size=4, max_len=192,
               max_images_per_batch=8, image_size=16, image_token_count=5, read_threads=1, read_buffer_size=4,
               return_index=True)
    cfg.update(**kw)
    return cfg


def _by_record(batches, packed: bool) -> dict[int, tuple]:
    """record index -> (ids, loss mask, images) of every sample in the batches."""
    out = {}
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            slot = int(b["image_start"][row])
            index = b["index"][row] if packed else np.full(b["input_ids"].shape[1], b["index"][row])
            index = np.where(b["attention_mask"][row] > 0, index, -1)
            for i in dict.fromkeys(index[index >= 0].tolist()):  # the row's samples, in order
                at = index == i
                seg = set(b["attention_mask"][row][at].tolist())
                assert len(seg) == 1, "a sample is one segment"
                ids = b["input_ids"][row][at]
                k = int((ids == IMAGE_PLACEHOLDER_ID).sum()) // 5
                assert i not in out, "each record once"
                out[i] = (ids, b["loss_mask"][row][at], b["pixel_values"][slot:slot + k])
                slot += k
    return out


def test_packed_epoch_holds_every_sample_as_it_is_unpacked(shapesworld_dir):
    from owl_jax.data import pipeline

    plain_it = pipeline.make_iterator(_pipeline_cfg(shapesworld_dir, num_epochs=1, shuffle=False), 0, 1)
    plain = list(plain_it)
    packed_it = pipeline.make_iterator(_pipeline_cfg(shapesworld_dir, num_epochs=1, shuffle=False, packing=True,
                                                     max_images_per_batch=16), 0, 1)
    packed = list(packed_it)
    want, got = _by_record(plain, False), _by_record(packed, True)
    assert sorted(got) == sorted(want) == list(range(48))
    for i in want:
        for a, b in zip(got[i], want[i]):
            np.testing.assert_array_equal(a, b, err_msg=f"record {i}")
    assert len(packed) <= len(plain) / 2  # samples of ~30-110 tokens, 192 a row: two or more a row
    for b in packed:
        for row in b["attention_mask"]:  # samples numbered 1, 2, ... then padding
            used = int((row > 0).sum())
            assert (row[:used] > 0).all() and not row[used:].any()
            assert np.unique(row[:used]).tolist() == list(range(1, row.max() + 1)) and (np.diff(row[:used]) >= 0).all()
        assert b["num_images"].sum() <= 16
    s, p = plain_it.stats, packed_it.stats
    assert p["samples"] == s["samples"] == 48 and p["tokens"] == s["tokens"]


def test_packed_iterator_resumes_exactly(shapesworld_dir):
    from owl_jax.data import pipeline

    # few image slots: batches close on images as well as on tokens, with a sample waiting
    cfg = _pipeline_cfg(shapesworld_dir, packing=True, max_images_per_batch=4, seed=2, augment=True)
    it = pipeline.make_iterator(cfg, 0, 1)
    states, batches, stats = [], [], []
    for _ in range(8):
        states.append(it.get_state())
        batches.append(next(it))
        stats.append(it.stats)
    assert it.stats["deferred"] > 0
    for k in range(6):
        resumed = pipeline.make_iterator(cfg, 0, 1)
        resumed.set_state(states[k])
        for x, y in zip([next(resumed), next(resumed)], batches[k:k + 2]):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        assert resumed.stats == stats[k + 1]


def test_packing_counts_what_it_cannot_place(shapesworld_dir):
    from owl_jax.data import pipeline, records

    # one image slot: two-image samples can never be placed (counted, not silently lost)
    it = pipeline.make_iterator(_pipeline_cfg(shapesworld_dir, packing=True, max_images_per_batch=1, num_epochs=1,
                                              max_len=400), 0, 1)
    batches = list(it)
    n_two = int((records.num_images_index(shapesworld_dir, "shapesworld", "instructions_train") == 2).sum())
    assert n_two > 0 and it.stats["dropped_too_many_images"] == n_two
    placed = {i for b in batches for i in b["index"].ravel().tolist() if i >= 0}
    assert len(placed) == 48 - n_two
    # samples longer than a row are truncated and counted, as without packing
    it = pipeline.make_iterator(_pipeline_cfg(shapesworld_dir, packing=True, max_len=48, num_epochs=1), 0, 1)
    batches = list(it)
    assert it.stats["truncated"] > 0 and all((b["attention_mask"] > 0).sum(1).max() <= 48 for b in batches)


def test_packed_training_takes_an_epoch_in_fewer_steps_and_logs_real_tokens(shapesworld_dir, tmp_path):
    import json
    import os

    from owl_jax.train import train
    from tests.conftest import tiny_train_config

    def run(name, **overrides):
        config = tiny_train_config(**{
            "data.source": "tfds", "data.dataset": "shapesworld", "data.dataset_dir": shapesworld_dir,
            "data.split": "captions_train", "data.num_epochs": 1, "data.read_threads": 1,
            "model.llm.vocab_size": SHAPESWORLD_VOCAB, "seq_len": 256, "num_steps": 50, "checkpoint.every_steps": 50,
            **overrides})
        train(config, str(tmp_path / name))
        return [json.loads(line) for line in open(os.path.join(tmp_path / name, "metrics.jsonl"))]

    plain = run("plain")  # 16 captions, 8 a batch
    packed = run("packed", **{"data.packing": True, "max_images_per_batch": 16})
    assert len(plain) == 2 and len(packed) == 1  # captions of ~70 tokens (the system prompt's included): 3 a row
    assert all(np.isfinite(r["loss"]) for r in plain + packed)
    fill = lambda rows: sum(r["real_tokens_per_s"] for r in rows) / sum(r["tokens_per_s"] for r in rows)  # noqa: E731
    assert fill(packed) > 1.8 * fill(plain)


def test_packing_benchmark_smoke():
    """bench/packing.py --quick: both stages measured, each ending with its ratio line."""
    import os
    import re
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo}
    out = subprocess.run([sys.executable, os.path.join(repo, "bench", "packing.py"), "--quick"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()[-2:]
    for line, stage in zip(lines, ("stage1", "stage2")):
        # The ratio's value is a timing (two tiny steps, on cores the other tests share): format only.
        assert re.fullmatch(rf"{stage} useful tokens/s packed/padded = \d+\.\d\dx \(samples/s \d+\.\d\dx\)", line), line
        real = {layout: int(n) for layout, n in re.findall(rf"{stage} (padded|packed): .*?, (\d+) of \d+ tokens real",
                                                          out.stdout)}
        assert real["packed"] > 1.5 * real["padded"], (stage, real)  # packed rows carry more real tokens
    # The 7B recipes' packed micro-batches (the AOT script's --fill): mostly full rows.
    fills = re.findall(r"7B recipe (\w+): packed micro-batch of \d+ x \d+ with \d+ image slots: rows ([\d.]+)% full",
                       out.stdout)
    assert [stage for stage, _ in fills] == ["stage1", "stage2_lora"], out.stdout[-2000:]
    assert all(float(f) > 80 for _, f in fills), fills


@functools.cache
def _bench_packing():
    """bench/packing.py as a module (bench/ is not a package; the script puts its folder on sys.path)."""
    import importlib.util
    import os

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    spec = importlib.util.spec_from_file_location("bench_packing", os.path.join(bench, "packing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packing_benchmark_counts_the_flops_of_samples_not_of_padding():
    """Useful FLOPs of a batch are its samples' own: a row packed with two samples counts what the
    two count alone, and padding counts nothing (so the attention is each sample's, not the row's)."""
    from owl_jax.models.config import OwlConfig
    from owl_jax.training.flops import StepShape, train_step_flops

    bench = _bench_packing()
    cfg, towers = OwlConfig(), {"vision", "abstractor"}
    one = lambda n: train_step_flops(cfg, StepShape(1, n, 0), towers)  # noqa: E731
    image = train_step_flops(cfg, StepShape(0, 0, 1), towers)
    packed = {"attention_mask": np.array([[[1] * 100 + [2] * 300 + [0] * 112]]), "num_images": np.array([[2]])}
    padded = {"attention_mask": np.array([[[1] * 100 + [0] * 412]]), "num_images": np.array([[1]])}
    assert bench.useful_flops(cfg, towers, packed) == pytest.approx(one(100) + one(300) + 2 * image)
    assert bench.useful_flops(cfg, towers, padded) == pytest.approx(one(100) + image)
    assert one(100) + one(300) < train_step_flops(cfg, StepShape(1, 400, 0), towers)  # two short squares, not one


def test_packing_benchmark_runs_the_7b_recipes_on_one_gpus_rows():
    """--model 7b: the recipes' model and remat, in bench/gpu_train_step.py's rows of one GPU."""
    bench = _bench_packing()
    args = type("Args", (), {"model": "7b", "rows": 0, "llm_layers": 0, "quick": False})
    for name, (stage, rows, seq_len) in bench.STAGES_7B.items():
        config, got_len = bench.stage_config(args, name)
        assert (config.stage, config.batch_size, got_len) == (stage, rows, seq_len)
        assert (config.model.llm.num_layers, config.model.dtype, config.optim.grad_accum_steps) == (32, "bfloat16", 1)
    args.rows, args.llm_layers = 4, 2
    config, _ = bench.stage_config(args, "stage2")
    assert (config.batch_size, config.model.llm.num_layers) == (4, 2)
