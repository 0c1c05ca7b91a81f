"""Multi-process start-up on JAX's own runtime: nothing for one process, auto-detection on TPU pods
and SLURM, explicit coordinator settings elsewhere (e.g. several processes on one machine)."""
from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Explicit arguments win; then OWL_COORDINATOR_ADDRESS / OWL_NUM_PROCESSES / OWL_PROCESS_ID;
    then jax.distributed's auto-detection (TPU VMs, SLURM) when it applies; else single process."""
    coordinator_address = coordinator_address or os.environ.get("OWL_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("OWL_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("OWL_PROCESS_ID", "-1"))
    if coordinator_address:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("a coordinator address needs num_processes and process_id (or OWL_NUM_PROCESSES / OWL_PROCESS_ID)")
        if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
