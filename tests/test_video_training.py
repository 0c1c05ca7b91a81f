"""The video model in training: clips from a prepared dataset into the batches' clip slots (one sample
a row and packed, bad fits counted), and the trainer's step learning from them."""
import json

import jax
import numpy as np
import pytest
from test_data_video import write_video

from owl_jax.batch import BOS_ID, EOS_ID, VIDEO_PLACEHOLDER_ID, step_shapes
from owl_jax.data.video import frame_indices

from conftest import tiny_train_config

VIDEO_MODEL = {"model.vision.temporal": True, "model.abstractor.temporal_queries": True,
               "model.abstractor.ffn_size": 256}


@pytest.fixture(scope="module")
def video_dataset(tmp_path_factory):
    """owl_jsonl rows: a clip (12 frames of grey levels 0, 20, ...), an image and a clip, text only,
    two clips; 4 frames stored per clip. Returns (data dir, tokenizer, each record's clips' levels)."""
    from PIL import Image

    from owl_jax.data import prepare, records
    from owl_jax.data.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("video_data")
    root = tmp / "media"
    root.mkdir()
    levels = {name: write_video(root / f"{name}.mkv", n, container="matroska") for name, n in (("a", 12), ("b", 5))}
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "i.png")
    turn = "\nHuman: what moves?\nAI: the grey"
    rows = [{"video": ["a.mkv"], "text": "sys\nHuman: <|video|>" + turn},
            {"image": ["i.png"], "video": ["b.mkv"], "text": "sys\nHuman: <image>\nHuman: <|video|>" + turn},
            {"text": "sys\nHuman: hello\nAI: hi"},
            {"video": ["b.mkv", "a.mkv"], "text": "sys\nHuman: <|video|>\nHuman: <|video|>" + turn}]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepare.main([f"--jsonl={tmp / 'train.jsonl'}", f"--images={root}", f"--out={tmp / 'out'}",
                         "--video_frame_size=16"]) == 0
    tok = train_tokenizer([r["text"] for r in rows] * 20, str(tmp / "tok"), vocab_size=320)
    by_line = {1: [levels["a"]], 2: [levels["b"]], 3: [], 4: [levels["b"], levels["a"]]}
    src = records.data_source(str(tmp / "out"), "owl_jsonl", "train")
    clip_levels = [by_line[int(records.as_str(src[i]["source"]).rsplit(":", 1)[1])] for i in range(len(src))]
    return str(tmp / "out"), tok, clip_levels


def _iterator(video_dataset, **overrides):
    from owl_jax.data.pipeline import default_config, make_iterator

    out, tok, _ = video_dataset
    cfg = default_config()
    cfg.update(dataset="owl_jsonl", dataset_dir=out, tokenizer_path=tok, batch_size=4, max_len=64,
               max_images_per_batch=2, max_videos_per_batch=4, frames_per_video=4, image_size=16,
               image_token_count=5, shuffle=False, num_epochs=1, return_index=True, read_threads=1)
    cfg.update(overrides)
    return make_iterator(cfg, 0, 1, video_tags=True)


def _grey(clip_pixels: np.ndarray) -> np.ndarray:
    """CLIP-normalised grey frames [f, S, S, 3] -> their grey levels (0..255)."""
    from owl_jax.data.image import CLIP_MEAN, CLIP_STD

    return ((clip_pixels * CLIP_STD + CLIP_MEAN) * 255).mean(axis=(1, 2, 3))


