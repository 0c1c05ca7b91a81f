"""The training state and step, built once from a config and a mesh; shared by train.py and aot.py.

State (a dict pytree, every leaf a sharded jax.Array):
  step       int32[]
  trainable  the stage's trainable parameters            (differentiated, optimised)
  frozen     every other parameter, in config.frozen_dtype (never differentiated, no optimiser state)
  opt_state  optax state of `trainable` only
  rng        uint32[2]

A step consumes `config.optim.grad_accum_steps` micro-batches stacked on a leading axis and applies
one update. The loss is normalised by the global count of answer tokens over all micro-batches.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from owl_jax import batch as batch_format
from owl_jax import sharding as shd
from owl_jax.cli import UserError
from owl_jax.losses import answer_loss, answer_loss_from_hidden
from owl_jax.models.config import OwlConfig, owl_config_from_dict
from owl_jax.models.owl import MplugOwl, Videos, init_params
from owl_jax.training import stages
from owl_jax.training.optim import make_optimizer, make_schedule


@dataclasses.dataclass
class Trainer:
    config: ml_collections.ConfigDict
    mesh: Mesh

    def __post_init__(self):
        c = self.config
        self.model_cfg: OwlConfig = owl_config_from_dict(c.model.to_dict())  # as saved with checkpoints
        if self.model_cfg.weight_quantization != "none":
            raise UserError(f"config.model.weight_quantization={self.model_cfg.weight_quantization!r}: int8 weights "
                            "are for inference (owl_jax.load(..., quantize='int8')); training takes 'none'")
        # The mesh's platform, not this host's: an AOT compile for a TPU slice runs on a CPU host.
        self.model = MplugOwl(self.model_cfg, run=self.model_cfg.run_options(self.mesh.devices.flat[0].platform))
        self.rules = shd.rules_from_config(c.logical_axis_rules)
        self.patterns = stages.trainable_patterns(c.stage, c.train_abstractor, c.extra_trainable)
        self.tx = make_optimizer(c.optim, c.num_steps)
        self.schedule = make_schedule(c.optim, c.num_steps)
        self.frozen_dtype = jnp.dtype(c.frozen_dtype)
        self.lm_head_rows = c.lm_head_rows
        if self.lm_head_rows not in ("answers", "all"):
            raise UserError(f"config.lm_head_rows={self.lm_head_rows!r}: expected 'answers' or 'all'")
        boxed = jax.eval_shape(lambda: init_params(self.model_cfg, jax.random.PRNGKey(0)))
        self.param_shardings = shd.logical_shardings(boxed, self.mesh, self.rules)
        self.abstract_state = jax.eval_shape(self._state_from_params, nn.unbox(boxed), jax.random.PRNGKey(0))
        self.state_shardings = self._shardings_of_state(boxed)
        self.trainable_paths = sorted(traverse_util.flatten_dict(self.abstract_state["trainable"], sep="/"))

    # ----------------------------------------------------------------------------------- state
    def _split(self, params):
        trainable, frozen = stages.split_params(params, self.patterns)
        frozen = jax.tree_util.tree_map(lambda x: x.astype(self.frozen_dtype), frozen)
        return trainable, frozen

    def _state_from_params(self, params, rng):
        trainable, frozen = self._split(params)
        return {
            "step": jnp.zeros((), jnp.int32),
            "trainable": trainable,
            "frozen": frozen,
            "opt_state": self.tx.init(trainable),
            "rng": rng,
        }

    def _shardings_of_state(self, boxed_params):
        """Parameters as the rules say; optimiser moments like their parameters; scalars replicated."""
        boxed_state = jax.eval_shape(
            lambda p: {**self._state_from_params(p, jax.random.PRNGKey(0)), "rng": jnp.zeros((2,), jnp.uint32)},
            boxed_params,
        )
        shardings = shd.logical_shardings(boxed_state, self.mesh, self.rules)
        return jax.tree_util.tree_map(
            lambda s, a: s if a.ndim else shd.replicated(self.mesh), shardings, self.abstract_state
        )

    def init_state(self, rng: jax.Array, params: Any | None = None) -> dict:
        """Sharded initial state: params from `params` (host arrays, e.g. a converted checkpoint)
        or freshly initialised under jit straight into their shardings."""
        init_rng, state_rng = jax.random.split(rng)
        if params is None:
            # One program from random init to state. As two, the fp32 params (7B: ~27 GB) sit on the
            # device while the state is allocated beside them, and once they are freed the state
            # splits the free memory in two. That is the likely reason why, on one H100, the
            # stage-1 and stage-2 steps' 48-53 GiB temporary block found no room after a two-program
            # init but did after this one.
            return jax.jit(
                lambda r, s: self._state_from_params(nn.unbox(init_params(self.model_cfg, r)), s),
                out_shardings=self.state_shardings,
            )(init_rng, state_rng)
        params = jax.tree_util.tree_map(put_global, params, nn.unbox(self.param_shardings))
        return jax.jit(self._state_from_params, out_shardings=self.state_shardings, donate_argnums=0)(params, state_rng)

    def params(self, state: dict) -> dict:
        return stages.merge_params(state["trainable"], state["frozen"])

    # ------------------------------------------------------------------------------------ step
    def _micro_loss(self, trainable, frozen, batch, rng):
        params = stages.merge_params(trainable, frozen)
        head_on_answers = self.lm_head_rows == "answers"
        # "answers": hidden states, not logits; the LM head then runs on the answer tokens only (the
        # rest carry no loss). "all": logits of every token, as the released code computes them.
        out = self.model.apply(
            {"params": params},
            batch["input_ids"],
            batch["pixel_values"],
            batch["num_images"],
            batch["attention_mask"],
            deterministic=False,
            image_start=batch["image_start"],
            videos=videos_of(batch),
            rngs={"dropout": rng},
            method=MplugOwl.hidden_states if head_on_answers else MplugOwl.__call__,
        )
        if head_on_answers:
            kernel = params["language_model"]["lm_head"]["kernel"]  # float[D, V]
            loss, metrics = answer_loss_from_hidden(out, kernel, batch["input_ids"], batch["loss_mask"])
        else:
            loss, metrics = answer_loss(out, batch["input_ids"], batch["loss_mask"])
        return loss * metrics["loss_tokens"], metrics  # a sum over answer tokens: exact across micro-batches

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """batch: owl_jax/batch.py's arrays with a leading micro-batch axis [K, ...]."""
        rng, step_rng = jax.random.split(state["rng"])
        micro_rngs = jax.random.split(step_rng, batch["input_ids"].shape[0])
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def accumulate(carry, xs):
            micro_batch, micro_rng = xs
            (ce_sum, metrics), grads = grad_fn(state["trainable"], state["frozen"], micro_batch, micro_rng)
            acc_grads, acc_stats = carry
            acc_grads = jax.tree_util.tree_map(jnp.add, acc_grads, grads)
            acc_stats = jax.tree_util.tree_map(jnp.add, acc_stats, {"ce_sum": ce_sum, **metrics})
            return (acc_grads, acc_stats), None

        num_micro = batch["input_ids"].shape[0]
        if num_micro == 1:  # no fp32 accumulators to zero and add into (full FT 7B: ~30 GB of traffic a step)
            (ce_sum, metrics), grads = grad_fn(state["trainable"], state["frozen"],
                                               jax.tree_util.tree_map(lambda x: x[0], batch), micro_rngs[0])
            grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
            stats = {"ce_sum": ce_sum, **{k: v.astype(jnp.float32) for k, v in metrics.items()}}
        else:
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state["trainable"])
            stats0 = {
                k: jnp.zeros((), jnp.float32)
                for k in ("ce_sum", "loss_tokens", "correct_tokens", "samples_without_loss")
            }
            unroll = num_micro if self.model_cfg.scan_unroll == 0 else 1
            (grads, stats), _ = jax.lax.scan(accumulate, (zeros, stats0), (batch, micro_rngs), unroll=unroll)
        denom = jnp.maximum(stats["loss_tokens"], 1.0)
        grads = jax.tree_util.tree_map(lambda g, p: (g / denom).astype(p.dtype), grads, state["trainable"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {
            "loss": stats["ce_sum"] / denom,
            "accuracy": stats["correct_tokens"] / denom,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": self.schedule(state["step"]),
            "loss_tokens": stats["loss_tokens"],
            "samples_without_loss": stats["samples_without_loss"],
            "real_tokens": jnp.sum(batch["attention_mask"] > 0).astype(jnp.float32),  # not padding
        }
        new_state = {
            "step": state["step"] + 1,
            "trainable": trainable,
            "frozen": state["frozen"],
            "opt_state": opt_state,
            "rng": rng,
        }
        return new_state, metrics

    def batch_shardings(self, batch_shapes: dict[str, tuple[int, ...]]) -> dict[str, NamedSharding]:
        """Micro-batch axis unsharded, batch axis over the rules' `batch` mesh axes. Images (clips) are
        sharded the same way when their count divides, else replicated (one process only). A batch that
        does not divide is refused: replicated, every device would compute all of it."""
        n = shd.batch_axis_size(self.mesh, self.rules)
        out = {}
        for k, shape in batch_shapes.items():
            if shape[1] % n == 0:
                out[k] = shd.batch_sharding(self.mesh, self.rules, len(shape), leading_unsharded=1)
            elif k not in batch_format.SLOT_KEYS or jax.process_count() > 1:
                # Replicated images with several processes: each would have to hold them all.
                field = ("batch_size" if k not in batch_format.SLOT_KEYS else
                         "max_images_per_batch" if k == "pixel_values" else "max_videos_per_batch")
                raise UserError(f"config.{field}={shape[1]} must be a multiple of the {n} devices along the "
                                f"batch mesh axes ({dict(self.rules).get('batch')} of mesh {dict(self.mesh.shape)}), "
                                f"on {jax.process_count()} process(es)")
            else:
                out[k] = shd.replicated(self.mesh)
        return out

    def jit_train_step(self, batch_shapes: dict[str, tuple[int, ...]]) -> Callable:
        batch_sh = self.batch_shardings(batch_shapes)
        step = jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, batch_sh),
            out_shardings=(self.state_shardings, shd.replicated(self.mesh)),
            donate_argnums=0,
        )

        def run(state, batch):
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                return step(state, batch)

        run.jitted = step
        run.batch_shardings = batch_sh
        return run


