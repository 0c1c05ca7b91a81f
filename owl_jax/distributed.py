"""Multi-process start-up on JAX's own runtime (`jax.distributed`), chosen from the environment.

`initialize()` is called by `python -m owl_jax.train` before anything touches a device. It decides
(`plan()`, pure and unit-tested) and then acts, in this order:

1. `OWL_DISTRIBUTED=off`                 -> single process, nothing initialised.
2. explicit coordinator (flags `--coordinator_address/--num_processes/--process_id`, else the
   env vars OWL_COORDINATOR_ADDRESS / OWL_NUM_PROCESSES / OWL_PROCESS_ID) with more than one
   process                               -> `jax.distributed.initialize(addr, n, i)`; with
   JAX_PLATFORMS=cpu the CPU collectives are gloo (what `launch/local.sh` uses).
3. `OWL_DISTRIBUTED=on`                  -> `jax.distributed.initialize()` with no arguments:
   JAX's own detection (Open MPI, Kubernetes, TPU, SLURM, ...), for clusters not listed here.
4. SLURM, inside an `srun` step with more than one task -> `jax.distributed.initialize()` (JAX
   reads SLURM_* for coordinator, count and rank). Device visibility, which JAX would otherwise
   set to `[SLURM_LOCALID]`:
     * one task per node             -> every GPU the node gives the task (CUDA_VISIBLE_DEVICES /
                                        SLURM_GPUS_ON_NODE), not only GPU 0;
     * one task per GPU, GPU bound   -> its one visible GPU, [0] (`srun --gpus-per-task=1`);
     * one task per GPU, all visible -> GPU SLURM_LOCALID (JAX's default).
   JAX_LOCAL_DEVICE_IDS, when set, wins (JAX reads it).
5. Cloud TPU VM host that belongs to a multi-host slice (worker list from TPU_WORKER_HOSTNAMES /
   TPU_PROCESS_ADDRESSES on GKE, else the VM's `worker-network-endpoints` metadata), or any
   multislice job (MEGASCALE_COORDINATOR_ADDRESS) -> `jax.distributed.initialize()`; JAX reads
   the same metadata for addresses and ranks. A single-host TPU VM (v5litepod-8, v4-8, ...) is
   one process and initialises nothing.
6. anything else                         -> single process, nothing initialised.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Callable, Mapping, Optional

SINGLE, EXPLICIT, AUTO, SLURM, TPU = "single", "explicit", "auto", "slurm", "tpu"


@dataclasses.dataclass(frozen=True)
class Plan:
    kind: str  # single | explicit | auto | slurm | tpu
    reason: str
    coordinator_address: Optional[str] = None  # None: JAX detects it
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple[int, ...]] = None  # None: JAX's default (or JAX_LOCAL_DEVICE_IDS)
    gloo: bool = False  # CPU collectives over gloo (needed for multi-process CPU)

    @property
    def initializes(self) -> bool:
        return self.kind != SINGLE


def plan(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    *,
    env: Mapping[str, str] | None = None,
    tpu_chips: Callable[[], int] | None = None,
    tpu_metadata: Callable[[str], Optional[str]] | None = None,
) -> Plan:
    """Decides how this process starts; touches no device and no network unless it runs on a TPU
    host with no worker list in its environment (then it asks the VM's metadata server, once).
    `env`, `tpu_chips` (TPU chips on this host) and `tpu_metadata` (key -> value or None) default to
    the real ones; tests pass their own."""
    env = os.environ if env is None else env
    tpu_chips = tpu_chips or _tpu_chips_on_host
    tpu_metadata = tpu_metadata or _gce_metadata
    mode = env.get("OWL_DISTRIBUTED", "auto").strip().lower()
    if mode not in ("auto", "on", "off", ""):
        raise ValueError(f"OWL_DISTRIBUTED={mode!r}: expected auto, on or off")
    if mode == "off":
        return Plan(SINGLE, "OWL_DISTRIBUTED=off")

    # ----------------------------------------------------------------------------- explicit
    coordinator_address = coordinator_address or env.get("OWL_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(env.get("OWL_NUM_PROCESSES", "0") or 0)
    if process_id is None or process_id < 0:
        process_id = int(env.get("OWL_PROCESS_ID", "-1") or -1)
    if coordinator_address:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("a coordinator address needs num_processes and process_id "
                             "(--num_processes/--process_id or OWL_NUM_PROCESSES/OWL_PROCESS_ID)")
        if process_id >= num_processes:
            raise ValueError(f"process_id={process_id} is out of range for num_processes={num_processes}")
        if ":" not in coordinator_address:
            raise ValueError(f"coordinator address {coordinator_address!r} must be host:port")
        if num_processes == 1:
            return Plan(SINGLE, "explicit coordinator with num_processes=1")
        return Plan(EXPLICIT, f"explicit coordinator {coordinator_address}", coordinator_address, num_processes,
                    process_id, gloo=_cpu_only(env))
    if num_processes > 1 or process_id > 0:
        raise ValueError("num_processes / process_id were given without a coordinator address")

    if mode == "on":
        return Plan(AUTO, "OWL_DISTRIBUTED=on: jax.distributed.initialize() auto-detection", gloo=_cpu_only(env))

    # -------------------------------------------------------------------------------- SLURM
    slurm = _slurm_plan(env)
    if slurm is not None:
        return slurm

    # ---------------------------------------------------------------------------------- TPU
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Plan(TPU, "TPU multislice (MEGASCALE_COORDINATOR_ADDRESS)")
    if _cpu_only(env):
        return Plan(SINGLE, "JAX_PLATFORMS=cpu and no coordinator")
    if tpu_chips() > 0:
        workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
        source = "TPU_PROCESS_ADDRESSES/TPU_WORKER_HOSTNAMES"
        if workers is None and env.get("TPU_SKIP_MDS_QUERY") is None:
            workers = tpu_metadata("worker-network-endpoints")
            source = "worker-network-endpoints metadata"
        hosts = len([w for w in (workers or "").split(",") if w.strip()])
        num_slices = int(env.get("MEGASCALE_NUM_SLICES", "1") or 1)
        if hosts > 1 or num_slices > 1:
            return Plan(TPU, f"multi-host TPU slice: {hosts} hosts ({source}), {num_slices} slice(s)")
        return Plan(SINGLE, f"single-host TPU ({hosts or 'no'} worker listed by {source})")
    return Plan(SINGLE, "no coordinator, cluster or TPU slice detected")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> Plan:
    """Acts on `plan()`: calls `jax.distributed.initialize` when several processes run, else nothing.
    Returns the plan (its `reason` says why)."""
    import jax

    p = plan(coordinator_address, num_processes, process_id)
    if not p.initializes or jax.distributed.is_initialized():
        return p
    if p.gloo or (p.kind in (EXPLICIT, AUTO) and jax.config.jax_platforms == "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from absl import logging

    logging.warning("jax.distributed.initialize: %s", p.reason)
    jax.distributed.initialize(
        p.coordinator_address,
        num_processes=p.num_processes,
        process_id=p.process_id,
        local_device_ids=list(p.local_device_ids) if p.local_device_ids is not None else None,
    )
    return p


# ------------------------------------------------------------------------------------ helpers
def _cpu_only(env: Mapping[str, str]) -> bool:
    return env.get("JAX_PLATFORMS", "").strip().lower() == "cpu"


_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _slurm_plan(env: Mapping[str, str]) -> Optional[Plan]:
    """A plan inside an `srun` step (SLURM_STEP_NODELIST is only set there: a bare `python` in the
    batch script is one process) with more than one task; else None."""
    if not all(v in env for v in _SLURM_VARS):
        return None
    ntasks = int(env["SLURM_NTASKS"])
    if ntasks <= 1:
        return None
    reason = f"SLURM step, {ntasks} tasks"
    gloo = _cpu_only(env)
    if env.get("JAX_LOCAL_DEVICE_IDS") or gloo:
        return Plan(SLURM, reason, gloo=gloo)
    tasks_here = _slurm_tasks_on_this_node(env)
    visible = _visible_gpus(env)
    if tasks_here == 1 and visible and visible > 1:
        return Plan(SLURM, f"{reason}, one per node: GPUs 0..{visible - 1}", local_device_ids=tuple(range(visible)))
    if tasks_here is not None and tasks_here > 1 and visible == 1:
        return Plan(SLURM, f"{reason}, one per GPU (bound): its GPU 0", local_device_ids=(0,))
    return Plan(SLURM, f"{reason}: JAX's default device choice (GPU SLURM_LOCALID={env['SLURM_LOCALID']})")


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> Optional[int]:
    """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ('8(x2)', '2,1') indexed by
    SLURM_NODEID, else SLURM_NTASKS_PER_NODE."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts: list[int] = []
        for part in spec.split(","):
            m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
            if not m:
                break
            counts += [int(m.group(1))] * int(m.group(2) or 1)
        else:
            node = int(env.get("SLURM_NODEID", "0") or 0)
            if node < len(counts):
                return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    return None


def _visible_gpus(env: Mapping[str, str]) -> Optional[int]:
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip()])
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    return None


def _tpu_chips_on_host() -> int:
    """TPU chips attached to this host (PCI scan, as JAX does before it loads libtpu)."""
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # private JAX API moved: fall back to the device files
        return len(glob.glob("/dev/accel[0-9]*")) or len(glob.glob("/dev/vfio/[0-9]*"))


def _gce_metadata(key: str, timeout_s: float = 5.0) -> Optional[str]:
    """A Cloud TPU VM attribute from the GCE metadata server; None when it is not there."""
    import urllib.error
    import urllib.request

    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    req = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                 headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None

