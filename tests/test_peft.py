"""PEFT LoRA adapters (the release's stage-2 output): read onto owl_jax params with the layout PEFT
uses (lora_A [r, in], lora_B [out, r], scale alpha / r), written back bit for bit, with clear errors."""
import dataclasses
import json
import os

import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from owl_jax import params_io
from owl_jax.convert import to_torch
from owl_jax.convert.__main__ import main as convert_main
from owl_jax.convert.peft import load_adapter, save_adapter
from owl_jax.models.config import LoraConfig
from owl_jax.models.owl import MplugOwl
from owl_jax.training.synthetic import RandomBatches

from conftest import random_owl_params, small_owl_config

RANK, ALPHA = 4, 16.0
PREFIX = "base_model.model.language_model.model.layers"


@pytest.fixture(scope="module")
def base():
    cfg = small_owl_config()
    return cfg, random_owl_params(cfg, seed=0, perturb_seed=3)


def _shapes(cfg, module):
    """(block, in, out) of a LLaMA projection, as the release's torch model names and sizes it."""
    d, f = cfg.llm.hidden_size, cfg.llm.mlp_size
    return {"q_proj": ("self_attn", d, d), "k_proj": ("self_attn", d, d), "v_proj": ("self_attn", d, d),
            "o_proj": ("self_attn", d, d), "gate_proj": ("mlp", d, f), "up_proj": ("mlp", d, f),
            "down_proj": ("mlp", f, d)}[module]


