"""Helpers for the ml_collections files under configs/: the model section as plain data."""
from __future__ import annotations

import ml_collections

from owl_jax.models.config import OwlConfig, owl_config_to_dict


def model_section(cfg: OwlConfig = OwlConfig()) -> ml_collections.ConfigDict:
    """`config.model`: every OwlConfig field, overridable from the command line
    (e.g. --config.model.llm.num_layers=2)."""
    return ml_collections.ConfigDict(owl_config_to_dict(cfg))
