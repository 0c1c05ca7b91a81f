"""owl_jax parameter directories: `DIR/owl_config.json` (the model config) + `DIR/params` (orbax).

This is what `python -m owl_jax.convert from-torch` writes and what training, generation and
`to-torch` read.
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from owl_jax.cli import UserError
from owl_jax.models.config import OwlConfig, owl_config_from_dict, owl_config_to_dict

CONFIG_FILE = "owl_config.json"
PARAMS_DIR = "params"


def _path(directory) -> epath.Path:
    """Local paths made absolute (orbax needs that); gs:// and other remote URIs kept as they are."""
    directory = str(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def save_params(directory: str, params: Any, cfg: OwlConfig) -> None:
    """Writes params (a pytree of arrays, boxed or not) and the config. With several processes every
    process calls it (orbax synchronises them; the primary process writes host arrays)."""
    directory = _path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, nn.unbox(params), force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (directory / CONFIG_FILE).write_text(json.dumps(owl_config_to_dict(cfg), indent=2))


def load_config(directory: str) -> OwlConfig:
    path = _path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no owl_jax model config; expected a directory written by save_params / convert from-torch"
        )
    try:
        return owl_config_from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:  # bad JSON or fields: the bare errors do not name the file
        raise UserError(f"{path}: not an owl_jax model config ({e})") from e


def load_params(directory: str) -> tuple[Any, OwlConfig]:
    """Returns (params as numpy arrays on the host, config)."""
    cfg = load_config(directory)
    params_dir = _path(directory) / PARAMS_DIR
    if not params_dir.exists():
        raise FileNotFoundError(f"{params_dir}: missing; an owl_jax params dir holds {CONFIG_FILE} and the orbax "
                                f"checkpoint {PARAMS_DIR}/ beside it, as save_params / convert from-torch write them")
    params = ocp.StandardCheckpointer().restore(params_dir)
    return jax.tree_util.tree_map(np.asarray, params), cfg


def load_params_for(directory: str, cfg: OwlConfig, seed: int = 0) -> tuple[Any, list[str]]:
    """Params from `directory` fitted to `cfg`: every tensor must match cfg's shapes; parameters cfg has
    and the directory lacks (e.g. LoRA adapters when stage 2 starts from stage 1) are initialised
    fresh. Returns (params, paths initialised fresh)."""
    from flax import traverse_util

    from owl_jax.models.owl import init_missing, param_shapes

    loaded, _ = load_params(directory)
    flat = traverse_util.flatten_dict(loaded)
    shapes = param_shapes(cfg)
    extra = sorted("/".join(p) for p in flat if p not in shapes)
    if extra:
        raise UserError(
            f"{directory}: parameters {extra[:5]}{'...' if len(extra) > 5 else ''} do not exist in the configured model"
        )
    for path, shape in shapes.items():
        if path in flat and tuple(flat[path].shape) != shape:
            raise UserError(
                f"{directory}: parameter {'/'.join(path)} has shape {tuple(flat[path].shape)}, "
                f"the config expects {shape}"
            )
    missing = [p for p in shapes if p not in flat]
    if missing:
        flat.update(init_missing(cfg, missing, jax.random.PRNGKey(seed)))
    return traverse_util.unflatten_dict(flat), ["/".join(p) for p in missing]
