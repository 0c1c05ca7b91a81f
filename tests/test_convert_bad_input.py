"""The converter's command line treats checkpoints and directories as untrusted input: each bad case
ends in a one-line error naming the file, tensor or field, and no run leaves partial output or
damages an earlier one."""
import dataclasses
import json
import os
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from owl_jax import params_io
from owl_jax.convert import from_torch, to_torch
from owl_jax.convert.__main__ import main as convert_main
from owl_jax.convert.peft import save_adapter
from owl_jax.models.config import LoraConfig, owl_config_to_dict
from owl_jax.models.owl import param_shapes

from conftest import small_owl_config

TOKENIZER = {"tokenizer.model": b"sentencepiece", "tokenizer_config.json": b'{"bos_token": "<s>"}'}


def _params(cfg, seed):
    """Random values of the model's shapes: conversion never runs the model, and this skips the
    seconds of a real initialisation."""
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict(
        {p: rng.normal(0, 0.05, s).astype(np.float32) for p, s in param_shapes(cfg).items()}
    )


@pytest.fixture(scope="module")
def owl(tmp_path_factory):
    """Two owl_jax params dirs of one config with different weights (a, b), a LoRA one, and the
    released-layout export of `a` with tokenizer files."""
    root = tmp_path_factory.mktemp("owl")
    cfg = small_owl_config()
    params = {"a": _params(cfg, 5), "b": _params(cfg, 6)}
    for name, p in params.items():
        params_io.save_params(str(root / name), p, cfg)
    lora_cfg = small_owl_config(lora=LoraConfig(rank=4, alpha=8.0))
    params_io.save_params(str(root / "lora"), _params(lora_cfg, 7), lora_cfg)
    to_torch(params["a"], cfg, str(root / "released"))
    for name, data in TOKENIZER.items():
        (root / "released" / name).write_bytes(data)
    return cfg, params, root


def _run(capsys, *argv):
    """(exit status, stdout, stderr) of the command line."""
    rc = convert_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error(capsys, *argv) -> str:
    """The command's one-line error, checked to be one (exit status 2, no traceback)."""
    rc, _, err = _run(capsys, *argv)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _snapshot(directory):
    """{file name: bytes} of a directory, to show it is left exactly as it was."""
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def _assert_params_equal(actual, expected):
    a, b = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32), err_msg="/".join(k))


