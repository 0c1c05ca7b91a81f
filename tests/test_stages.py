"""Stage filters: frozen weights stay bit-identical, carry no optimiser state and cost no
weight-gradient FLOPs; LoRA starts as the identity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from owl_jax.models.owl import MplugOwl
from owl_jax.sharding import make_mesh
from owl_jax.training.flops import StepShape, towers_of, train_step_flops
from owl_jax.training.synthetic import RandomBatches
from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

from conftest import tiny_train_config


def _batches(trainer):
    return RandomBatches(batch_size=8, seq_len=24, max_images=8, images_per_sample=1, vocab_size=64,
                         tokens_per_image=trainer.model_cfg.tokens_per_image, image_size=28)


def _run(config, steps=3):
    trainer = Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    state = trainer.init_state(jax.random.PRNGKey(0))
    before = traverse_util.flatten_dict(jax.device_get(trainer.params(state)), sep="/")
    data = _batches(trainer)
    local = stack_micro_batches([next(data)])
    step = trainer.jit_train_step({k: v.shape for k, v in local.items()})
    for _ in range(steps):
        state, _ = step(state, global_batch(stack_micro_batches([next(data)]), step.batch_shardings))
    after = traverse_util.flatten_dict(jax.device_get(trainer.params(state)), sep="/")
    return trainer, state, before, after, step, local


@pytest.mark.parametrize("stage,frozen_dtype", [("stage1", "bfloat16"), ("stage2_lora", "float32")])
def test_frozen_parameters_are_bit_identical_and_have_no_optimiser_state(stage, frozen_dtype):
    config = tiny_train_config(stage, frozen_dtype=frozen_dtype)
    trainer, state, before, after, _, _ = _run(config)
    frozen = jax.tree_util.tree_leaves(state["frozen"])
    assert frozen and all(x.dtype == jnp.dtype(frozen_dtype) for x in frozen)  # frozen weights may be bf16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state["trainable"]))
    trainable = set(trainer.trainable_paths)
    if stage == "stage1":
        assert all(p.startswith(("vision_model", "abstractor", "query_tokens")) for p in trainable)
        assert any(p.startswith("vision_model") for p in trainable)
    else:
        assert all(p.endswith(("lora_a", "lora_b")) or p.startswith(("abstractor", "query_tokens")) for p in trainable)
        assert sum(p.endswith("lora_a") for p in trainable) == 2  # q_proj, v_proj
    for path in before:
        if path in trainable:
            continue
        assert np.array_equal(before[path], after[path]), path
    assert any(not np.array_equal(before[p], after[p]) for p in trainable)
    adam = state["opt_state"][1][0]
    assert set(traverse_util.flatten_dict(adam.mu, sep="/")) == trainable
    assert set(traverse_util.flatten_dict(adam.nu, sep="/")) == trainable


@pytest.mark.parametrize("stage", ["stage1", "stage2_lora", "full_ft"])
def test_bf16_compute_trains_every_stage_with_the_answer_rows_head(stage):
    """model.dtype=bfloat16 (fp32 master weights) with the default LM head on answer rows: every
    stage's step runs, its loss is finite and the trainable weights move."""
    config = tiny_train_config(stage, **{"model.dtype": "bfloat16", "lm_head_rows": "answers"})
    trainer, state, before, after, step, local = _run(config, steps=2)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state["trainable"]))
    _, metrics = step(state, global_batch(local, step.batch_shardings))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    assert any(not np.array_equal(before[p], after[p]) for p in trainer.trainable_paths)


