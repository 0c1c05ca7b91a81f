r"""Train mPLUG-Owl: one stage (stage1 | stage2_lora | full_ft) per run, on any mesh, resumable.

  python -m owl_jax.train --config=configs/tiny.py:stage1 --workdir=/tmp/owl \
      [--config.num_steps=50 --config.mesh.fsdp=4 ...]

Read top to bottom: train() (paths made absolute, config checks, the workdir lock) -> _train():
set-up (mesh, trainer, data, the compiled step) -> restore or init -> the loop (one exchange a step
between processes: SIGTERM, end of data, a failed save; checkpoints; the metrics window) -> export.
The workdir holds checkpoints/ (orbax: state + data iterator), tensorboard/, metrics.jsonl and,
at the end, params/ (an owl_jax params dir for generation, conversion or the next stage).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from owl_jax import allocator, cli, distributed, params_io
from owl_jax import batch as batch_format
from owl_jax.cli import UserError, absolute
from owl_jax.sharding import make_mesh
from owl_jax.training import checkpoints, data_source, multihost
from owl_jax.training.flops import StepShape, peak_flops, towers_of, train_step_flops
from owl_jax.training.metrics import MetricsWriter
from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Only when run as a program: importing this module (tests, other tools) defines no flags."""
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:stage]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, logs and exported params go here (local or gs://).")
    flags.DEFINE_string(
        "coordinator_address", "", "Multi-process: host:port of process 0 (see owl_jax/distributed.py)."
    )
    flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
    flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")


class Preempted(Exception):
    """SIGTERM stopped the run after its checkpoint was saved: rerunning the same command resumes."""

    def __init__(self, step: int, checkpoint_dir: str):
        super().__init__(f"stopped by SIGTERM at step {step}, saved in {checkpoint_dir}: rerun the same command "
                         f"to resume")


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the configured stage; returns the last logged metrics.

    `workdir` and the config's paths may be relative to the current directory. One run at a time
    per workdir (a lock). Raises Preempted when SIGTERM stopped it (saved), CheckpointSaveError
    when a checkpoint could not be written, UserError for a config or checkpoint it cannot use."""
    workdir = absolute(workdir)
    config = config.copy_and_resolve_references()
    config.init.params_dir = absolute(config.init.params_dir)
    for field in ("dataset_dir", "tokenizer_path"):
        if config.data.get(field):
            config.data[field] = absolute(config.data[field])
    validate_config(config)
    with checkpoints.WorkdirLock(workdir):
        return _train(config, workdir)


def validate_config(config) -> None:
    """Settings that would otherwise fail after the compile, or train on nothing; UserError names them."""
    positive = {"num_steps": config.num_steps + 1, "batch_size": config.batch_size, "seq_len": config.seq_len,
                "log_every_steps": config.log_every_steps, "checkpoint.every_steps": config.checkpoint.every_steps,
                "checkpoint.keep": config.checkpoint.keep, "optim.grad_accum_steps": config.optim.grad_accum_steps,
                "max_images_per_batch": config.max_images_per_batch + 1,
                "max_videos_per_batch": config.max_videos_per_batch + 1}
    for name, value in positive.items():
        if value < 1:
            minimum = 0 if name in ("num_steps", "max_images_per_batch", "max_videos_per_batch") else 1
            raise UserError(f"config.{name} must be >= {minimum}")
    if config.max_videos_per_batch and config.frames_per_video < 1:
        raise UserError("config.frames_per_video must be >= 1 with clip slots (config.max_videos_per_batch > 0)")


def _train(config, workdir: str) -> dict:
    # ------------------------------------------------------------------------- set-up
    mesh = make_mesh(config.mesh.to_dict())
    trainer = Trainer(config, mesh)
    if any(config[k] % jax.process_count() for k in ("batch_size", "max_images_per_batch", "max_videos_per_batch")):
        raise UserError(f"batch_size={config.batch_size}, max_images_per_batch={config.max_images_per_batch} and "
                        f"max_videos_per_batch={config.max_videos_per_batch} must divide by the "
                        f"{jax.process_count()} processes")
    if config.max_videos_per_batch and not trainer.model_cfg.video:
        raise UserError(f"config.max_videos_per_batch={config.max_videos_per_batch}: clips need the video model "
                        "(config.model.vision.temporal and config.model.abstractor.temporal_queries)")
    logging.info(
        "mesh %s on %d devices, %d processes; stage %s trains %d tensors",
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
        config.stage,
        len(trainer.trainable_paths),
    )
    data = data_source.make_data_iterator(config, trainer.model_cfg, config.batch_size // jax.process_count(),
                                          config.max_images_per_batch // jax.process_count())
    train_step = trainer.jit_train_step(batch_format.step_shapes(config, trainer.model_cfg.vision.image_size))

    # ---------------------------------------------------------------- restore or init
    ckpt_dir, skipped_dir = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "checkpoints_skipped")
    checkpoints.set_aside_unreadable_steps(ckpt_dir, skipped_dir)
    manager = checkpoints.make_manager(ckpt_dir, config.checkpoint)
    state = _restore_or_init(config, trainer, manager, data, skipped_dir)

    # -------------------------------------------------------------------------- loop
    window = MetricsWindow(config, trainer, workdir, int(jax.device_get(state["step"])), data)
    with _sigterm_flag() as preempted:
        try:
            state, step, stop = _loop(config, train_step, state, data, manager, window, preempted)
            checkpoints.wait_for_saves(manager)
        finally:
            window.close()

    # ------------------------------------------------------------------------ export
    if config.export_params and stop != "preempted":
        params = jax.tree_util.tree_map(
            lambda x: np.asarray(jax.device_get(x)), _fully_replicated(trainer.params(state))
        )
        params_io.save_params(os.path.join(workdir, "params"), params, trainer.model_cfg)  # collective in orbax
    manager.close()
    if stop == "preempted":
        raise Preempted(step, ckpt_dir)
    return window.last


def _restore_or_init(config, trainer: Trainer, manager, data, skipped_dir: str) -> dict:
    """The newest good checkpoint (state and data position), else the initial state: the params in
    config.init.params_dir, missing ones fresh, or all random."""
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state, trainer.state_shardings
    )
    resumed = checkpoints.restore_newest_good(manager, abstract_state, skipped_dir)
    if resumed is not None:
        step, restored = resumed
        _restore_data_position(data, restored["data"])
        logging.info("resumed from %s step %d", manager.directory, step)
        return restored["state"]
    params = None
    if config.init.params_dir:
        params, report = params_io.load_params_for(config.init.params_dir, trainer.model_cfg, seed=config.seed)
        logging.info("initial params from %s; fresh: %s", config.init.params_dir, report or "none")
    return trainer.init_state(jax.random.PRNGKey(config.seed), params)


def _loop(config, train_step, state, data, manager, window: MetricsWindow, preempted: dict):
    """Steps until config.num_steps, the end of the data, or SIGTERM; saves every
    config.checkpoint.every_steps and where it stops. Returns (state, step, why it stopped:
    "done" | "out_of_data" | "preempted"). A failed save stops every process (CheckpointSaveError)."""
    step = window.step
    while step < config.num_steps:
        data_position = data.get_state()  # before this step's batches: what a stop here saves
        local = None
        if not preempted["flag"]:  # a SIGTERM may have reached the input workers too: read no more
            try:
                local = stack_micro_batches([next(data) for _ in range(config.optim.grad_accum_steps)])
            except StopIteration:
                pass
        save_error = checkpoints.previous_save_error(manager)
        # One exchange a step: every process stops together, at the same step.
        stop_preempted, out_of_data, save_failed = multihost.any_process(
            preempted["flag"], local is None and not preempted["flag"], save_error is not None)
        if save_failed:
            raise checkpoints.CheckpointSaveError(save_error or "another process could not save its checkpoint")
        if stop_preempted or out_of_data:
            if out_of_data:
                logging.warning("data exhausted (config.data.num_epochs=%s) at step %d of config.num_steps=%d: "
                                "training ends here", config.data.num_epochs, step, config.num_steps)
            else:
                logging.warning("SIGTERM: saving step %d and exiting", step)
            if manager.latest_step() != step:
                _save(manager, step, state, data_position, window.checked_loss(step, manager), force=True)
            return state, step, "preempted" if stop_preempted else "out_of_data"
        window.before_step()
        state, metrics = train_step(state, global_batch(local, train_step.batch_shardings))
        step += 1
        window.stepped(step, metrics, manager)
        if step % config.checkpoint.every_steps == 0 or step == config.num_steps:
            _save(manager, step, state, data.get_state(), window.checked_loss(step, manager))
    return state, step, "done"


def _save(manager, step: int, state, data_position: dict, loss: float, force: bool = False) -> None:
    """Every process's data position goes in: orbax's JSON item is written by process 0 alone. The
    processes first agree that no earlier save failed, or all stop (the others would wait in orbax's
    barrier)."""
    positions = {"process_count": jax.process_count(), "processes": multihost.all_processes(data_position)}
    error = checkpoints.previous_save_error(manager)
    if multihost.any_process(error is not None)[0]:
        raise checkpoints.CheckpointSaveError(error or "another process could not save its checkpoint")
    checkpoints.save(manager, step, state, positions, loss, force=force)


class MetricsWindow:
    """The console bar and the metrics log: every config.log_every_steps steps, the step's metrics with
    throughput over the steps since the last log: steps, tokens (all B x T positions) and real tokens
    (not padding: what packing raises) per second, model TFLOP/s and MFU of the B x T step, and
    `useful_mfu`, MFU counting only the real tokens' share of it (the step's FLOPs scaled by the real
    tokens' fraction: linear in tokens, which the matmuls are)."""

    def __init__(self, config, trainer: Trainer, workdir: str, step: int, data=None):
        self.config, self.step, self.resumed_at = config, step, step
        self.data = data  # its `stats` (the pipeline's counters, this process's) are logged with the metrics
        accum = config.optim.grad_accum_steps
        shape = StepShape(config.batch_size * accum, config.seq_len, config.max_images_per_batch * accum,
                          config.max_videos_per_batch * accum, config.frames_per_video)
        self.step_flops = train_step_flops(trainer.model_cfg, shape, towers_of(trainer.trainable_paths))
        self.step_tokens = config.batch_size * accum * config.seq_len
        self.peak = config.peak_flops_per_device or peak_flops(jax.devices()[0].device_kind)
        self.writer = MetricsWriter(workdir, config.stage, resume_step=step)
        self.bar = tqdm(total=config.num_steps, initial=step, desc=config.stage, disable=jax.process_index() != 0)
        self.last: dict = {}
        self.latest = None  # the device metrics of the newest step, not yet fetched
        self.start, self.steps, self.compile_start = time.time(), 0, None
        self.real_tokens = 0.0  # a device scalar between logs: summed without waiting for the steps

    def before_step(self) -> None:
        if self.step == self.resumed_at and self.compile_start is None:
            logging.info("compiling the training step (the first step waits for it)")
            self.compile_start = time.time()

    def stepped(self, step: int, metrics, manager) -> None:
        """After each step: `metrics` are its device values (fetched only when logged)."""
        if self.step == self.resumed_at:
            logging.info("compiled and dispatched the first step in %.1f s", time.time() - self.compile_start)
        self.step, self.latest = step, metrics
        self.steps += 1
        self.real_tokens = self.real_tokens + metrics["real_tokens"]
        self.bar.update(1)
        if step % self.config.log_every_steps and step != self.config.num_steps:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, values["loss"], values["grad_norm"], manager)
        elapsed = time.time() - self.start
        values["steps_per_s"] = self.steps / elapsed
        # Skipped, deferred and cut samples since the run began: a counted skip is one a user can see.
        values.update({f"data_{k}": float(v) for k, v in getattr(self.data, "stats", {}).items()})
        values["tokens_per_s"] = self.steps * self.step_tokens / elapsed
        real = float(self.real_tokens)
        values["real_tokens_per_s"] = real / elapsed
        values["model_tflops_per_s"] = self.steps * self.step_flops / elapsed / 1e12
        if self.peak:
            values["mfu"] = values["model_tflops_per_s"] * 1e12 / (self.peak * jax.device_count())
            values["useful_mfu"] = values["mfu"] * real / (self.steps * self.step_tokens)
        if values["loss_tokens"] == 0:
            logging.log_first_n(logging.WARNING, "step %d: no answer token in the batch, so loss 0 and nothing "
                                "learns: does config.seq_len=%d cut every answer?", 5, step, self.config.seq_len)
        self.writer.write(step, values)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}")
        self.last, self.start, self.steps, self.real_tokens = values, time.time(), 0, 0.0

    def checked_loss(self, step: int, manager) -> float:
        """The loss of the step just taken, to rank its checkpoint by (inf before any step ran); a
        non-finite one stops the run before its state is saved."""
        if self.latest is None:
            return float("inf")
        loss, grad_norm = (float(x) for x in jax.device_get((self.latest["loss"], self.latest["grad_norm"])))
        check_finite(step, loss, grad_norm, manager)
        return loss

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def check_finite(step: int, loss: float, grad_norm: float, manager) -> None:
    """A non-finite loss or gradient broke the update too: stop before that state is saved over a
    good checkpoint (a rerun resumes from the last one)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step}: loss {loss}, grad norm {grad_norm}; not saved; "
                                 f"last checkpoint: {manager.latest_step()}")


@contextlib.contextmanager
def _sigterm_flag():
    """{"flag": bool}, set by SIGTERM while the block runs (the previous handler is put back after)."""
    preempted = {"flag": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))
    try:
        yield preempted
    finally:
        signal.signal(signal.SIGTERM, previous)


def _restore_data_position(data, saved: dict) -> None:
    """Puts this process's data iterator where the checkpoint left it. A checkpoint written by another
    number of processes read the records in other shards: no position maps, so the data starts over."""
    if "processes" not in saved:  # written before positions were saved per process: one process's
        saved = {"process_count": 1, "processes": [saved]}
    if saved["process_count"] != jax.process_count():
        logging.warning("the checkpoint's data positions are from %d processes, this run has %d: the data "
                        "stream starts from its beginning", saved["process_count"], jax.process_count())
        return
    data.set_state(saved["processes"][jax.process_index()])


def _fully_replicated(tree):
    """Gathers every leaf onto every process (for export from a multi-process run)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def start_program() -> None:
    """What a training program does before its job: logging, the --workdir it needs, and tcmalloc
    (owl_jax/allocator.py: the process may start again here, once)."""
    cli.setup_logging(FLAGS["verbosity"].present)
    if not FLAGS.workdir:
        cli.fail("--workdir is required")
    allocator.restart_with_tcmalloc()
    logging.info("memory allocator: %s", allocator.loaded_name())


def main(argv):
    del argv
    start_program()
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    sys.exit(run_cli(lambda: train(FLAGS.config, FLAGS.workdir)))


def run_cli(job) -> int:
    """Runs `job()` as a program: the exit code a launcher reads (owl_jax/cli.py), one line on stderr
    for what stopped it."""
    try:
        job()
    except (UserError, FileNotFoundError) as e:
        cli.fail(str(e))
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return cli.EXIT_PREEMPTED
    except Exception as e:  # noqa: BLE001 - a failed save may surface through a later cleanup's error
        failed_save = e
        while failed_save is not None and not isinstance(failed_save, checkpoints.CheckpointSaveError):
            failed_save = failed_save.__context__
        if failed_save is None:
            raise
        print(f"error: {failed_save}", file=sys.stderr)
        # orbax's save threads would hold the exit for their signal timeout (300 s), waiting for a
        # directory the failed save never made: nothing is left to write, so leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_absl_flags)
