"""Sharding on 8 fake CPU devices: parameter placement per the rules, and a sharded step that equals
the single-device step."""
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from owl_jax import batch as batch_format
from owl_jax.sharding import make_mesh
from owl_jax.training.synthetic import RandomBatches
from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

from conftest import tiny_train_config

# Tiny config on mesh (data 1, fsdp 4, tensor 2), default rules. Every parameter but the norms
# (replicated) matches exactly one row.
GOLDEN = [
    (r"^vision_model/embeddings/(cls_token|position_embedding)$", P(None, None, "fsdp")),
    (r"^vision_model/embeddings/patch_embed/kernel$", P(None, None, None, "fsdp")),
    (r"^vision_model/encoder/layers/self_attn/query_key_value/kernel$", P(None, "fsdp", "tensor")),
    (r"^vision_model/encoder/layers/self_attn/query_key_value/bias$", P(None, "tensor")),
    (r"^vision_model/encoder/layers/self_attn/dense/kernel$", P(None, "tensor", "fsdp")),
    (r"^vision_model/encoder/layers/(self_attn/dense|mlp/fc2)/bias$", P(None, "fsdp")),
    (r"^vision_model/encoder/layers/mlp/fc1/kernel$", P(None, "fsdp", "tensor")),
    (r"^vision_model/encoder/layers/mlp/fc1/bias$", P(None, "tensor")),
    (r"^vision_model/encoder/layers/mlp/fc2/kernel$", P(None, "tensor", "fsdp")),
    (r"^query_tokens$", P(None, None, "fsdp")),
    (r"^abstractor/encoder/layers/crossattention/attention/(query|key|value)/kernel$", P(None, "fsdp", "tensor")),
    (r"^abstractor/encoder/layers/crossattention/attention/(query|key|value)/bias$", P(None, "tensor")),
    (r"^abstractor/encoder/layers/crossattention/output/out_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"^abstractor/encoder/layers/crossattention/output/(out_proj|mlp/w2)/bias$", P(None, "fsdp")),
    (r"^abstractor/encoder/layers/crossattention/output/mlp/(w1|w3)/kernel$", P(None, "fsdp", "tensor")),
    (r"^abstractor/encoder/layers/crossattention/output/mlp/(w1|w3)/bias$", P(None, "tensor")),
    (r"^abstractor/encoder/layers/crossattention/output/mlp/w2/kernel$", P(None, "tensor", "fsdp")),
    (r"^abstractor/visual_fc/kernel$", P(None, "fsdp")),
    (r"^abstractor/visual_fc/bias$", P("fsdp")),
    (r"^abstractor/vit_eos$", P(None, None, "fsdp")),
    (r"^language_model/model/embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"^language_model/model/layers/self_attn/q_proj/kernel$", P(None, "fsdp", "tensor")),
    (r"^language_model/model/layers/self_attn/(k|v)_proj/kernel$", P(None, "fsdp", "tensor")),
    (r"^language_model/model/layers/self_attn/o_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"^language_model/model/layers/mlp/(gate|up)_proj/kernel$", P(None, "fsdp", "tensor")),
    (r"^language_model/model/layers/mlp/down_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"^language_model/lm_head/kernel$", P("fsdp", "tensor")),
]
NORM = re.compile(r"(layernorm|norm1|normk|norm2|ffn_ln|/norm)/(scale|bias)$")


def _expected_spec(path):
    if NORM.search(path):
        return P(None, None) if "/layers/" in path else P(None)
    matches = [spec for pattern, spec in GOLDEN if re.search(pattern, path)]
    assert len(matches) == 1, (path, matches)
    return matches[0]


def _normalise(spec):
    """P(None, 'x') and P(None, 'x', None)... compare equal after trimming trailing Nones."""
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


def test_every_parameter_is_sharded_as_the_rules_say():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    trainer = Trainer(tiny_train_config("all"), mesh)
    state = trainer.init_state(jax.random.PRNGKey(0))
    params = traverse_util.flatten_dict(trainer.params(state), sep="/")
    assert len(params) == 57
    for path, value in params.items():
        assert _normalise(value.sharding.spec) == _normalise(_expected_spec(path)), path
    # Adam moments live where their parameters live.
    mu = traverse_util.flatten_dict(state["opt_state"][1][0].mu, sep="/")
    assert (
        mu["language_model/model/layers/mlp/down_proj/kernel"].sharding.spec
        == params["language_model/model/layers/mlp/down_proj/kernel"].sharding.spec
    )


def _real_step_config():
    """tiny_train_config("all") whose first step moves the parameters: no warmup (the schedule starts
    at lr 0), no dropout (its masks depend on the partitioning of the RNG)."""
    config = tiny_train_config("all")
    config.optim.warmup_steps = 0
    config.model.abstractor.attention_dropout = 0.0
    return config


def _assert_moved(params, config):
    """The step changed the parameters (so comparing them after it compares the update)."""
    trainer = Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    initial = jax.device_get(trainer.params(trainer.init_state(jax.random.PRNGKey(0))))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(initial)))
    assert moved > 0.5 * config.optim.lr, moved


def _one_step(mesh, config):
    trainer = Trainer(config, mesh)
    state = trainer.init_state(jax.random.PRNGKey(0))
    data = RandomBatches(batch_size=8, seq_len=24, max_images=8, images_per_sample=1, vocab_size=64,
                         tokens_per_image=trainer.model_cfg.tokens_per_image, image_size=28, seed=3)
    local = stack_micro_batches([next(data) for _ in range(config.optim.grad_accum_steps)])
    step = trainer.jit_train_step({k: v.shape for k, v in local.items()})
    state, metrics = step(state, global_batch(local, step.batch_shardings))
    params, metrics = jax.device_get(trainer.params(state)), jax.device_get(metrics)
    # The state comes back as it went in (shardings, dtypes): the next step reuses the compiled program.
    local = stack_micro_batches([next(data) for _ in range(config.optim.grad_accum_steps)])
    step(state, global_batch(local, step.batch_shardings))
    assert step.jitted._cache_size() == 1
    return params, metrics


def test_sharded_step_equals_single_device_step():
    config = _real_step_config()
    single_params, single_metrics = _one_step(make_mesh({"fsdp": 1}, jax.devices()[:1]), config)
    sharded_params, sharded_metrics = _one_step(make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), config)
    _assert_moved(single_params, config)
    np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
    # Adam's first update is about lr * sign(gradient): the gradient's size is compared by its norm
    np.testing.assert_allclose(sharded_metrics["grad_norm"], single_metrics["grad_norm"], rtol=1e-5)
    for (path, a), b in zip(traverse_util.flatten_dict(single_params, sep="/").items(),
                            traverse_util.flatten_dict(sharded_params, sep="/").values()):
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=path)
    # config.lm_head_rows: the head on every token gives the step of the answer-rows head (the
    # default, its rows gathered across the sharded batch above).
    assert config.lm_head_rows == "answers"
    config.lm_head_rows = "all"
    all_rows_params, all_rows_metrics = _one_step(make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), config)
    np.testing.assert_allclose(all_rows_metrics["loss"], sharded_metrics["loss"], rtol=1e-6)
    assert all_rows_metrics["accuracy"] == sharded_metrics["accuracy"]
    for (path, a), b in zip(traverse_util.flatten_dict(all_rows_params, sep="/").items(),
                            traverse_util.flatten_dict(sharded_params, sep="/").values()):
        np.testing.assert_allclose(b, a, atol=1e-6, err_msg=path)
    config.lm_head_rows = "logits"
    with pytest.raises(ValueError, match="lm_head_rows"):
        Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches of 4 == one batch of 8 (the loss is normalised by the global token count)."""
    config = _real_step_config()
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    trainer = Trainer(config, mesh)
    data = RandomBatches(batch_size=8, seq_len=24, max_images=8, images_per_sample=1, vocab_size=64,
                         tokens_per_image=trainer.model_cfg.tokens_per_image, image_size=28, seed=3)
    big = next(data)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    for half in halves:  # one image a sample: each half's images are its own first four slots
        half["image_start"] = batch_format.first_image_slots(half["num_images"])
    results = []
    for micro in ([big], halves):
        state = trainer.init_state(jax.random.PRNGKey(0))
        local = stack_micro_batches(micro)
        step = trainer.jit_train_step({k: v.shape for k, v in local.items()})
        state, metrics = step(state, global_batch(local, step.batch_shardings))
        results.append((jax.device_get(trainer.params(state)), float(metrics["loss"]), float(metrics["grad_norm"])))
    _assert_moved(results[0][0], config)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5)
    np.testing.assert_allclose(results[1][2], results[0][2], rtol=1e-5)  # the gradient's size, not only its sign
    for a, b in zip(jax.tree_util.tree_leaves(results[0][0]), jax.tree_util.tree_leaves(results[1][0])):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_a_checkpoint_restores_onto_another_mesh_and_trains_on(tmp_path, monkeypatch):
    """Saved on mesh fsdp 4 x tensor 2, resumed on fsdp 8 (tensor 2 -> 1): every restored array is
    the saved one, laid out per the new mesh, and training goes on from it."""
    from owl_jax import params_io
    from owl_jax.train import train
    from owl_jax.training import checkpoints

    workdir = str(tmp_path / "run")
    train(tiny_train_config(num_steps=2, **{"mesh.tensor": 2}), workdir)
    saved, _ = params_io.load_params(os.path.join(workdir, "params"))  # the state of step 2, exported

    config = tiny_train_config(num_steps=3, **{"mesh.fsdp": 8})
    trainer = Trainer(config, make_mesh(config.mesh.to_dict()))
    restored = {}
    real = checkpoints.restore_newest_good

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        state = out[1]["state"]  # copied now: the train step donates (deletes) these arrays
        restored.update(step=out[0], shardings=[x.sharding for x in jax.tree_util.tree_leaves(state)],
                        ndims=[x.ndim for x in jax.tree_util.tree_leaves(state)],
                        params=jax.device_get(trainer.params(state)))
        return out

    monkeypatch.setattr(checkpoints, "restore_newest_good", recording)
    train(config, workdir)
    assert restored["step"] == 2
    wanted = jax.tree_util.tree_leaves(trainer.state_shardings)
    assert len(restored["shardings"]) == len(wanted)
    for got, want, ndim in zip(restored["shardings"], wanted, restored["ndims"]):
        assert got.mesh.shape == {"data": 1, "fsdp": 8, "tensor": 1}
        assert got.is_equivalent_to(want, ndim)
    got = traverse_util.flatten_dict(restored["params"], sep="/")
    want = traverse_util.flatten_dict(saved, sep="/")
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