def test_lora_at_step_zero_reproduces_the_base_model_exactly():
    lora_cfg = tiny_train_config("stage2_lora")
    trainer = Trainer(lora_cfg, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    state = trainer.init_state(jax.random.PRNGKey(0))
    params = jax.device_get(trainer.params(state))
    base_params = {k: v for k, v in traverse_util.flatten_dict(params).items() if k[-1] not in ("lora_a", "lora_b")}
    base_cfg = trainer.model_cfg.__class__(**{**trainer.model_cfg.__dict__, "lora": trainer.model_cfg.lora.__class__()})
    data = RandomBatches(batch_size=2, seq_len=24, max_images=2, images_per_sample=1, vocab_size=64,
                         tokens_per_image=trainer.model_cfg.tokens_per_image, image_size=28)
    b = next(data)
    args = (b["input_ids"], b["pixel_values"], b["num_images"], b["attention_mask"])
    with_lora = MplugOwl(trainer.model_cfg).apply({"params": params}, *args)
    base = MplugOwl(base_cfg).apply({"params": traverse_util.unflatten_dict(base_params)}, *args)
    assert np.array_equal(np.asarray(with_lora), np.asarray(base))
    lora_a = traverse_util.flatten_dict(params)[("language_model", "model", "layers", "self_attn", "q_proj", "lora_a")]
    # PEFT's start: lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a=sqrt(5)); lora_B = 0
    bound = lora_a.shape[-2] ** -0.5
    assert 0.8 * bound < np.abs(lora_a).max() <= bound, (np.abs(lora_a).max(), bound)


def test_train_step_runs_dropout_from_the_state_rng():
    """Training steps run with dropout on (deterministic=False: the stage-2 config's abstractor 0.1 and
    LoRA 0.05) and draw its masks from the state's rng: two states that differ only in `rng` take
    different losses and gradients on one batch, the same rng the same ones, and each step moves the rng
    on."""
    config = tiny_train_config("stage2_lora", frozen_dtype="float32")  # the step compiled above: a cache hit
    assert config.model.abstractor.attention_dropout == 0.1 and config.model.lora.dropout == 0.05
    trainer = Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    state = jax.device_get(trainer.init_state(jax.random.PRNGKey(0)))  # host copies: the step donates its input
    local = stack_micro_batches([next(_batches(trainer))])
    step = trainer.jit_train_step({k: v.shape for k, v in local.items()})
    batch = global_batch(local, step.batch_shardings)

    def run(seed):
        rng = np.asarray(jax.random.PRNGKey(seed))
        new, metrics = step(jax.device_put({**state, "rng": rng}, trainer.state_shardings), batch)
        assert not np.array_equal(np.asarray(new["rng"]), rng)  # the next step draws other masks
        return float(metrics["loss"]), float(metrics["grad_norm"])

    first, again, other = run(1), run(1), run(2)
    assert first == again
    # At init lora_b is 0 and the images weigh little in the loss, so the masks show most in the
    # gradient (~1.5% apart in its norm); without dropout both would be bit-identical.
    assert first[0] != other[0] and abs(first[1] - other[1]) > 1e-3 * first[1], (first, other)


def test_analytic_flops_follow_xla_count_in_every_stage():
    """XLA's count of each stage's step follows the analytic model: a frozen LLM costs forward +
    input gradient (4N per token) in stage 1 and 2, a fully fine-tuned one 6N (its embedding table
    trains, so every layer needs its input gradient even with nothing upstream training)."""
    xla, analytic = {}, {}
    for stage in ("stage1", "stage2_lora", "full_ft", "all"):
        config = tiny_train_config(stage)
        config.model.llm.update(hidden_size=128, mlp_size=256, num_layers=2)  # matmuls dominate
        config.model.scan_unroll = 0  # XLA's cost analysis counts a loop body once
        trainer = Trainer(config, make_mesh({"fsdp": 1}, jax.devices()[:1]))  # abstract state: nothing allocated
        shapes = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in stack_micro_batches([next(_batches(trainer))]).items()
        }
        state_shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainer.abstract_state)
        compiled = (
            trainer.jit_train_step({k: v.shape for k, v in shapes.items()}).jitted.lower(state_shapes, shapes).compile()
        )
        xla[stage] = compiled.cost_analysis()["flops"]
        analytic[stage] = train_step_flops(trainer.model_cfg, StepShape(8, 24, 8), towers_of(trainer.trainable_paths))
    for stage in xla:  # XLA also counts the norms, softmaxes and optimiser: a few % above the matmuls
        assert 0.95 < xla[stage] / analytic[stage] < 1.15, (stage, xla, analytic)
        assert abs(xla[stage] / xla["all"] - analytic[stage] / analytic["all"]) < 0.05, (stage, xla, analytic)