def _rewrite(src, dst, edit):
    """A copy of a released-layout dir with its tensors edited."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


# ---------------------------------------------------------------- to-torch replaces its output whole


def test_to_torch_into_an_earlier_export_leaves_nothing_stale(owl, tmp_path, capsys):
    cfg, params, root = owl
    out = tmp_path / "out"
    assert _run(capsys, "to-torch", "--src", root / "a", "--out", out, "--max_shard_gb", 0.0002)[0] == 0
    assert (
        "model.safetensors.index.json" in os.listdir(out) and sum(n.startswith("model-") for n in os.listdir(out)) > 1
    )
    assert _run(capsys, "to-torch", "--src", root / "b", "--out", out)[0] == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not os.path.exists(f"{out}.tmp")
    back, _ = from_torch(cfg, released=str(out))
    _assert_params_equal(back, params["b"])
    with pytest.raises(ValueError, match=r"already holds weights \(model.safetensors\)"):  # the library refuses
        to_torch(params["a"], cfg, str(out))
    # The adapter export replaces the full one the same way.
    assert _run(capsys, "to-torch", "--src", root / "lora", "--out", out, "--adapter")[0] == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_failed_to_torch_leaves_the_earlier_export_whole(owl, tmp_path, capsys, monkeypatch):
    _, _, root = owl
    out = tmp_path / "out"
    assert _run(capsys, "to-torch", "--src", root / "a", "--out", out)[0] == 0
    before = _snapshot(out)

    def fail(src, dst):  # after the weights are written
        assert os.listdir(dst)
        raise OSError(f"{dst}: no space left on device")

    monkeypatch.setattr("owl_jax.convert.__main__._copy_tokenizer", fail)
    assert "no space left" in _error(capsys, "to-torch", "--src", root / "b", "--out", out)
    assert _snapshot(out) == before and not os.path.exists(f"{out}.tmp")


def test_to_torch_refuses_an_out_dir_holding_other_files(owl, tmp_path, capsys):
    _, _, root = owl
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "notes.txt" in _error(capsys, "to-torch", "--src", root / "a", "--out", out)
    assert _snapshot(out) == {"notes.txt": b"mine"}
    src = tmp_path / "src"  # --out naming the params dir itself
    shutil.copytree(root / "a", src)
    err = _error(capsys, "to-torch", "--src", src, "--out", src)
    assert "owl_config.json" in err and "params" in err
    assert sorted(os.listdir(src)) == ["owl_config.json", "params"] and params_io.load_params(str(src))


# ---------------------------------------------------------------- to-torch checks params against the config


@pytest.mark.parametrize(
    "field, value, match",
    [
        (
            "llm.num_layers",
            3,
            r"parameter language_model/model/layers/\S+ has shape \(2, [^)]*\); the config expects \(3, ",
        ),
        ("llm.hidden_size", 32, r"parameter \S+ has shape \([^)]*64[^)]*\); the config expects \([^)]*32"),
    ],
)
def test_to_torch_refuses_a_config_that_disagrees_with_the_params(owl, tmp_path, capsys, field, value, match):
    _, _, root = owl
    src = tmp_path / "src"
    shutil.copytree(root / "a", src)
    config = json.loads((src / "owl_config.json").read_text())
    part, key = field.split(".")
    config[part][key] = value
    (src / "owl_config.json").write_text(json.dumps(config))
    err = _error(capsys, "to-torch", "--src", src, "--out", tmp_path / "out")
    assert f"{src}/owl_config.json disagrees with the params" in err
    assert re.search(match, err), err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.tmp")


# ---------------------------------------------------------------- load_params_for: params a training run starts from


def _params_for_cases(root, tmp_path, cfg):
    """(case, directory, config, what the error must say); every case a copy of `a` or `lora` damaged."""
    def copy(name, src="a"):
        shutil.copytree(root / src, tmp_path / name)
        return tmp_path / name

    no_params = copy("no_params")
    shutil.rmtree(no_params / "params")
    bad_json = copy("bad_json")
    (bad_json / "owl_config.json").write_text("{")
    bad_field = copy("bad_field")
    config = json.loads((bad_field / "owl_config.json").read_text())
    config["llm"]["hidden_sise"] = 64
    (bad_field / "owl_config.json").write_text(json.dumps(config))
    wider = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, mlp_size=96))
    return {
        "no dir": (
            tmp_path / "missing",
            cfg,
            f"{tmp_path}/missing/owl_config.json: no owl_jax model config; expected a directory written by save_params",
        ),
        "no params": (
            no_params,
            cfg,
            f"{no_params}/params: missing; an owl_jax params dir holds owl_config.json and the "
            "orbax checkpoint params/ beside it",
        ),
        "bad json": (
            bad_json,
            cfg,
            f"{bad_json}/owl_config.json: not an owl_jax model config (Expecting property name",
        ),
        "bad field": (
            bad_field,
            cfg,
            f"{bad_field}/owl_config.json: not an owl_jax model config (LlamaConfig: unknown "
            "config fields ['hidden_sise']; expected a subset of ['bos_token_id', ",
        ),
        "shape": (
            root / "a",
            wider,
            f"{root / 'a'}: parameter language_model/model/layers/mlp/down_proj/kernel has shape "
            "(2, 128, 64), the config expects (2, 96, 64)",
        ),
        "extra": (
            root / "lora",
            cfg,
            f"{root / 'lora'}: parameters ['language_model/model/layers/self_attn/q_proj/lora_a', "
            "'language_model/model/layers/self_attn/q_proj/lora_b', ",
        ),
    }


@pytest.mark.parametrize("case", ["no dir", "no params", "bad json", "bad field", "shape", "extra"])
def test_params_for_a_config_name_what_does_not_fit(owl, tmp_path, case):
    """Each way a params dir can fail the config a run starts with names the file, the parameter or the
    field, and what was expected; "extra": the dir's LoRA, which the config has no place for."""
    cfg, _, root = owl
    directory, config, message = _params_for_cases(root, tmp_path, cfg)[case]
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        params_io.load_params_for(str(directory), config)
    assert message in str(e.value), str(e.value)
    if case == "extra":
        assert "do not exist in the configured model" in str(e.value)


def test_params_for_a_config_fill_what_the_dir_lacks(owl):
    """Not an error: parameters the config has and the dir lacks (stage 2's LoRA on stage 1's params) are
    initialised fresh and reported; every other one is the dir's, unchanged."""
    cfg, params, root = owl
    lora_cfg = dataclasses.replace(cfg, lora=LoraConfig(rank=4, alpha=8.0))
    loaded, fresh = params_io.load_params_for(str(root / "a"), lora_cfg, seed=3)
    lora_paths = sorted("/".join(p) for p in param_shapes(lora_cfg) if p[-1] in ("lora_a", "lora_b"))
    assert sorted(fresh) == lora_paths and len(lora_paths) == 4
    flat = traverse_util.flatten_dict(loaded)
    assert {"/".join(p): tuple(v.shape) for p, v in flat.items()} == {
        "/".join(p): s for p, s in param_shapes(lora_cfg).items()
    }
    _assert_params_equal(
        traverse_util.unflatten_dict({p: v for p, v in flat.items() if "/".join(p) not in fresh}), params["a"]
    )
    assert not np.any(
        flat[("language_model", "model", "layers", "self_attn", "q_proj", "lora_b")]
    )  # LoRA starts as the identity


