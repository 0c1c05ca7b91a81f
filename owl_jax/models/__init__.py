"""Flax modules of mPLUG-Owl."""
from owl_jax.models.abstractor import VisualAbstractor
from owl_jax.models.config import (
    AbstractorConfig,
    LlamaConfig,
    LoraConfig,
    OwlConfig,
    RunOptions,
    VisionConfig,
    owl_config_from_dict,
    owl_config_to_dict,
)
from owl_jax.models.llama import LlamaForCausalLM
from owl_jax.models.owl import MplugOwl, splice_images
from owl_jax.models.vision import VisionEncoder

__all__ = ["AbstractorConfig", "LlamaConfig", "LlamaForCausalLM", "LoraConfig", "MplugOwl", "OwlConfig", "RunOptions",
           "VisionConfig", "VisionEncoder", "VisualAbstractor", "owl_config_from_dict", "owl_config_to_dict",
           "splice_images"]
