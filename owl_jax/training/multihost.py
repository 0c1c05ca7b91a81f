"""Small agreements between the processes of a run (no-ops with one process): every process must
take the same branch at a stop, a resume or a refusal, or the others wait in a collective for ever."""
from __future__ import annotations

import json

import jax
import numpy as np


def any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag, or-ed over the processes (one exchange for all of them)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return tuple(flags)
    gathered = multihost_utils.process_allgather(np.array(flags, bool))  # bool[P, len(flags)]
    return tuple(bool(x) for x in np.any(gathered, axis=0))


def all_processes(obj) -> list:
    """[process 0's obj, process 1's, ...] on every process (obj: JSON-able)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([data.size]))))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)  # uint8[P, size]
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in rows]


def from_process_0(obj):
    """Process 0's obj on every process (obj: JSON-able): one process decides, all act alike."""
    return all_processes(obj)[0]


def barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
