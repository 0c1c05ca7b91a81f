"""Training checkpoints (orbax): one manager per workdir, a save that fails stops the run, a resume
that skips a damaged newest step, and a lock so one workdir holds one run.

A checkpoint step holds two items: `state` (the train state, sharded) and `data` (every process's
data-iterator position, JSON). Each step also carries its loss as orbax metrics, which the
keep-best policy ranks by.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

import jax
from absl import logging

from owl_jax.cli import UserError
from owl_jax.training import multihost


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written: the run stops before it computes steps nothing can resume."""


def make_manager(ckpt_dir: str, cfg) -> Any:
    """An orbax CheckpointManager over `ckpt_dir` (absolute, or a URL) per `config.checkpoint`."""
    import orbax.checkpoint as ocp

    policies = [ocp.checkpoint_managers.LatestN(n=cfg.keep)]
    if cfg.keep_best:
        policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1))
    return ocp.CheckpointManager(
        ckpt_dir,
        item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn makes orbax write each step's metrics to disk: without them a restarted run sees
            # metric-less checkpoints, which BestN keeps forever.
            best_fn=lambda m: m["loss"], best_mode="min",
            enable_async_checkpointing=cfg.async_save,
        ),
    )


def save(manager, step: int, state, positions: dict, loss: float, force: bool = False) -> None:
    """Starts (async) or writes the checkpoint of `step`; a failure raises CheckpointSaveError naming
    the directory and the cause. Every process calls it after they agreed that the previous save
    is fine (`previous_save_error` through an exchange)."""
    import orbax.checkpoint as ocp

    try:
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(positions)),
            metrics={"loss": loss},  # a checkpoint without metrics would outlive every preservation policy
            force=force,
        )
    except Exception as e:  # noqa: BLE001 - any failure to write is fatal, with its cause named
        raise CheckpointSaveError(_save_failure(manager, step, e)) from e


def previous_save_error(manager) -> str | None:
    """Why the last async save failed, or None (also while it is still running). Cheap: call it
    every step, so a failed save stops the run at the next step, not one save later."""
    # Not manager.check_for_errors(): it takes the error away from orbax's finalize thread, which
    # would then delete the old steps it was told to drop as if the new one had been written.
    try:
        if not manager.is_saving_in_progress():
            manager.wait_until_finished()  # returns at once: re-raises what the finished save raised
    except Exception as e:  # noqa: BLE001
        return _save_failure(manager, None, e)
    return None


def wait_for_saves(manager) -> None:
    """Blocks until the in-flight save is on disk; raises CheckpointSaveError if it failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise CheckpointSaveError(_save_failure(manager, None, e)) from e


def _save_failure(manager, step: int | None, error: BaseException) -> str:
    what = f"step {step}" if step is not None else "the last checkpoint"
    return (f"could not save {what} into {manager.directory}: {_cause(error)}; "
            f"the newest complete checkpoint is step {_newest_on_disk(manager)}")


def _newest_on_disk(manager):
    try:
        manager.reload()
        return manager.latest_step()
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def _cause(error: BaseException) -> str:
    """The innermost cause's first line (orbax wraps the OSError that says what went wrong)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------------ restore