@pytest.mark.parametrize("packing", [False, True])
def test_clips_fill_their_slots_in_sample_order(video_dataset, packing):
    _, _, clip_levels = video_dataset
    it = _iterator(video_dataset, packing=packing)
    batch = next(it)
    assert batch["video_pixels"].shape == (4, 4, 16, 16, 3) and batch["video_num_frames"].tolist() == [4] * 4
    # the clips in the rows' sample order, each its release-sampled frames
    order = [i for i in dict.fromkeys(batch["index"].ravel().tolist()) if i >= 0]
    assert len(order) == 4
    want = [levels for i in order for levels in clip_levels[i]]
    for slot, levels in enumerate(want):
        np.testing.assert_allclose(_grey(batch["video_pixels"][slot]), [levels[i] for i in frame_indices(len(levels))],
                                   atol=8)
    placeholders = (batch["input_ids"] == VIDEO_PLACEHOLDER_ID).sum(axis=1)
    np.testing.assert_array_equal(placeholders, 5 * batch["num_videos"])
    np.testing.assert_array_equal(batch["video_start"], np.cumsum(batch["num_videos"]) - batch["num_videos"])
    assert batch["num_videos"].sum() == 4
    if packing:  # rows of several samples, their clips in row order
        assert batch["attention_mask"].max(axis=1).tolist() == [2, 2, 1, 1]  # then two filler rows
    assert all(it.stats[k] == 0 for k in ("dropped_too_many_videos", "dropped_long_clips", "videos_truncated"))


def test_clips_that_do_not_fit_are_counted(video_dataset):
    """One clip slot: the two-clip row is dropped (counted), another waits for a free slot (deferred).
    Two frames a slot: the stored 4-frame clips are no subset of what the release samples, so their
    rows are skipped (counted), and the text-only row goes on."""
    it = _iterator(video_dataset, max_videos_per_batch=1)
    batches = list(it)
    assert it.stats["dropped_too_many_videos"] == 1 and it.stats["deferred"] == 1 and it.stats["samples"] == 3
    assert sum(int(b["num_videos"].sum()) for b in batches) == 2
    it = _iterator(video_dataset, frames_per_video=2)
    batches = list(it)
    assert it.stats["dropped_long_clips"] == 3 and it.stats["samples"] == 1
    assert sum(int(b["num_videos"].sum()) for b in batches) == 0


def test_tags_without_their_media_are_skipped():
    """A <|video|> tag whose record has no clip (a dataset built before videos) would read another
    sample's clip: the sample is skipped with its reason; the image model reads the tag as text."""
    import dataclasses

    from owl_jax.data.batching import SKIP, STAT_NAMES
    from owl_jax.data.image import encode_png
    from owl_jax.data.pipeline import SampleOptions, encode_sample

    from conftest import CharTokenizer

    text = "sys\nHuman: <|video|>\nHuman: what moves?\nAI: it"
    opts = SampleOptions(max_len=64, image_size=16, image_token_count=5, video_tags=True, frames_per_video=4)
    assert encode_sample(text, [], CharTokenizer(), opts)[SKIP] == "dropped_missing_media"
    assert encode_sample(text.replace("<|video|>", "<image>"), [], CharTokenizer(), opts)[SKIP] == (
        "dropped_missing_media")
    # a clip whose placeholders the length limit cuts goes with them, counted
    two = "sys\nHuman: <|video|>\nHuman: <|video|>\nHuman: q\nAI: it"
    frame = encode_png(np.zeros((4, 4, 3), np.uint8))
    cut = encode_sample(two, [], CharTokenizer(), dataclasses.replace(opts, max_len=24), clips=[[frame], [frame]])
    assert cut["num_videos"] == 1 and cut["_stats"][STAT_NAMES.index("videos_truncated")] == 1
    image_model = SampleOptions(max_len=64, image_size=16, image_token_count=5)
    sample = encode_sample(text, [], CharTokenizer(), image_model)
    assert SKIP not in sample and sample["num_videos"] == 0 and (sample["input_ids"] < 0).sum() == 0


def test_a_batcher_that_fits_nothing_stops_with_the_reason(monkeypatch):
    """Data repeated forever, every sample over the batch's image slots: an error, not an endless read."""
    import grain

    from owl_jax.cli import UserError
    from owl_jax.data import batching

    monkeypatch.setattr(batching, "MAX_SKIPPED_IN_A_ROW", 50)
    sample = {"input_ids": np.ones(8, np.int32), "attention_mask": np.ones(8, np.int32),
              "loss_mask": np.ones(8, np.int32), "images": np.zeros((3, 4, 4, 3), np.float32), "num_images": 3}
    parent = grain.MapDataset.source([sample]).repeat().to_iter_dataset()
    with pytest.raises(UserError, match=r"50 samples in a row were skipped \({'dropped_too_many_images': 50}\)"):
        next(iter(batching.BatchDataset(parent, 2, 2, 8, 4)))


