r"""Train mPLUG-Owl: one stage (stage1 | stage2_lora | full_ft) per run, on any mesh, resumable.

  python -m owl_jax.train --config=configs/tiny.py:stage1 --workdir=/tmp/owl \
      [--config.num_steps=50 --config.mesh.fsdp=4 ...]

Sections below, top to bottom: set-up (processes, mesh, config) -> data -> state (resume, init from
a params dir, or random) -> checkpointing -> the loop (metrics, preemption) -> export.
The workdir holds checkpoints/ (orbax: state + data iterator), tensorboard/, metrics.jsonl and,
at the end, params/ (an owl_jax params dir for generation, conversion or the next stage).
"""
from __future__ import annotations

import os
import signal
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Only when run as a program: importing this module (tests, other tools) defines no flags."""
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:stage]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, logs and exported params go here (local or gs://).")
    flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of process 0 (see owl_jax/distributed.py).")
    flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
    flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the configured stage; returns the last logged metrics."""
    import flax.linen as nn
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from owl_jax import params_io
    from owl_jax.sharding import make_mesh
    from owl_jax.training.data_source import make_data_iterator
    from owl_jax.training.flops import StepShape, peak_flops, towers_of, train_step_flops
    from owl_jax.training.metrics import MetricsWriter
    from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

    # ------------------------------------------------------------------------- set-up
    mesh = make_mesh(config.mesh.to_dict())
    trainer = Trainer(config, mesh)
    accum = config.optim.grad_accum_steps
    process_batch = config.batch_size // jax.process_count()
    process_images = config.max_images_per_batch // jax.process_count()
    if config.batch_size % jax.process_count() or config.max_images_per_batch % jax.process_count():
        raise ValueError(f"batch_size={config.batch_size} and max_images_per_batch={config.max_images_per_batch} "
                         f"must divide by the {jax.process_count()} processes")
    logging.warning("mesh %s on %d devices, %d processes; stage %s trains %d tensors", dict(mesh.shape), jax.device_count(),
                 jax.process_count(), config.stage, len(trainer.trainable_paths))

    # --------------------------------------------------------------------------- data
    data = make_data_iterator(config, trainer.model_cfg, process_batch, process_images)
    batch_shapes = {
        "input_ids": (accum, config.batch_size, config.seq_len),
        "attention_mask": (accum, config.batch_size, config.seq_len),
        "loss_mask": (accum, config.batch_size, config.seq_len),
        "image_start": (accum, config.batch_size),
        "num_images": (accum, config.batch_size),
        "pixel_values": (accum, config.max_images_per_batch, trainer.model_cfg.vision.image_size,
                         trainer.model_cfg.vision.image_size, 3),
    }
    train_step = trainer.jit_train_step(batch_shapes)

    # -------------------------------------------------------------------------- state
    ckpt_dir = os.path.join(workdir, "checkpoints")
    policies = [ocp.checkpoint_managers.LatestN(n=config.checkpoint.keep)]
    if config.checkpoint.keep_best:
        policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1))
    manager = ocp.CheckpointManager(
        ckpt_dir,
        item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn makes orbax write each step's metrics to disk: without them a restarted run sees
            # metric-less checkpoints, which BestN keeps forever.
            best_fn=lambda m: m["loss"], best_mode="min",
            enable_async_checkpointing=config.checkpoint.async_save,
        ),
    )
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state, trainer.state_shardings
    )
    if manager.latest_step() is not None:
        step0 = manager.latest_step()
        restored = manager.restore(
            step0, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        )
        state = restored["state"]
        _restore_data_position(data, restored["data"])
        logging.warning("resumed from %s step %d", ckpt_dir, step0)
    else:
        rng = jax.random.PRNGKey(config.seed)
        params = None
        if config.init.params_dir:
            params, report = params_io.load_params_for(config.init.params_dir, trainer.model_cfg, seed=config.seed)
            logging.warning("initial params from %s; fresh: %s", config.init.params_dir, report or "none")
        state = trainer.init_state(rng, params)

    # -------------------------------------------------------------------------- loop
    preempted = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))

    def save(step: int, loss: float, data_position: dict, force: bool = False):
        # Every process's data position: orbax's JSON item is written by process 0 alone.
        positions = {"process_count": jax.process_count(), "processes": _all_processes(data_position)}
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(positions)),
            metrics={"loss": loss},  # a checkpoint without metrics would outlive every preservation policy
            force=force,
        )

    shape = StepShape(config.batch_size * accum, config.seq_len, config.max_images_per_batch * accum)
    step_flops = train_step_flops(trainer.model_cfg, shape, towers_of(trainer.trainable_paths))
    peak = config.peak_flops_per_device or peak_flops(jax.devices()[0].device_kind)
    step = int(jax.device_get(state["step"]))
    writer = MetricsWriter(workdir, config.stage, resume_step=step)
    bar = tqdm(total=config.num_steps, initial=step, desc=config.stage, disable=jax.process_index() != 0)
    last, window_start, window_steps, metrics = {}, time.time(), 0, None
    out_of_data = False
    while step < config.num_steps:
        data_position = data.get_state()  # before this step's batches: what a stop here saves
        local = None
        if not preempted["flag"]:  # a SIGTERM may have reached the input workers too: read no more
            try:
                local = stack_micro_batches([next(data) for _ in range(accum)])
            except StopIteration:
                pass
        # One exchange a step: every process stops together, at the same step.
        stop_preempted, out_of_data = _any_process(preempted["flag"], local is None and not preempted["flag"])
        if stop_preempted or out_of_data:
            if out_of_data:
                logging.warning("data exhausted (config.data.num_epochs=%s) at step %d of config.num_steps=%d: "
                                "training ends here", config.data.get("num_epochs"), step, config.num_steps)
            else:
                logging.warning("SIGTERM: saving step %d and exiting", step)
            if manager.latest_step() != step:
                save(step, _checkpoint_loss(metrics, step, manager), data_position, force=True)
            break
        state, metrics = train_step(state, global_batch(local, train_step.batch_shardings))
        step += 1
        window_steps += 1
        bar.update(1)
        if step % config.log_every_steps == 0 or step == config.num_steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.time() - window_start
            metrics["steps_per_s"] = window_steps / elapsed
            metrics["tokens_per_s"] = window_steps * config.batch_size * accum * config.seq_len / elapsed
            metrics["model_tflops_per_s"] = window_steps * step_flops / elapsed / 1e12
            if peak:
                metrics["mfu"] = metrics["model_tflops_per_s"] * 1e12 / (peak * jax.device_count())
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                raise FloatingPointError(f"step {step}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}; "
                                         f"last checkpoint: {manager.latest_step()}")
            writer.write(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
            last, window_start, window_steps = metrics, time.time(), 0
        if step % config.checkpoint.every_steps == 0 or step == config.num_steps:
            save(step, _checkpoint_loss(metrics, step, manager), data.get_state())
        if step == config.debug.hang_after_step:
            manager.wait_until_finished()
            logging.warning("debug.hang_after_step=%d: hanging until killed or SIGTERM (fault injection)", step)
            while not preempted["flag"]:
                time.sleep(0.05)
    manager.wait_until_finished()
    signal.signal(signal.SIGTERM, previous_handler)
    bar.close()
    writer.close()

    # ------------------------------------------------------------------------ export
    if config.export_params and (step >= config.num_steps or out_of_data):
        params = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), _fully_replicated(trainer.params(state)))
        params_io.save_params(os.path.join(workdir, "params"), params, trainer.model_cfg)  # collective in orbax
    manager.close()
    return last