# ---------------------------------------------------------------- tokenizer files travel both ways


def test_tokenizer_files_survive_a_round_trip(owl, tmp_path, capsys):
    cfg, params, root = owl
    assert _run(capsys, "from-torch", "--released", root / "released", "--out", tmp_path / "owl")[0] == 0
    rc, out, _ = _run(capsys, "to-torch", "--src", tmp_path / "owl", "--out", tmp_path / "back")
    assert rc == 0 and "tokenizer.model" in out
    assert _run(capsys, "from-torch", "--released", tmp_path / "back", "--out", tmp_path / "owl2")[0] == 0
    for d in ("owl", "back", "owl2"):
        assert {n: (tmp_path / d / n).read_bytes() for n in TOKENIZER} == TOKENIZER, d
    _assert_params_equal(params_io.load_params(str(tmp_path / "owl2"))[0], params["a"])


# ---------------------------------------------------------------- tensor dtypes


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_or_bool_weight_is_refused(owl, tmp_path, capsys, dtype):
    cfg, _, root = owl
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    _rewrite(root / "released", tmp_path / "bad", lambda t: t.__setitem__(key, t[key].astype(dtype)))
    err = _error(capsys, "from-torch", "--released", tmp_path / "bad", "--out", tmp_path / "owl")
    assert f"tensor '{key}' is {np.dtype(dtype)}; a floating-point weight was expected" in err
    assert not os.path.exists(tmp_path / "owl")


@pytest.mark.parametrize("dtype, fmt", [("float16", "safetensors"), ("bfloat16", "safetensors"), ("float16", "bin"),
                                        ("bfloat16", "bin")])
def test_half_precision_checkpoints_convert(owl, tmp_path, capsys, dtype, fmt):
    """A float16 or bfloat16 checkpoint written by torch, as safetensors or .bin: from_torch keeps its
    dtype or casts to the one asked for, and the command line's --dtype casts the same. Every value
    is the torch tensor's, cast by torch: the export of `a` is a relayout, so that is `a` rounded to
    the half dtype by torch, then cast to the dtype asked for."""
    import torch
    from safetensors.torch import save_file as torch_save_file

    cfg, params, root = owl
    half_dtype = getattr(torch, dtype)
    half = {
        k: torch.from_numpy(v).to(half_dtype)
        for k, v in load_file(str(root / "released" / "model.safetensors")).items()
    }
    os.makedirs(tmp_path / "half")
    if fmt == "bin":
        torch.save(half, tmp_path / "half" / "pytorch_model.bin")
    else:
        torch_save_file(half, str(tmp_path / "half" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(root / "released" / "config.json", tmp_path / "half")

    def torch_cast(to):
        """`a` as torch rounds it to the checkpoint's dtype and then casts it to `to`, as float32."""
        return jax.tree_util.tree_map(
            lambda x: torch.from_numpy(np.asarray(x)).to(half_dtype).to(getattr(torch, to)).float().numpy(), params["a"]
        )

    other = "bfloat16" if dtype == "float16" else "float16"
    kept, _ = from_torch(cfg, released=str(tmp_path / "half"))
    for requested, converted in (("float32", from_torch(cfg, released=str(tmp_path / "half"), dtype="float32")[0]),
                                 (other, from_torch(cfg, released=str(tmp_path / "half"), dtype=other)[0]),
                                 (dtype, kept)):
        for path, value in traverse_util.flatten_dict(converted).items():
            assert value.dtype == np.dtype(getattr(ml_dtypes, requested, requested)), (requested, path)
        _assert_params_equal(converted, torch_cast(requested))
    assert (
        _run(capsys, "from-torch", "--released", tmp_path / "half", "--out", tmp_path / "owl", "--dtype", "float32")[0]
        == 0
    )
    loaded, _ = params_io.load_params(str(tmp_path / "owl"))
    assert {v.dtype for v in jax.tree_util.tree_leaves(loaded)} == {np.dtype(np.float32)}
    _assert_params_equal(loaded, torch_cast("float32"))
    assert (
        np.abs(np.asarray(kept["query_tokens"], np.float32) - params["a"]["query_tokens"]).max() > 0
    )  # really rounded


# ---------------------------------------------------------------- tensors that would be dropped


def _with_foreign_tensors(tensors):
    """Weights of modules owl_jax does not have (another model's adapters and heads) beside the
    image model's, and an ignored buffer."""
    tensors["extra_tokens"] = np.zeros((1, 8, 64), np.float32)
    tensors["extra_fc.weight"] = np.zeros((64, 64), np.float32)
    tensors["extra_fc.bias"] = np.zeros(64, np.float32)
    for i in range(2):
        for p in ("weight", "bias"):
            for m in ("norm", "conv", "proj"):
                tensors[f"vision_model.encoder.layers.{i}.adapter.{m}.{p}"] = np.zeros(64, np.float32)
    tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # ignored buffer


def test_tensors_that_would_be_dropped_fail_unless_allowed(owl, tmp_path, capsys):
    cfg, params, root = owl
    _rewrite(root / "released", tmp_path / "foreign", _with_foreign_tensors)
    err = _error(capsys, "from-torch", "--released", tmp_path / "foreign", "--out", tmp_path / "owl")
    assert "15 tensors match no owl_jax parameter and would be dropped" in err
    assert "extra_fc.bias, extra_fc.weight, extra_tokens, vision_model.encoder.layers.0.adapter" in err
    assert "and 5 more" in err and "--allow_unused_tensors" in err and "inv_freq" not in err
    assert not os.path.exists(tmp_path / "owl")
    rc, out, _ = _run(capsys, "from-torch", "--released", tmp_path / "foreign", "--out", tmp_path / "owl",
                      "--allow_unused_tensors")
    assert rc == 0 and "15 tensors in" in out and "extra_tokens" in out
    _assert_params_equal(params_io.load_params(str(tmp_path / "owl"))[0], params["a"])
    with pytest.raises(ValueError, match="extra_tokens"):
        from_torch(cfg, released=str(tmp_path / "foreign"))


@pytest.fixture(scope="module")
def hf_parts(tmp_path_factory):
    """A transformers CLIPModel dir (text tower included) and a LlamaForCausalLM dir, sized like
    small_owl_config."""
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).save_pretrained(root / "clip")
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, tie_word_embeddings=False)).save_pretrained(root / "llama")
    return root