def test_clip_slots_need_the_video_model(video_dataset):
    from owl_jax.cli import UserError
    from owl_jax.data.pipeline import default_config, make_iterator

    out, tok, _ = video_dataset
    cfg = default_config()
    cfg.update(dataset="owl_jsonl", dataset_dir=out, tokenizer_path=tok, max_videos_per_batch=2)
    with pytest.raises(UserError, match="max_videos_per_batch=2: clips need the video model"):
        make_iterator(cfg, 0, 1)


# ------------------------------------------------------------------------------ the trainer's step

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def moving_square_batch(config, blank: bool = False) -> dict[str, np.ndarray]:
    """8 samples: BOS, a clip's placeholders, the question token, the direction's token, EOS. Each clip
    is 4 frames of a bright square that starts at the centre (the first frames all alike) and moves
    one way, 3 pixels a frame; two clips a direction. `blank`: every frame zeros."""
    b, t, s = config.batch_size, config.seq_len, config.model.vision.image_size
    p = config.model.abstractor.num_queries + 1
    ids, loss = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    attention = np.zeros((b, t), np.int32)
    clips = np.zeros((b, 4, s, s, 3), np.float32)
    for i in range(b):
        name = list(DIRECTIONS)[i % 4]
        row = [BOS_ID] + [VIDEO_PLACEHOLDER_ID] * p + [10, 20 + list(DIRECTIONS).index(name), EOS_ID]
        ids[i, : len(row)], attention[i, : len(row)] = row, 1
        loss[i, len(row) - 2: len(row)] = 1
        dy, dx = DIRECTIONS[name]
        for f in range(4):
            y, x = s // 2 - 4 + 3 * f * dy + (i // 4), s // 2 - 4 + 3 * f * dx
            clips[i, f, max(y, 0): y + 8, max(x, 0): x + 8] = 1.5
    if blank:
        clips[:] = 0
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss,
            "pixel_values": np.zeros((config.max_images_per_batch, s, s, 3), np.float32),
            "num_images": np.zeros((b,), np.int32), "image_start": np.zeros((b,), np.int32),
            "video_pixels": clips, "video_num_frames": np.full((b,), 4, np.int32),
            "num_videos": np.ones((b,), np.int32), "video_start": np.arange(b, dtype=np.int32)}


def test_the_video_owl_fits_moving_clips_and_not_blank_frames():
    """Every weight trained (the tiny LLM is random, not a pretrained one to steer) on one fixed batch
    whose answers only the clips tell apart: the loss falls near zero with the frames, and stays at
    the answers' entropy (ln 4 on half the tokens) without them."""
    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

    config = tiny_train_config("all", **VIDEO_MODEL, **{
        "max_videos_per_batch": 8, "frames_per_video": 4, "seq_len": 16, "num_steps": 300, "optim.lr": 3e-3,
        "optim.weight_decay": 0.0})
    trainer = Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    assert any("temporal" in path for path in trainer.trainable_paths)
    step = trainer.jit_train_step(step_shapes(config, config.model.vision.image_size))
    losses = {}
    for blank in (False, True):
        state = trainer.init_state(jax.random.PRNGKey(0))
        batch = global_batch(stack_micro_batches([moving_square_batch(config, blank)]), step.batch_shardings)
        for _ in range(config.num_steps):
            state, metrics = step(state, batch)
        losses[blank] = float(metrics["loss"])
    assert losses[False] < 0.05, losses
    assert losses[True] > 0.6, losses  # ln(4) / 2 = 0.69: the direction is a guess, EOS is not