def _any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag, or-ed over the processes (one exchange for all of them)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return tuple(flags)
    gathered = multihost_utils.process_allgather(np.array(flags, bool))  # bool[P, len(flags)]
    return tuple(bool(x) for x in np.any(gathered, axis=0))


def _all_processes(obj) -> list:
    """[process 0's obj, process 1's, ...] on every process (obj: JSON-able)."""
    import json

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([data.size]))))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)  # uint8[P, size]
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in rows]


def _restore_data_position(data, saved: dict) -> None:
    """Puts this process's data iterator where the checkpoint left it. A checkpoint written by another
    number of processes read the records in other shards: no position maps, so the data starts over."""
    import jax

    if "processes" not in saved:  # written before positions were saved per process: one process's
        saved = {"process_count": 1, "processes": [saved]}
    if saved["process_count"] != jax.process_count():
        logging.warning("the checkpoint's data positions are from %d processes, this run has %d: the data "
                        "stream starts from its beginning", saved["process_count"], jax.process_count())
        return
    data.set_state(saved["processes"][jax.process_index()])


def _checkpoint_loss(metrics, step: int, manager) -> float:
    """The loss of the step just taken, to rank its checkpoint by (inf before any step ran). A
    non-finite loss or gradient (the update it made is then broken too) stops the run before that
    state can be saved over a good checkpoint."""
    import math

    import jax

    if metrics is None:
        return float("inf")
    loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step}: loss {loss}, grad norm {grad_norm}; not saved; "
                                 f"last checkpoint: {manager.latest_step()}")
    return loss


def _fully_replicated(tree):
    """Gathers every leaf onto every process (for export from a multi-process run)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def main(argv):
    del argv
    from owl_jax import distributed

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
