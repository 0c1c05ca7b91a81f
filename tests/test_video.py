"""The release's video model: logits against a PyTorch oracle of its mplug_owl_video modules (clips of
different frame counts, mixed with images and text), conversion both ways, and a one-frame clip read
as an image."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from owl_jax.batch import IMAGE_PLACEHOLDER_ID, VIDEO_PLACEHOLDER_ID
from owl_jax.convert import from_torch, released_is_video, to_torch
from owl_jax.convert.hf_config import owl_from_released, video_ffn_width, video_intermediate_size
from owl_jax.models.owl import MplugOwl, Videos

from conftest import random_owl_params, small_owl_config
from torch_oracle import OwlOracle


def video_config(**overrides):
    cfg = small_owl_config(**overrides)
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, temporal=True),
        # the released video model's FFN widths are 2816 or multiples of 256 (hf_config.video_ffn_width)
        abstractor=dataclasses.replace(cfg.abstractor, temporal_queries=True, ffn_size=256),
    )


@pytest.fixture(scope="module")
def video_owl():
    cfg = video_config()
    return cfg, random_owl_params(cfg, seed=0, perturb_seed=5)  # up_proj, temporal queries non-zero


def _batch(cfg, rng):
    """Sample 0 a one-frame clip; sample 1 an image and a 3-frame clip; sample 2 clips of 2 and 4
    frames with an image between. Clip slots of 4 frames, one image slot unused, right padding."""
    p, t = cfg.tokens_per_image, 4 * cfg.tokens_per_image + 12
    ids = rng.integers(3, cfg.llm.vocab_size, size=(3, t))
    ids[:, 0] = 1
    ids[0, 1 : 1 + p] = VIDEO_PLACEHOLDER_ID
    ids[1, 2 : 2 + p] = IMAGE_PLACEHOLDER_ID
    ids[1, 4 + p : 4 + 2 * p] = VIDEO_PLACEHOLDER_ID
    ids[2, 1 : 1 + p] = VIDEO_PLACEHOLDER_ID
    ids[2, 3 + p : 3 + 2 * p] = IMAGE_PLACEHOLDER_ID
    ids[2, 5 + 2 * p : 5 + 3 * p] = VIDEO_PLACEHOLDER_ID
    mask = np.ones((3, t), np.int64)
    mask[0, 20:] = 0
    ids = np.where(mask == 1, ids, 0)
    size = cfg.vision.image_size
    images = rng.normal(size=(3, size, size, 3)).astype(np.float32)  # one unused slot
    frames = np.array([1, 3, 2, 4])
    clips = rng.normal(size=(4, 4, size, size, 3)).astype(np.float32)
    return ids, mask, images, np.array([0, 1, 1]), clips, frames, np.array([1, 1, 2])


def _oracle_logits(oracle, ids, mask, images, num_images, clips, frames, num_videos) -> np.ndarray:
    """The torch oracle's logits of a `_batch` (its used image slots, each clip at its own frame count)."""
    with torch.no_grad():
        return oracle(torch.tensor(ids), torch.tensor(images[:2]), torch.tensor(num_images), torch.tensor(mask),
                      clips=[torch.tensor(c[:f]) for c, f in zip(clips, frames) if f],
                      num_videos=torch.tensor(num_videos)).numpy()


def test_logits_match_the_released_video_modules(video_owl, tmp_path, rng):
    cfg, params = video_owl
    to_torch(params, cfg, str(tmp_path))
    oracle = OwlOracle.from_pretrained(str(tmp_path))
    ids, mask, images, num_images, clips, frames, num_videos = _batch(cfg, rng)
    expected = _oracle_logits(oracle, ids, mask, images, num_images, clips, frames, num_videos)
    videos = Videos(jnp.asarray(clips), jnp.asarray(frames), jnp.asarray(num_videos))
    ours = MplugOwl(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(images), jnp.asarray(num_images),
                               jnp.asarray(mask), videos=videos)
    diff = np.abs(np.asarray(ours) - expected)[mask.astype(bool)]
    assert diff.max() <= 1e-4, diff.max()
    # The clips matter: another frame in the 3-frame clip moves sample 1 (and no other).
    moved = clips.copy()
    moved[1, 1] += 1.0
    videos2 = Videos(jnp.asarray(moved), jnp.asarray(frames), jnp.asarray(num_videos))
    other = MplugOwl(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(images), jnp.asarray(num_images),
                                jnp.asarray(mask), videos=videos2)
    change = np.abs(np.asarray(other) - np.asarray(ours)).max(axis=(1, 2))
    assert change[1] > 1e-3 and change[0] == 0 and change[2] == 0, change
    # Frames past a clip's end are not the clip's: changing them changes nothing.
    moved = clips.copy()
    moved[2, 3] += 1.0  # the 2-frame clip's padding
    moved[0, 1:] += 1.0  # the 1-frame clip's
    videos3 = Videos(jnp.asarray(moved), jnp.asarray(frames), jnp.asarray(num_videos))
    same = MplugOwl(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(images), jnp.asarray(num_images),
                               jnp.asarray(mask), videos=videos3)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(ours))


