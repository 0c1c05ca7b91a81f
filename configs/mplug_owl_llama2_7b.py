"""mPLUG-Owl with LLaMA-2-7B: same shapes as LLaMA-7B, 4096 context, RMSNorm eps 1e-5.

Grouped KV heads are a field (model.llm.num_kv_heads); LLaMA-2-7B keeps 32 (no grouping).
"""
import ml_collections

from owl_jax.configs import model_section
from owl_jax.models.config import LlamaConfig, OwlConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    llm = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5)
    config.model = model_section(OwlConfig(llm=llm, dtype="bfloat16", remat_policy="dots_no_batch"))
    return config