def restore_newest_good(manager, abstract_state, skipped_dir: str) -> tuple[int, dict] | None:
    """Restores the newest step that reads back whole, newest first. Steps newer than it that do not
    (cut by a crash, emptied, a damaged file) are moved into `skipped_dir` with a warning naming
    each and why, so the run does not meet them again. A step counts as damaged when it fails on
    any process, so every process restores the same one.

    None when there is no checkpoint at all. A UserError when none restores (e.g. the config
    changed: the message gives each step's reason; nothing is moved, so a rerun never starts over
    silently).

    Returns (step, {"state": ..., "data": ...})."""
    import orbax.checkpoint as ocp

    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        restored, why = None, ""
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )
        except Exception as e:  # noqa: BLE001 - a step that does not restore is skipped, with its reason
            why = _cause(e)
        (failed_anywhere,) = multihost.any_process(restored is None)
        if failed_anywhere:
            failures.append((step, why or "did not restore on another process"))
            continue
        for bad, reason in failures:
            logging.warning("checkpoint step %d in %s does not restore (%s): skipped, moved to %s; resuming "
                            "from step %d", bad, manager.directory, reason, skipped_dir, step)
        if failures:
            _move_steps(str(manager.directory), [bad for bad, _ in failures], skipped_dir)
            manager.reload()
        return step, restored
    if failures:
        reasons = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise UserError(f"no checkpoint in {manager.directory} restores into this run's train state (a changed "
                        f"model, stage or mesh config is the usual cause: start a new --workdir for a new "
                        f"config); nothing was moved: {reasons}")
    return None


def set_aside_unreadable_steps(ckpt_dir: str, skipped_dir: str) -> None:
    """Moves step directories whose small JSON files (what orbax's manager reads when it opens the
    directory: the step metadata and the metrics) do not parse into `skipped_dir`, with a warning.
    Without this one cut file stops the manager from opening, and so every resume. Process 0
    decides for all. Only a file that reads but does not parse is damage: an I/O error (a flaky
    mount, a permission) is raised. When every step is damaged nothing is moved and a UserError
    says so: a rerun must never start over silently."""
    import json

    from etils import epath

    bad, steps, root = {}, 0, epath.Path(ckpt_dir)
    if jax.process_index() == 0 and root.exists():
        for step_dir in root.iterdir():
            if not step_dir.name.isdigit():
                continue
            steps += 1
            for name in ("_CHECKPOINT_METADATA", "metrics/metrics"):
                f = step_dir / name
                try:
                    if f.exists():
                        json.loads(f.read_text())
                except (ValueError, UnicodeDecodeError) as e:
                    bad[step_dir.name] = f"{name} does not parse ({_cause(e)})"
                    break
    bad, steps = multihost.from_process_0([bad, steps])
    if bad and len(bad) == steps:
        raise UserError(
            f"every checkpoint step in {ckpt_dir} is damaged ({'; '.join(f'step {k}: {v}' for k, v in bad.items())}): "
            f"move the checkpoints away to train from the start"
        )
    for step, why in bad.items():
        logging.warning("checkpoint step %s in %s: %s: skipped, moved to %s", step, ckpt_dir, why, skipped_dir)
    _move_steps(ckpt_dir, [int(k) for k in bad], skipped_dir)


def _move_steps(ckpt_dir: str, steps: list[int], skipped_dir: str) -> None:
    """Process 0 moves the step directories (kept for inspection); every process waits for it.
    Every process calls it with the same steps."""
    from etils import epath

    if steps and jax.process_index() == 0:
        dest = epath.Path(skipped_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for step in steps:
            src = epath.Path(ckpt_dir) / str(step)
            if src.exists():
                src.rename(dest / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if steps:
        multihost.barrier("owl_jax_checkpoints_moved_aside")


# ------------------------------------------------------------------------------------ lock


class WorkdirLock:
    """One run per workdir: an exclusive flock on WORKDIR/.lock, held by process 0 for the run.

    The kernel drops a flock when its process dies, so a killed run leaves no stuck lock. The file
    names the holder for the refusal message. A gs:// workdir has no file locks: not locked."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        refusal = None
        if "://" not in self.path and jax.process_index() == 0:
            refusal = self._lock()
        (refused,) = multihost.any_process(refusal is not None)  # the other processes stop too
        if refused:
            self.__exit__()
            workdir = os.path.dirname(self.path)
            raise UserError(refusal or f"{workdir} is in use by another run (process 0 names it)")
        return self

    def _lock(self) -> str | None:
        """Takes the lock; returns why not (the holder) or None."""
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return (f"{os.path.dirname(self.path)} is in use by {holder}: one run at a time per workdir "
                    f"(wait for it, stop it, or use another --workdir)")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return None

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None
