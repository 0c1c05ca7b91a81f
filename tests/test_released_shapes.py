"""The 7B config has exactly the released parameter count and key set (docs/design.md, "The released
PyTorch layout")."""
import importlib.util
import itertools
import re

import numpy as np
import pytest

from owl_jax.convert import param_shapes
from owl_jax.convert.layouts import released_layout
from owl_jax.models.config import owl_config_from_dict

# The released checkpoint's keys, written out by hand (not derived from owl_jax.convert.layouts):
# {i} is a layer index, {a,b} alternatives.
RELEASED_KEYS = """
query_tokens
vision_model.embeddings.cls_token
vision_model.embeddings.position_embedding
vision_model.embeddings.patch_embed.weight
vision_model.embeddings.pre_layernorm.{weight,bias}
vision_model.encoder.layers.{i}.input_layernorm.{weight,bias}
vision_model.encoder.layers.{i}.self_attn.query_key_value.{weight,bias}
vision_model.encoder.layers.{i}.self_attn.dense.{weight,bias}
vision_model.encoder.layers.{i}.post_attention_layernorm.{weight,bias}
vision_model.encoder.layers.{i}.mlp.{fc1,fc2}.{weight,bias}
vision_model.post_layernorm.{weight,bias}
abstractor.encoder.layers.{i}.crossattention.{norm1,normk}.{weight,bias}
abstractor.encoder.layers.{i}.crossattention.attention.{query,key,value}.{weight,bias}
abstractor.encoder.layers.{i}.crossattention.output.out_proj.{weight,bias}
abstractor.encoder.layers.{i}.crossattention.output.norm2.{weight,bias}
abstractor.encoder.layers.{i}.crossattention.output.mlp.{w1,w2,w3,ffn_ln}.{weight,bias}
abstractor.visual_fc.{weight,bias}
abstractor.vit_eos
language_model.model.embed_tokens.weight
language_model.model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
language_model.model.layers.{i}.mlp.{gate,up,down}_proj.weight
language_model.model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight
language_model.model.norm.weight
language_model.lm_head.weight
"""


def _expand(pattern: str, layers: dict[str, int]) -> set[str]:
    tower = pattern.split(".")[0]
    parts = re.split(r"(\{[^}]*\})", pattern)
    options = []
    for part in parts:
        if part == "{i}":
            options.append([str(i) for i in range(layers[tower])])
        elif part.startswith("{"):
            options.append(part[1:-1].split(","))
        else:
            options.append([part])
    return {"".join(c) for c in itertools.product(*options)}


def _config(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return owl_config_from_dict(module.get_config().model.to_dict())


@pytest.mark.parametrize("config_file", ["configs/mplug_owl_llama7b.py", "configs/mplug_owl_llama2_7b.py"])
def test_7b_parameter_count_and_key_set(config_file):
    cfg = _config(config_file)
    shapes = param_shapes(cfg)  # jax.eval_shape: nothing is allocated
    count = lambda tower: sum(int(np.prod(s)) for p, s in shapes.items() if p[0] == tower)
    assert count("vision_model") == 303_179_776
    assert count("query_tokens") == 65_536
    assert count("abstractor") == 81_408_000
    assert count("language_model") == 6_738_415_616
    assert sum(int(np.prod(s)) for s in shapes.values()) == 7_123_068_928

    layers = {"vision_model": 24, "abstractor": 6, "language_model": 32}
    expected = set().union(*(_expand(line, layers) for line in RELEASED_KEYS.split()))
    ours = {m.key for m in released_layout(shapes)}
    assert ours == expected
    torch_shapes = {m.key: m.sources[0][1] for m in released_layout(shapes)}
    assert torch_shapes["vision_model.encoder.layers.0.self_attn.query_key_value.weight"] == (3072, 1024)
    assert torch_shapes["vision_model.embeddings.patch_embed.weight"] == (1024, 3, 14, 14)
    assert torch_shapes["abstractor.encoder.layers.5.crossattention.output.mlp.w1.weight"] == (2816, 1024)
    assert torch_shapes["abstractor.vit_eos"] == (1, 1, 4096)