def test_clips_on_the_fused_attention_path(video_owl, rng):
    """attention_impl "jax" (jax.nn.dot_product_attention, the call cuDNN gets): the abstractor's key
    mask spelt out per query row, the same tokens as the einsums."""
    cfg, params = video_owl
    size = cfg.vision.image_size
    clips = jnp.asarray(rng.normal(size=(2, 3, size, size, 3)).astype(np.float32))
    frames = jnp.array([3, 2])
    einsums = MplugOwl(cfg).apply({"params": params}, clips, frames, method=MplugOwl.encode_videos)
    fused = MplugOwl(dataclasses.replace(cfg, attention_impl="jax")).apply(
        {"params": params}, clips, frames, method=MplugOwl.encode_videos)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(einsums), atol=1e-4)


def test_a_video_model_starts_from_image_weights(video_owl, tmp_path):
    """from_torch of an image checkpoint into the video model: its 19 video tensors initialised fresh
    and reported, everything else loaded."""
    cfg, _ = video_owl
    image_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, temporal=False),
                                    abstractor=dataclasses.replace(cfg.abstractor, temporal_queries=False))
    to_torch(random_owl_params(image_cfg, seed=2), image_cfg, str(tmp_path))
    params, report = from_torch(cfg, released=str(tmp_path))
    assert sorted(report.initialised) == sorted(
        ["temporal_query_tokens", "abstractor/temporal_visual_fc/kernel", "abstractor/temporal_visual_fc/bias"]
        + [f"vision_model/encoder/layers/temporal/{m}/{leaf}" for m, leaf in
           [("ln", "scale"), ("ln", "bias"), ("down_proj", "kernel"), ("down_proj", "bias"), ("conv", "kernel"),
            ("conv", "bias"), ("up_proj", "kernel"), ("up_proj", "bias")]])
    assert not np.any(params["vision_model"]["encoder"]["layers"]["temporal"]["up_proj"]["kernel"])  # zero, fresh


def test_a_one_frame_clip_is_read_as_an_image(video_owl, rng):
    cfg, params = video_owl
    size = cfg.vision.image_size
    frame = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    model = MplugOwl(cfg)
    as_images = model.apply({"params": params}, jnp.asarray(frame), method=MplugOwl.encode_images)
    clips = np.zeros((2, 3, size, size, 3), np.float32)
    clips[:, 0] = frame
    as_clips = model.apply({"params": params}, jnp.asarray(clips), jnp.array([1, 1]), method=MplugOwl.encode_videos)
    np.testing.assert_allclose(np.asarray(as_clips), np.asarray(as_images), atol=1e-5)


