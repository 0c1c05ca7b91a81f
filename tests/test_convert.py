"""Converter edge cases: clear errors, reported extras, .bin files, the command line."""
import json
import os

import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from owl_jax import params_io
from owl_jax.convert import from_torch, to_torch
from owl_jax.convert.__main__ import main as convert_main

from conftest import random_owl_params, small_owl_config


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    cfg = small_owl_config()
    params = random_owl_params(cfg, seed=0, perturb_seed=5)
    path = tmp_path_factory.mktemp("released")
    to_torch(params, cfg, str(path))
    return cfg, params, path


def _rewrite(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def test_shape_mismatch_names_key_and_shapes(released_dir, tmp_path):
    cfg, _, src = released_dir
    key = "abstractor.encoder.layers.1.crossattention.output.mlp.w1.weight"
    _rewrite(src, tmp_path, lambda t: t.__setitem__(key, np.zeros((7, 64), np.float32)))
    with pytest.raises(ValueError, match=r"w1\.weight.*\(7, 64\).*expected \(88, 64\)"):
        from_torch(cfg, released=str(tmp_path))


def test_missing_key_is_named(released_dir, tmp_path):
    cfg, _, src = released_dir
    _rewrite(src, tmp_path, lambda t: t.pop("language_model.model.norm.weight"))
    with pytest.raises(KeyError, match="language_model.model.norm.weight"):
        from_torch(cfg, released=str(tmp_path))


def test_extra_keys_are_reported_when_allowed(released_dir, tmp_path):
    cfg, _, src = released_dir
    _rewrite(src, tmp_path, lambda t: t.__setitem__("language_model.extra_head.weight", np.ones(3, np.float32)))
    _, report = from_torch(cfg, released=str(tmp_path), allow_unused=True)
    assert report.unused[str(tmp_path)] == ["language_model.extra_head.weight"]
    assert "language_model.extra_head.weight" in str(report)


def test_pytorch_bin_checkpoint_reads_like_safetensors(released_dir, tmp_path):
    cfg, params, src = released_dir
    tensors = {k: torch.from_numpy(v.copy()) for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    back, _ = from_torch(cfg, released=str(tmp_path))
    a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(back)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_clip_model_prefixed_keys_are_accepted(tmp_path):
    """CLIPModel checkpoints (and transformers < 5) prefix the tower with `vision_model.`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=56, patch_size=14))
    tensors = {"vision_model." + k: v.detach().numpy().copy() for k, v in clip.state_dict().items()}
    tensors["text_model.embeddings.token_embedding.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    params, report = from_torch(small_owl_config(), clip=str(tmp_path))
    np.testing.assert_array_equal(
        params["vision_model"]["embeddings"]["cls_token"].reshape(-1),
        tensors["vision_model.embeddings.class_embedding"],
    )
    assert report.unused[str(tmp_path)] == ["text_model.embeddings.token_embedding.weight"]


def test_command_line_round_trip(released_dir, tmp_path, capsys):
    cfg, params, src = released_dir
    assert convert_main(["from-torch", "--released", str(src), "--out", str(tmp_path / "owl")]) == 0
    loaded, loaded_cfg = params_io.load_params(str(tmp_path / "owl"))
    assert loaded_cfg == cfg
    assert (
        convert_main(
            ["to-torch", "--src", str(tmp_path / "owl"), "--out", str(tmp_path / "back"), "--dtype", "bfloat16"]
        )
        == 0
    )
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert str(back["query_tokens"].dtype) == "bfloat16"
    assert "wrote owl_jax params" in capsys.readouterr().out


def test_stage1_start_from_clip_and_llama_command_line(tmp_path, capsys):
    """from-torch --clip --llama: towers converted, abstractor + query tokens fresh and reported,
    tokenizer files copied along."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=56, patch_size=14)).save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, tie_word_embeddings=False)).save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.model").write_bytes(b"sentencepiece")
    assert convert_main(["from-torch", "--clip", str(tmp_path / "clip"), "--llama", str(tmp_path / "llama"),
                         "--out", str(tmp_path / "owl")]) == 0
    out = capsys.readouterr().out
    assert "initialised" in out and "query_tokens" in out and "abstractor/visual_fc/kernel" in out
    assert "language_model" not in out.split("initialised")[1].split("copied")[0]
    params, cfg = params_io.load_params(str(tmp_path / "owl"))
    assert cfg.vision.layer_norm_eps == 1e-5 and cfg.abstractor.ffn_size == 2816 and cfg.llm.hidden_size == 64
    assert params["abstractor"]["visual_fc"]["kernel"].shape == (64, 64)
    assert (tmp_path / "owl" / "tokenizer.model").read_bytes() == b"sentencepiece"
