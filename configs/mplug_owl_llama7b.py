"""mPLUG-Owl with LLaMA-7B: the released shapes (DESIGN 1; 7,123,068,928 parameters).

ViT-L/14 24 x 1024 (LN eps 1e-6), abstractor 6 x 1024 with FFN 2816 and 64 queries, LLaMA-7B.
"""
import ml_collections

from owl_jax.configs import model_section
from owl_jax.models.config import OwlConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_section(OwlConfig(dtype="bfloat16", remat_policy="dots_no_batch"))
    return config