def _write_adapter(path, cfg, targets=r".*language_model.*\.(q_proj|v_proj)", modules=("q_proj", "v_proj"),
                   key_suffix="weight", edit=None, seed=0, extra_config=None, scale=1.0):
    """An adapter dir as PEFT writes one, from PEFT's key names and shapes as written out here (not
    from owl_jax.convert.peft; docs/design.md, "PEFT LoRA adapters"); returns {torch key: array}.
    Values are normal with std `scale`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg.llm.num_layers):
        for m in modules:
            block, d_in, d_out = _shapes(cfg, m)
            for factor, shape in (("A", (RANK, d_in)), ("B", (d_out, RANK))):
                tensors[f"{PREFIX}.{i}.{block}.{m}.lora_{factor}.{key_suffix}"] = rng.normal(0, scale, shape).astype(
                    np.float32
                )
    if edit:
        edit(tensors)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.05, "bias": "none",
                   "fan_in_fan_out": False, "target_modules": targets, **(extra_config or {})}, f)
    return tensors


def _logits(cfg, params):
    b = next(RandomBatches(batch_size=2, seq_len=40, max_images=2, images_per_sample=1, vocab_size=cfg.llm.vocab_size,
                           tokens_per_image=cfg.tokens_per_image, image_size=cfg.vision.image_size))
    return np.asarray(MplugOwl(cfg).apply({"params": params}, b["input_ids"], b["pixel_values"], b["num_images"],
                                          b["attention_mask"]))


def merge_as_peft(params, cfg, tensors: dict, modules) -> dict:
    """params with each target's adapter merged into its kernel as PEFT merges: W + alpha / r B A, in
    the torch layout ([out, in])."""
    merged = traverse_util.flatten_dict(params)
    for m in modules:
        block = _shapes(cfg, m)[0]
        path = ("language_model", "model", "layers", block, m, "kernel")
        kernel = merged[path].copy()
        for i in range(cfg.llm.num_layers):
            a, b = (tensors[f"{PREFIX}.{i}.{block}.{m}.lora_{f}.weight"] for f in "AB")
            kernel[i] = (kernel[i].T + ALPHA / RANK * b @ a).T
        merged[path] = kernel
    return traverse_util.unflatten_dict(merged)


@pytest.mark.parametrize("modules, targets", [(("q_proj", "v_proj"), r".*language_model.*\.(q_proj|v_proj)"),
                                              (("up_proj", "down_proj"), ["up_proj", "down_proj"])])  # in != out
def test_adapter_acts_as_peft_merges_it(base, tmp_path, modules, targets):
    """Our LoRA forward from the adapter == the base model with W + (alpha / r) B @ A merged by hand in
    the torch layout ([out, in])."""
    cfg, params = base
    tensors = _write_adapter(tmp_path, cfg, targets=targets, modules=modules)
    with_lora, lora_cfg = load_adapter(params, cfg, str(tmp_path))
    assert lora_cfg.lora == LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.05, target_modules=modules)
    expected = _logits(cfg, merge_as_peft(params, cfg, tensors, modules))
    ours = _logits(lora_cfg, with_lora)
    assert np.abs(expected - _logits(cfg, params)).max() > 1e-2  # the adapter changes the output
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)


def test_save_then_load_is_bit_exact_and_in_peft_layout(base, tmp_path):
    cfg, params = base
    _write_adapter(tmp_path / "in", cfg, targets=["q_proj", "v_proj"], key_suffix="default.weight")  # PEFT < 0.4 keys
    with_lora, lora_cfg = load_adapter(params, cfg, str(tmp_path / "in"))
    save_adapter(with_lora, lora_cfg, str(tmp_path / "out"))
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(written) == sorted(f"{PREFIX}.{i}.self_attn.{m}.lora_{f}.weight" for i in range(2)
                                     for m in ("q_proj", "v_proj") for f in "AB")
    assert written[f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"].shape == (cfg.llm.hidden_size, RANK)
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
        RANK,
        ALPHA,
        r".*language_model.*\.(q_proj|v_proj)",
    )
    again, again_cfg = load_adapter(params, cfg, str(tmp_path / "out"))
    assert again_cfg == lora_cfg
    flat, flat_again = traverse_util.flatten_dict(with_lora), traverse_util.flatten_dict(again)
    assert flat.keys() == flat_again.keys() and all(np.array_equal(flat[k], flat_again[k]) for k in flat)
    # The release's PEFT (0.3) wrote adapter_model.bin
    import torch

    os.makedirs(tmp_path / "bin")
    torch.save({k: torch.from_numpy(v) for k, v in written.items()}, tmp_path / "bin" / "adapter_model.bin")
    os.rename(tmp_path / "out" / "adapter_config.json", tmp_path / "bin" / "adapter_config.json")
    from_bin, _ = load_adapter(params, cfg, str(tmp_path / "bin"))
    flat_bin = traverse_util.flatten_dict(from_bin)
    assert all(np.array_equal(flat[k], flat_bin[k]) for k in flat)


@pytest.mark.parametrize("dtype, fmt", [("bfloat16", "bin"), ("float16", "safetensors")])
def test_half_precision_adapter_reads_as_torch_casts_it(base, tmp_path, dtype, fmt):
    """An adapter saved in half precision, as .bin (the release's PEFT) or safetensors: load_adapter
    keeps its dtype or casts to the one asked for, each value the torch tensor's cast by torch, in our
    layout (lora_a = lora_A.T, lora_b = lora_B.T)."""
    import ml_dtypes
    import torch
    from safetensors.torch import save_file as torch_save_file

    cfg, params = base
    tensors = _write_adapter(tmp_path / "f32", cfg)
    half = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in tensors.items()}
    os.makedirs(tmp_path / "half")
    os.rename(tmp_path / "f32" / "adapter_config.json", tmp_path / "half" / "adapter_config.json")
    if fmt == "bin":
        torch.save(half, tmp_path / "half" / "adapter_model.bin")
    else:
        torch_save_file(half, str(tmp_path / "half" / "adapter_model.safetensors"), metadata={"format": "pt"})
    for requested in (dtype, "float32"):
        loaded, _ = load_adapter(params, cfg, str(tmp_path / "half"), dtype=None if requested == dtype else requested)
        flat = traverse_util.flatten_dict(loaded)
        for key, value in half.items():
            i, block, module, factor = key[len(PREFIX) + 1:].split(".")[:4]
            ours = flat[("language_model", "model", "layers", block, module, "lora_" + factor[-1].lower())][int(i)]
            assert ours.dtype == np.dtype(getattr(ml_dtypes, requested, requested)), (requested, key)
            np.testing.assert_array_equal(
                np.asarray(ours, np.float32), value.to(getattr(torch, requested)).float().numpy().T, err_msg=key
            )


@pytest.mark.parametrize("kind, match", [
    ("rank", r"lora_A.weight' has shape \(3, 64\), expected \(4, 64\)"),
    ("extra", r"1 adapter tensors map to no owl_jax parameter: \['base_model.model.lm_head.lora_A.weight'\]"),
    ("missing", r"missing tensor '.*layers.1.self_attn.v_proj.lora_B.weight'"),
    ("some_layers", r"selects \['q_proj'\] in some layers only"),
    ("no_target", r"selects none of the LLM's projections"),
    ("rslora", r"use_rslora=True; owl_jax's LoRA is PEFT's plain one"),
])
def test_bad_adapters_are_named(base, tmp_path, kind, match):
    cfg, params = base
    a0 = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    kw = {
        "rank": {"edit": lambda t: t.__setitem__(a0, np.zeros((3, 64), np.float32))},
        "extra": {
            "edit": lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", np.zeros((4, 64), np.float32))
        },
        "missing": {"edit": lambda t: t.pop(f"{PREFIX}.1.self_attn.v_proj.lora_B.weight")},
        "some_layers": {"targets": r".*layers\.0\.self_attn\.q_proj"},
        "no_target": {"targets": ["query_key_value"]},
        "rslora": {"extra_config": {"use_rslora": True}},
    }[kind]
    _write_adapter(tmp_path, cfg, **kw)
    with pytest.raises((ValueError, KeyError), match=match):
        load_adapter(params, cfg, str(tmp_path))


def test_adapter_needs_base_weights(base, tmp_path):
    cfg, params = base
    _write_adapter(tmp_path, cfg)
    with_lora, lora_cfg = load_adapter(params, cfg, str(tmp_path))
    with pytest.raises(ValueError, match="already carry LoRA"):
        load_adapter(with_lora, lora_cfg, str(tmp_path))
    with pytest.raises(ValueError, match="carry no LoRA"):
        save_adapter(params, cfg, str(tmp_path / "none"))


def test_command_line_adapter_in_and_out(base, tmp_path, capsys):
    cfg, params = base
    to_torch(params, cfg, str(tmp_path / "released"))
    tensors = _write_adapter(tmp_path / "adapter", cfg)
    assert convert_main(["from-torch", "--released", str(tmp_path / "released"), "--adapter", str(tmp_path / "adapter"),
                         "--out", str(tmp_path / "owl")]) == 0
    loaded, loaded_cfg = params_io.load_params(str(tmp_path / "owl"))
    assert loaded_cfg == dataclasses.replace(cfg, lora=LoraConfig(RANK, ALPHA, 0.05, ("q_proj", "v_proj")))
    assert convert_main(["to-torch", "--src", str(tmp_path / "owl"), "--out", str(tmp_path / "back"), "--adapter"]) == 0
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert back.keys() == tensors.keys() and all(np.array_equal(back[k], tensors[k]) for k in tensors)
    assert "wrote the LoRA adapter (r=4, q_proj, v_proj)" in capsys.readouterr().out
