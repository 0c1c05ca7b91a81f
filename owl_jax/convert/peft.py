"""PEFT LoRA adapters: what the release's stage 2 saves (`adapter_model.safetensors` or
`.bin`, and `adapter_config.json`), put onto owl_jax params, and written back from them.

PEFT keys `base_model.model.language_model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A,B}.weight`
(older PEFT writes `lora_A.default.weight`; both are read) with lora_A float[r, in] and lora_B
float[out, r]; owl_jax holds each target's `lora_a` float[L, in, r] and `lora_b` float[L, r, out]
beside the layer's kernel, scaled by alpha / r as in PEFT.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from owl_jax.convert.hf_config import load_json
from owl_jax.convert.torch_io import TorchCheckpointReader
from owl_jax.models.config import LoraConfig, OwlConfig

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_FILE = "adapter_config.json"
# The LLaMA projections that can carry LoRA, and the block that holds each.
MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LAYERS = ("language_model", "model", "layers")
# What the release's train.py gives PEFT (its stage-2 recipe): a regex over module names.
RELEASE_TARGETS = r".*language_model.*\.({})"


def _torch_key(layer: int, module: str, factor: str) -> str:
    return f"base_model.model.language_model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}.lora_{factor}.weight"


def _targets(spec: Any, num_layers: int, where: str) -> tuple[str, ...]:
    """PEFT's target_modules (a regex matched against whole module names, or names matched against
    their ends) -> the LLaMA projections it selects in every layer."""
    names = {
        m: [f"language_model.model.layers.{i}.{MODULE_PARENT[m]}.{m}" for i in range(num_layers)] for m in MODULE_PARENT
    }
    if isinstance(spec, str):
        hit = {m: [bool(re.fullmatch(spec, n)) for n in ns] for m, ns in names.items()}
    else:
        hit = {m: [any(n == t or n.endswith("." + t) for t in spec) for n in ns] for m, ns in names.items()}
    partial = [m for m, h in hit.items() if any(h) and not all(h)]
    if partial:
        raise ValueError(f"{where}: target_modules={spec!r} selects {partial} in some layers only; owl_jax puts LoRA "
                         "on a projection in every layer")
    targets = tuple(m for m in MODULE_PARENT if all(hit[m]))
    if not targets:
        raise ValueError(
            f"{where}: target_modules={spec!r} selects none of the LLM's projections {tuple(MODULE_PARENT)}"
        )
    return targets


def read_lora_config(directory: str, num_layers: int) -> LoraConfig:
    """The adapter's `LoraConfig` from its adapter_config.json."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory (a PEFT LoRA adapter dir was expected)")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (a PEFT LoRA adapter dir holds it)")
    c = load_json(path)
    for field, expected in (("peft_type", "LORA"), ("bias", "none"), ("fan_in_fan_out", False)):
        if c.get(field, expected) != expected:
            raise ValueError(f"{path}: {field}={c[field]!r}; owl_jax reads adapters with {field}={expected!r}")
    for field in ("use_rslora", "use_dora", "alpha_pattern", "rank_pattern"):  # other maths than W + alpha/r B A
        if c.get(field):
            raise ValueError(f"{path}: {field}={c[field]!r}; owl_jax's LoRA is PEFT's plain one")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in c:
            raise ValueError(f"{path}: no {field!r}")
    try:
        rank, alpha, dropout = int(c["r"]), float(c["lora_alpha"]), float(c.get("lora_dropout", 0.0))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: r, lora_alpha and lora_dropout must be numbers ({e})") from e
    if rank < 1:
        raise ValueError(f"{path}: r={rank}; a LoRA rank is at least 1")
    return LoraConfig(
        rank=rank, alpha=alpha, dropout=dropout, target_modules=_targets(c["target_modules"], num_layers, path)
    )


def load_adapter(params: Mapping, cfg: OwlConfig, directory: str, dtype: str | None = None) -> tuple[dict, OwlConfig]:
    """Base params (no LoRA) + a PEFT adapter dir -> (params with the adapter's lora_a / lora_b, cfg
    with its LoraConfig). Every tensor of the adapter must map; `dtype` None keeps the file's."""
    if cfg.lora.rank:
        raise ValueError(f"the params already carry LoRA (rank {cfg.lora.rank}): load an adapter onto base weights")
    lora = read_lora_config(directory, cfg.llm.num_layers)
    reader = TorchCheckpointReader(directory, weight_files=ADAPTER_FILES)
    flat = traverse_util.flatten_dict(nn.unbox(params))
    used = set()
    for module in lora.target_modules:
        block = LAYERS + (MODULE_PARENT[module], module)
        layers, d_in, d_out = np.shape(flat[block + ("kernel",)])
        factors = {}
        for factor, torch_shape in (("A", (lora.rank, d_in)), ("B", (d_out, lora.rank))):
            per_layer = []
            for i in range(layers):
                key = _torch_key(i, module, factor)
                if key not in reader:  # PEFT < 0.4 names the adapter in the key
                    key = key[: -len(".weight")] + ".default.weight"
                if key not in reader:
                    raise KeyError(f"{reader.directory}: missing tensor {_torch_key(i, module, factor)!r}")
                value = reader.get_float(key)
                if tuple(value.shape) != torch_shape:
                    raise ValueError(f"{reader.directory}: tensor {key!r} has shape {tuple(value.shape)}, expected "
                                     f"{torch_shape} (r={lora.rank} from {CONFIG_FILE})")
                per_layer.append(value.T)
                used.add(key)
            stacked = np.stack(per_layer)  # adapters are small: no streaming needed
            factors[factor] = stacked.astype(np.dtype(dtype)) if dtype else stacked
        flat[block + ("lora_a",)], flat[block + ("lora_b",)] = factors["A"], factors["B"]
    unused = sorted(set(reader.keys()) - used)
    if unused:
        raise ValueError(f"{reader.directory}: {len(unused)} adapter tensors map to no owl_jax parameter: {unused[:5]}")
    return traverse_util.unflatten_dict(flat), dataclasses.replace(cfg, lora=lora)


def save_adapter(params: Mapping, cfg: OwlConfig, out_dir: str, dtype: str | None = None) -> str:
    """Writes the params' LoRA as a PEFT adapter dir (adapter_model.safetensors + adapter_config.json,
    targets as the release's regex), loadable with `PeftModel.from_pretrained(released_model, out_dir)`."""
    if not cfg.lora.rank:
        raise ValueError("the params carry no LoRA adapter (cfg.lora.rank is 0)")
    flat = traverse_util.flatten_dict(nn.unbox(params))
    tensors = {}
    for module in cfg.lora.target_modules:
        block = LAYERS + (MODULE_PARENT[module], module)
        for leaf, factor in (("lora_a", "A"), ("lora_b", "B")):
            stacked = np.asarray(flat[block + (leaf,)])
            for i, value in enumerate(stacked):
                tensors[_torch_key(i, module, factor)] = np.ascontiguousarray(
                    value.T.astype(np.dtype(dtype) if dtype else value.dtype)
                )
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_FILES[0]), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
              "target_modules": RELEASE_TARGETS.format("|".join(cfg.lora.target_modules)),
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return os.path.join(out_dir, ADAPTER_FILES[0])