def test_clip_text_tower_may_be_left_but_nothing_else(hf_parts, tmp_path):
    cfg = small_owl_config()
    _, report = from_torch(cfg, clip=str(hf_parts / "clip"), llama=str(hf_parts / "llama"))
    unused = report.unused[str(hf_parts / "clip")]
    assert "logit_scale" in unused and "text_projection.weight" in unused and "visual_projection.weight" in unused
    assert any(k.startswith("text_model.") for k in unused) and report.unused[str(hf_parts / "llama")] == []
    for part, extra in (("clip", "vision_model.encoder.layers.0.temporal.weight"), ("llama", "lm_head.bias")):
        _rewrite(hf_parts / part, tmp_path / part, lambda t: t.__setitem__(extra, np.zeros(4, np.float32)))
    for part, extra in (("clip", "vision_model.encoder.layers.0.temporal.weight"), ("llama", "lm_head.bias")):
        with pytest.raises(ValueError, match=rf"{tmp_path / part}: 1 tensors .* dropped: {extra};"):
            from_torch(cfg, **{part: str(tmp_path / part)})


# ---------------------------------------------------------------- paths relative to the working directory


def test_every_path_argument_may_be_relative(owl, hf_parts, tmp_path, capsys, monkeypatch):
    cfg, params, root = owl
    shutil.copytree(root / "released", tmp_path / "released")
    for part in ("clip", "llama"):
        shutil.copytree(hf_parts / part, tmp_path / part)
    lora_params, lora_cfg = params_io.load_params(str(root / "lora"))
    save_adapter(lora_params, lora_cfg, str(tmp_path / "adapter"))
    (tmp_path / "model.py").write_text(
        "import json, ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict("
        f"{{'model': json.loads({json.dumps(json.dumps(owl_config_to_dict(cfg)))})}})\n"
    )
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(capsys, "from-torch", "--released", "released", "--adapter", "adapter", "--out", "owl")
    assert rc == 0 and f"read {len(load_file('released/model.safetensors'))} tensors from {tmp_path}/released" in out
    assert f"wrote owl_jax params to {tmp_path}/owl" in out
    assert params_io.load_config(str(tmp_path / "owl")).lora.rank == 4
    assert _run(capsys, "to-torch", "--src", "owl", "--out", "back")[0] == 0
    assert _run(capsys, "to-torch", "--src", "owl", "--out", "adapter_back", "--adapter")[0] == 0
    assert sorted(os.listdir(tmp_path / "adapter_back")) == ["adapter_config.json", "adapter_model.safetensors"]
    rc, out, _ = _run(capsys, "from-torch", "--clip", "clip", "--llama", "llama", "--config", "model.py", "--out",
                      "stage1")
    assert rc == 0 and f"from {tmp_path}/clip" in out and f"from {tmp_path}/llama" in out
    assert params_io.load_config(str(tmp_path / "stage1")) == cfg
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["adapter", "adapter_back", "back", "clip", "llama", "model.py", "owl", "released", "stage1"]
    )