def put_global(host_array, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array every process holds in full (e.g. loaded params)."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def videos_of(batch: dict) -> Videos | None:
    """A batch's clips (owl_jax/batch.py's video keys) as the model takes them; None without them."""
    if "video_pixels" not in batch:
        return None
    return Videos(batch["video_pixels"], batch["video_num_frames"], batch["num_videos"], batch["video_start"])


def stack_micro_batches(batches: list[dict]) -> dict[str, np.ndarray]:
    """Micro-batches (owl_jax/batch.py) -> one step's [K, ...] arrays."""
    keys = batch_format.KEYS + (batch_format.VIDEO_KEYS if "video_pixels" in batches[0] else ())
    return {k: np.stack([b[k] for b in batches]) for k in keys}


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Each process's part of the batch -> global arrays (batch axis split across processes)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, shardings[k]) for k, v in local.items()}
    local = dict(local, image_start=local["image_start"] + process_image_offset(shardings["pixel_values"],
                                                                                 local["pixel_values"].shape))
    if "video_pixels" in local:
        local["video_start"] = local["video_start"] + process_image_offset(shardings["video_pixels"],
                                                                           local["video_pixels"].shape)
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


@functools.lru_cache(maxsize=8)  # the same sharding and shapes every step: map the devices once
def process_image_offset(sharding: NamedSharding, local_shape: tuple[int, ...]) -> int:
    """The global index of this process's first image (or clip) slot. A process's images land on its devices'
    shards of the slot axis (axis 1), in global order: where the mesh puts those devices, not
    necessarily at process_index * local slots. Every process's shards must form one run, for a
    sample's images to stay adjacent; every process checks all of them, so all refuse together."""
    local_slots = local_shape[1]
    global_slots = local_slots * jax.process_count()
    global_shape = (local_shape[0], global_slots, *local_shape[2:])
    spans_of = {}
    for device, index in sharding.devices_indices_map(global_shape).items():
        spans_of.setdefault(device.process_index, set()).add(
            (index[1].start or 0, global_slots if index[1].stop is None else index[1].stop))
    offsets = {}
    for process, spans in sorted(spans_of.items()):
        spans = sorted(spans)
        run_end = spans[0][0]
        for start, stop in spans:
            if start != run_end:
                raise ValueError(f"process {process}'s image slots {spans} are not one run along the batch mesh "
                                 f"axes {sharding.spec}: order the mesh's devices by process")
            run_end = stop
        if run_end - spans[0][0] != local_slots:
            raise ValueError(f"process {process} holds image slots {spans} of {global_slots}, expected "
                             f"{local_slots} of its own")
        offsets[process] = spans[0][0]
    return offsets[jax.process_index()]
