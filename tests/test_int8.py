"""int8 weights for inference (owl_jax/models/quantization.py, qwix): the LLM's matmul weights stored
int8 with per-channel scales, greedy answers and logits against bf16 on the tiny model, LoRA merged
first, the command lines' --int8, and the 7B decode state on one 16 GB chip (v5e) by eval_shape."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import owl_jax
from owl_jax.inference.engine import make_batch
from owl_jax.inference.sampling import Sampling

from conftest import ANSWERS, QUESTIONS, REPO, random_owl_params, small_owl_config

GiB = 2**30


def nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(nn.unbox(tree)))


@pytest.fixture(scope="module")
def plain_owl_dir(tmp_path_factory):
    """The small owl at its initialisation's scale (weights ~N(0, 0.02), small offsets on every leaf),
    with LoRA adapters on q/v whose B is not zero."""
    from owl_jax.data.conversation import SYSTEM_PROMPT
    from owl_jax.data.tokenizer import train_tokenizer
    from owl_jax.models.config import LoraConfig
    from owl_jax.params_io import save_params

    d = tmp_path_factory.mktemp("plain_owl")
    cfg = small_owl_config(lora=LoraConfig(rank=4, alpha=8.0))
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=384))
    save_params(str(d), random_owl_params(cfg, seed=7, perturb_seed=1), cfg)
    train_tokenizer([SYSTEM_PROMPT] + QUESTIONS + ANSWERS, str(d), vocab_size=384)
    return str(d)


def test_the_llm_weights_are_int8_with_a_scale_per_output_channel(plain_owl_dir):
    owl = owl_jax.load(plain_owl_dir, quantize="int8")
    assert owl.cfg.weight_quantization == "int8" and owl.cfg.lora.rank == 0  # the adapter merged in
    layer = owl.params["language_model"]["model"]["layers_0"]
    q = layer["self_attn"]["q_proj"]["kernel"].array
    assert q.qvalue.dtype == jnp.int8 and q.qvalue.shape == (64, 64) and q.scale.shape == (1, 64)
    down = layer["mlp"]["down_proj"]["kernel"].array
    assert down.qvalue.shape == (128, 64) and down.scale.shape == (1, 64)
    head = owl.params["language_model"]["lm_head"]["kernel"].array  # vocab-major: a scale per token
    assert head.qvalue.shape == (384, 64) and head.scale.shape == (384, 1)
    # the vision tower, the abstractor and the embeddings stay float
    assert owl.params["language_model"]["model"]["embed_tokens"]["embedding"].dtype == jnp.float32
    assert owl.params["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].dtype == jnp.float32


def test_int8_answers_as_bf16_on_most_prompts_and_its_logits_stay_close(plain_owl_dir):
    """32 prompts, 8 greedy tokens each (measured: 30 of 32 the same throughout, every first token the
    same; logits at most 0.04 apart where they spread with a std of 0.43)."""
    bf16 = owl_jax.load(plain_owl_dir, dtype="bfloat16")
    int8 = owl_jax.load(plain_owl_dir, dtype="bfloat16", quantize="int8")
    rng = np.random.default_rng(0)
    words = " ".join(QUESTIONS).replace("?", "").split()
    same_answers, gaps, spreads = 0, [], []
    for _ in range(32):
        ids = bf16.encode(bf16.prompt_text(0, " ".join(rng.choice(words, size=int(rng.integers(3, 9)))) + "?"))
        tokens = [owl.generator.generate(make_batch([ids], None, [0], owl.cfg), Sampling(max_new_tokens=8),
                                         disable_eos=True)["tokens"][0] for owl in (bf16, int8)]
        same_answers += bool((tokens[0] == tokens[1]).all())
        ref, quant = bf16.logits(ids[None]), int8.logits(ids[None])
        gaps.append(np.abs(quant - ref).max())
        spreads.append(ref.std())
    assert same_answers >= 28, same_answers
    assert max(gaps) <= 0.2 * np.mean(spreads), (max(gaps), np.mean(spreads))


def test_the_command_lines_take_int8(plain_owl_dir, capsys):
    from owl_jax import generate as generate_cli

    args = ["--checkpoint", plain_owl_dir, "--prompt", QUESTIONS[0], "--max_new_tokens", "6"]
    assert generate_cli.main(args + ["--int8"]) == 0
    want = owl_jax.load(plain_owl_dir, quantize="int8").chat(messages=QUESTIONS[0], max_new_tokens=6)
    assert capsys.readouterr().out.strip() == f"AI: {want}".strip()
    with pytest.raises(Exception, match="int8 weights run on one device"):
        owl_jax.load(plain_owl_dir, quantize="int8", mesh=object())


def test_training_refuses_int8_weights():
    from owl_jax.cli import UserError
    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer

    from conftest import tiny_train_config

    with pytest.raises(UserError, match="int8 weights are for inference"):
        Trainer(tiny_train_config(**{"model.weight_quantization": "int8"}), make_mesh({"fsdp": 1}, jax.devices()[:1]))


def test_the_7b_decode_state_with_int8_weights_fits_a_16gb_chip():
    """mPLUG-Owl 7B in bf16, the LLM's weights int8: params and the KV cache of one 2048-token
    sequence, counted by eval_shape (nothing allocated), within a v5e chip's 16 GiB with room to
    spare; the same in bf16 leaves the chip almost full."""
    from owl_jax.configs import load_config_file
    from owl_jax.models import quantization
    from owl_jax.models.config import LoraConfig, owl_config_from_dict
    from owl_jax.models.owl import init_params

    recipe = os.path.join(REPO, "configs", "mplug_owl_llama7b.py:stage1")
    cfg = owl_config_from_dict(load_config_file(recipe).model.to_dict())
    cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16", lora=LoraConfig(rank=0))
    int8 = dataclasses.replace(cfg, weight_quantization="int8")
    decoder = quantization.model(int8, decode=True, decode_layout=True)
    one_sequence = jnp.zeros((1, 2048), jnp.int32)
    cache = nbytes(jax.eval_shape(lambda: decoder.init(jax.random.PRNGKey(0), one_sequence)["cache"]))
    int8_params = nbytes(quantization.abstract_params(int8))
    bf16_params = nbytes(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
    assert 0 <= cache - 2 * 32 * 2048 * 4096 * 2 < 1024  # k and v of 32 layers in bf16, and their positions
    assert int8_params + cache < 9 * GiB  # measured 7.12 + 1.00 GiB
    assert bf16_params + cache > 14 * GiB  # 13.27 + 1.00 GiB
