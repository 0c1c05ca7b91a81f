"""mPLUG-Owl with LLaMA-2-7B: same shapes as LLaMA-7B, 4096 context, RMSNorm eps 1e-5, and the same
recipes (configs/mplug_owl_llama7b.py). Grouped KV heads are a field (model.llm.num_kv_heads);
LLaMA-2-7B keeps 32 (no grouping)."""
import importlib.util
import os

import ml_collections

from owl_jax.models.config import LlamaConfig

_spec = importlib.util.spec_from_file_location(
    "_owl7b", os.path.join(os.path.dirname(__file__), "mplug_owl_llama7b.py")
)
_owl7b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_owl7b)


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
    return _owl7b.recipe(stage, LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5))