# ---------------------------------------------------------------- missing or unreadable inputs


def _bad_inputs(root, tmp_path):
    """(case, argv, what the error must name); every case writes to tmp_path/out."""
    no_config = tmp_path / "no_config"
    shutil.copytree(root / "released", no_config)
    os.remove(no_config / "config.json")
    bad_config = tmp_path / "bad_config"
    shutil.copytree(root / "released", bad_config)
    (bad_config / "config.json").write_text("{not json")
    dir_config = tmp_path / "dir_config"  # config.json that cannot be read as a file
    shutil.copytree(root / "released", dir_config)
    os.remove(dir_config / "config.json")
    os.mkdir(dir_config / "config.json")
    bad_weights = tmp_path / "bad_weights"
    shutil.copytree(root / "released", bad_weights)
    (bad_weights / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    bad_adapter = tmp_path / "bad_adapter"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text("[1, 2]")
    bad_owl = tmp_path / "bad_owl"
    shutil.copytree(root / "a", bad_owl)
    (bad_owl / "owl_config.json").write_text("{")
    released, missing = root / "released", tmp_path / "missing"
    return {
        "released dir": (["from-torch", "--released", missing], f"{missing}: no such directory"),
        "config.json missing": (["from-torch", "--released", no_config], f"{no_config}/config.json: missing"),
        "config.json corrupt": (
            ["from-torch", "--released", bad_config],
            f"{bad_config}/config.json: cannot read it as JSON",
        ),
        "config.json a dir": (
            ["from-torch", "--released", dir_config],
            f"{dir_config}/config.json: cannot read it as JSON",
        ),
        "weights corrupt": (
            ["from-torch", "--released", bad_weights],
            f"{bad_weights}/model.safetensors: cannot read the weights",
        ),
        "adapter dir": (["from-torch", "--released", released, "--adapter", missing], f"{missing}: no such directory"),
        "adapter config": (
            ["from-torch", "--released", released, "--adapter", bad_adapter],
            f"{bad_adapter}/adapter_config.json: holds a JSON list",
        ),
        "clip dir": (["from-torch", "--clip", missing, "--llama", released], f"{missing}: no such directory"),
        "config file": (
            ["from-torch", "--released", released, "--config", tmp_path / "missing.py"],
            f"--config {tmp_path}/missing.py: no such file",
        ),
        "src dir": (["to-torch", "--src", missing], f"--src {missing}: no such directory"),
        "owl_config.json corrupt": (["to-torch", "--src", bad_owl], f"{bad_owl}: cannot read owl_jax params"),
    }


CASES = ["released dir", "config.json missing", "config.json corrupt", "config.json a dir", "weights corrupt",
         "adapter dir", "adapter config", "clip dir", "config file", "src dir", "owl_config.json corrupt"]


@pytest.mark.parametrize("case", CASES)
def test_missing_or_unreadable_input_is_named(owl, tmp_path, capsys, case):
    _, _, root = owl
    argv, names = _bad_inputs(root, tmp_path)[case]
    assert names in _error(capsys, *argv, "--out", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.tmp")


def test_a_params_dir_saved_before_the_retired_fields_still_loads(tmp_path):
    """owl_config.json files written by earlier versions hold llm.attention_init, mimetic_noise,
    mimetic_identity (fresh-weight choices that no longer exist) and could hold scan_unroll > 1."""
    from owl_jax.models.config import owl_config_to_dict

    cfg = small_owl_config()
    old = owl_config_to_dict(cfg)
    old["llm"].update(attention_init="normal", mimetic_noise=0.4, mimetic_identity=0.3)
    old["scan_unroll"] = 2
    (tmp_path / "owl_config.json").write_text(json.dumps(old))
    assert params_io.load_config(str(tmp_path)) == cfg
    old["llm"]["attention_init"] = "mimetic"
    (tmp_path / "owl_config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="attention_init='mimetic': no longer offered"):
        params_io.load_config(str(tmp_path))