def test_video_checkpoint_round_trip_is_bit_exact(video_owl, tmp_path):
    cfg, params = video_owl
    to_torch(params, cfg, str(tmp_path))
    assert released_is_video(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    # The released config.json has no video field: the weights say it, and the FFN width rule applies.
    assert written["visual_abstractor_config"]["intermediate_size"] == 384
    assert owl_from_released(written, video=True) == cfg
    back, report = from_torch(cfg, released=str(tmp_path))
    assert report.initialised == [] and report.unused[str(tmp_path)] == []
    a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(back)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_the_video_tensors_in_the_released_layout(video_owl, tmp_path):
    """8 per vision layer and 3 more, in the release's Conv3d shapes; an image model refuses them."""
    from safetensors.numpy import load_file

    cfg, params = video_owl
    to_torch(params, cfg, str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    video_keys = {k: v.shape for k, v in state.items() if "temporal" in k}
    d = cfg.vision.hidden_size
    assert len(video_keys) == 8 * cfg.vision.num_layers + 3 == 19
    assert video_keys["vision_model.encoder.layers.1.temporal.down_proj.weight"] == (d // 2, d, 1, 1, 1)
    assert video_keys["vision_model.encoder.layers.0.temporal.conv.weight"] == (d // 2, 1, 3, 1, 1)
    assert video_keys["vision_model.encoder.layers.0.temporal.up_proj.weight"] == (d, d // 2, 1, 1, 1)
    assert video_keys["temporal_query_tokens"] == (1, cfg.abstractor.num_queries, cfg.abstractor.hidden_size)
    assert video_keys["abstractor.temporal_visual_fc.weight"] == (cfg.llm.hidden_size, cfg.abstractor.hidden_size)
    image_cfg = dataclasses.replace(small_owl_config(), abstractor=dataclasses.replace(
        small_owl_config().abstractor, ffn_size=256))
    with pytest.raises(ValueError, match="temporal"):
        from_torch(image_cfg, released=str(tmp_path))


def test_video_ffn_width_rule():
    assert [video_ffn_width(i) for i in (4096, 2816, 3072, 1024, 384, 88)] == [2816, 2816, 2048, 768, 256, 256]
    for f in (2816, 256, 768, 2048):
        assert video_ffn_width(video_intermediate_size(f)) == f
    with pytest.raises(ValueError, match="ffn_size=88"):
        video_intermediate_size(88)


def test_video_parameters_are_sharded_by_the_rules():
    """The video model's new parameters on mesh (data 1, fsdp 4, tensor 2) under the default rules:
    kernels over fsdp x tensor like the vision MLP's, the bottleneck on tensor, norms replicated."""
    import jax
    from jax.sharding import PartitionSpec as P

    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer

    from conftest import tiny_train_config

    config = tiny_train_config("all", **{"model.vision.temporal": True, "model.abstractor.temporal_queries": True})
    trainer = Trainer(config, make_mesh({"data": 1, "fsdp": 4, "tensor": 2}))
    params = traverse_util.flatten_dict(trainer.params(trainer.init_state(jax.random.PRNGKey(0))), sep="/")
    layer = "vision_model/encoder/layers/temporal/"
    expected = {
        layer + "ln/scale": P(), layer + "ln/bias": P(),
        layer + "down_proj/kernel": P(None, "fsdp", "tensor"), layer + "down_proj/bias": P(None, "tensor"),
        layer + "conv/kernel": P(None, None, "tensor"), layer + "conv/bias": P(None, "tensor"),
        layer + "up_proj/kernel": P(None, "tensor", "fsdp"), layer + "up_proj/bias": P(None, "fsdp"),
        "temporal_query_tokens": P(None, None, "fsdp"),
        "abstractor/temporal_visual_fc/kernel": P(None, "fsdp"), "abstractor/temporal_visual_fc/bias": P("fsdp"),
    }
    def trim(spec):  # P(None, 'x') and P(None, 'x', None) alike
        parts = list(spec)
        while parts and parts[-1] is None:
            parts.pop()
        return tuple(parts)

    assert sorted(p for p in params if "temporal" in p) == sorted(expected)
    for path, spec in expected.items():
        assert trim(params[path].sharding.spec) == trim(spec), (path, params[path].sharding.spec)


def test_command_line_converts_a_video_checkpoint_as_one(video_owl, tmp_path):
    """from-torch --released on the release's video layout makes the video model (told by its weights)."""
    from owl_jax import params_io
    from owl_jax.convert.__main__ import main as convert_main

    cfg, params = video_owl
    to_torch(params, cfg, str(tmp_path / "released"))
    assert convert_main(["from-torch", "--released", str(tmp_path / "released"), "--out", str(tmp_path / "owl")]) == 0
    loaded, loaded_cfg = params_io.load_params(str(tmp_path / "owl"))
    assert loaded_cfg == cfg and loaded_cfg.video
    assert np.array_equal(loaded["temporal_query_tokens"], params["temporal_query_tokens"])


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RELEASE_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def test_peft_adapter_on_the_video_model_matches_the_released_modules(video_owl, tmp_path, rng):
    """A stage-2 adapter on every LLaMA projection of the video model: load_adapter's LoRA forward on a
    batch with clips == the torch oracle of the release's video modules with W + (alpha / r) B @ A merged
    by hand in PEFT's layout; to_torch's merged export holds the same weights."""
    from safetensors.numpy import load_file
    from test_peft import _write_adapter, merge_as_peft

    from owl_jax.convert.peft import load_adapter

    cfg, params = video_owl
    tensors = _write_adapter(tmp_path / "adapter", cfg, targets=RELEASE_REGEX, modules=ALL_PROJECTIONS, scale=0.1)
    with_lora, lora_cfg = load_adapter(params, cfg, str(tmp_path / "adapter"))
    assert lora_cfg.video and lora_cfg.lora.target_modules == ALL_PROJECTIONS
    merged = merge_as_peft(params, cfg, tensors, ALL_PROJECTIONS)
    to_torch(merged, cfg, str(tmp_path / "merged"))
    oracle = OwlOracle.from_pretrained(str(tmp_path / "merged"))
    ids, mask, images, num_images, clips, frames, num_videos = _batch(cfg, rng)
    expected = _oracle_logits(oracle, ids, mask, images, num_images, clips, frames, num_videos)
    videos = Videos(jnp.asarray(clips), jnp.asarray(frames), jnp.asarray(num_videos))

    def logits(c, p):
        return np.asarray(MplugOwl(c).apply({"params": p}, jnp.asarray(ids), jnp.asarray(images),
                                            jnp.asarray(num_images), jnp.asarray(mask), videos=videos))

    ours, base = logits(lora_cfg, with_lora), logits(cfg, params)
    keep = mask.astype(bool)
    assert np.abs(base - expected)[keep].max() > 1e-2  # the adapter changes the output
    diff = np.abs(ours - expected)[keep]
    assert diff.max() <= 1e-4, diff.max()
    # The released export of the LoRA model (to_torch merges it) holds the hand-merged weights.
    to_torch(with_lora, lora_cfg, str(tmp_path / "export"))
    exported, by_hand = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("export", "merged"))
    assert exported.keys() == by_hand.keys()
    for k in exported:
        np.testing.assert_allclose(exported[k], by_hand[k], atol=1e-6, err_msg=k)


def test_peft_adapter_with_a_video_checkpoint_both_ways(video_owl, tmp_path, capsys):
    """The command line on the release's video layout plus its adapter: from-torch --adapter makes the
    video model with the LoRA on it, to-torch --adapter writes the adapter back bit for bit in PEFT's
    layout (keys, shapes, dtype; config r, alpha and the release's target regex), as save_adapter does."""
    from safetensors.numpy import load_file
    from test_peft import ALPHA, RANK, _write_adapter

    from owl_jax import params_io
    from owl_jax.convert.__main__ import main as convert_main
    from owl_jax.convert.peft import load_adapter, save_adapter
    from owl_jax.models.config import LoraConfig

    cfg, params = video_owl
    to_torch(params, cfg, str(tmp_path / "released"))
    tensors = _write_adapter(tmp_path / "adapter", cfg, targets=RELEASE_REGEX, modules=ALL_PROJECTIONS)
    assert convert_main(["from-torch", "--released", str(tmp_path / "released"), "--adapter", str(tmp_path / "adapter"),
                         "--out", str(tmp_path / "owl")]) == 0
    loaded, loaded_cfg = params_io.load_params(str(tmp_path / "owl"))
    assert loaded_cfg == dataclasses.replace(cfg, lora=LoraConfig(RANK, ALPHA, 0.05, ALL_PROJECTIONS))
    assert np.array_equal(loaded["temporal_query_tokens"], params["temporal_query_tokens"])
    assert convert_main(["to-torch", "--src", str(tmp_path / "owl"), "--out", str(tmp_path / "back"), "--adapter"]) == 0
    assert "wrote the LoRA adapter (r=4, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)" in (
        capsys.readouterr().out)
    with_lora, lora_cfg = load_adapter(params, cfg, str(tmp_path / "adapter"))
    save_adapter(with_lora, lora_cfg, str(tmp_path / "saved"))
    for out in ("back", "saved"):
        back = load_file(str(tmp_path / out / "adapter_model.safetensors"))
        assert back.keys() == tensors.keys()
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), (out, k)
        with open(tmp_path / out / "adapter_config.json") as f:
            config = json.load(f)
        assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == (
            "LORA", RANK, ALPHA, 0.05)
        assert (config["target_modules"], config["bias"], config["fan_in_fan_out"]) == (RELEASE_REGEX, "none", False)