def test_training_the_video_model_starts_from_image_params(tmp_path):
    """config.init.params_dir naming an image model's params (a converted release, a finished run):
    the video model keeps every image tensor and starts its temporal modules and queries fresh."""
    from flax import traverse_util

    from owl_jax.models.config import owl_config_from_dict
    from owl_jax.params_io import load_params_for, save_params

    from conftest import random_owl_params

    video_cfg = owl_config_from_dict(tiny_train_config("stage1", **VIDEO_MODEL).model.to_dict())
    image_cfg = owl_config_from_dict(tiny_train_config("stage1", **{"model.abstractor.ffn_size": 256}).model.to_dict())
    image_params = random_owl_params(image_cfg, seed=1)
    save_params(str(tmp_path), image_params, image_cfg)
    params, fresh = load_params_for(str(tmp_path), video_cfg)
    assert len(fresh) == 11 and all("temporal" in p for p in fresh), fresh  # 8 stacked + queries + fc kernel, bias
    flat, image_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(image_params)
    assert all(np.array_equal(flat[p], v) for p, v in image_flat.items())


@pytest.mark.parametrize("stage", ["stage1", "stage2_lora"])
def test_analytic_flops_count_the_clips(stage):
    """XLA's count of a video batch's step follows the analytic model with its clips: each frame through
    the vision tower with its temporal modules, both sets of queries over all of a clip's frames; in
    stage 2 the temporal modules train and the rest of the vision tower does not."""
    from owl_jax.sharding import make_mesh
    from owl_jax.training.flops import StepShape, towers_of, train_step_flops
    from owl_jax.training.trainer import Trainer

    config = tiny_train_config(stage, **VIDEO_MODEL, **{"max_videos_per_batch": 8, "frames_per_video": 4,
                                                           "seq_len": 16, "model.scan_unroll": 0})
    config.model.vision.update(hidden_size=128, mlp_size=256)  # matmuls dominate
    config.model.abstractor.update(encoder_hidden_size=128, hidden_size=128)
    trainer = Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    shapes = {k: jax.ShapeDtypeStruct(v, np.float32 if "pixels" in k or k == "pixel_values" else np.int32)
              for k, v in step_shapes(config, config.model.vision.image_size).items()}
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainer.abstract_state)
    xla = trainer.jit_train_step({k: v.shape for k, v in shapes.items()}).jitted.lower(state, shapes).compile()
    towers = towers_of(trainer.trainable_paths)
    with_clips = train_step_flops(trainer.model_cfg, StepShape(8, 16, 8, 8, 4), towers)
    ratio = xla.cost_analysis()["flops"] / with_clips
    assert 0.95 < ratio < 1.15, ratio
    assert ("temporal" in towers) and (("vision" in towers) == (stage == "stage1"))
    assert train_step_flops(trainer.model_cfg, StepShape(8, 16, 8), towers) < 0.4 * with_clips  # the clips: most


def test_train_reads_clips_from_a_prepared_dataset(video_dataset, tmp_path):
    """python -m owl_jax.train's path end to end: the video model's stage 1 over the dataset's rows
    (text only, an image, clips) with the clip slots of the config: a finite loss, and a checkpoint."""
    import os

    from owl_jax.train import train

    out, tok, _ = video_dataset
    config = tiny_train_config("stage1", **VIDEO_MODEL, **{
        "data.source": "tfds", "data.dataset": "owl_jsonl", "data.dataset_dir": out, "data.tokenizer_path": tok,
        "data.read_threads": 1, "model.llm.vocab_size": 384, "seq_len": 64, "batch_size": 8,
        "max_images_per_batch": 2, "max_videos_per_batch": 4, "num_steps": 2})
    metrics = train(config, str(tmp_path / "run"))
    assert np.isfinite(metrics["loss"]) and metrics["loss_tokens"] > 0
    assert "2" in os.listdir(tmp_path / "run" / "checkpoints")
    # The pipeline's counters go into the metrics log: 4 clip slots a batch hold about one pass over
    # the 4 records (4 clips), so samples wait for the next batch (deferred); none is skipped.
    import json

    last = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert last["data_samples"] >= 6 and last["data_deferred"] >= 1 and last["data_dropped_too_many_videos"] == 0
