"""owl_jax/distributed.py decides, from the environment alone, whether and how to start
jax.distributed; these tests run the decision (plan) for each place it runs, without initialising."""
import jax
import pytest

from owl_jax import distributed
from owl_jax.distributed import plan


def no_tpu():
    return 0


def no_metadata(key):
    raise AssertionError(f"metadata server queried for {key} where it must not be")


def _plan(env, *args, chips=no_tpu, metadata=no_metadata):
    return plan(*args, env=env, tpu_chips=chips, tpu_metadata=metadata)


# ----------------------------------------------------------------------------- single / explicit
def test_nothing_set_is_one_process():
    p = _plan({})
    assert p.kind == "single" and not p.initializes


def test_explicit_arguments_with_gloo_on_cpu():
    p = _plan({"JAX_PLATFORMS": "cpu"}, "127.0.0.1:1234", 2, 1)
    assert (p.kind, p.coordinator_address, p.num_processes, p.process_id, p.gloo) == (
        "explicit",
        "127.0.0.1:1234",
        2,
        1,
        True,
    )
    assert not _plan({}, "10.0.0.1:1234", 4, 0).gloo  # GPU/TPU processes keep their platform's collectives


def test_explicit_from_env_and_arguments_win():
    env = {"OWL_COORDINATOR_ADDRESS": "host:99", "OWL_NUM_PROCESSES": "4", "OWL_PROCESS_ID": "3"}
    p = _plan(env)
    assert (p.kind, p.coordinator_address, p.num_processes, p.process_id) == ("explicit", "host:99", 4, 3)
    p = _plan(env, "other:1", 0, 0)  # process_id 0 is a real value, not "unset"
    assert (p.coordinator_address, p.num_processes, p.process_id) == ("other:1", 4, 0)


def test_explicit_single_process_initialises_nothing():
    assert _plan({}, "127.0.0.1:1234", 1, 0).kind == "single"


@pytest.mark.parametrize("args, match", [
    (("127.0.0.1:1", 0, -1), "needs num_processes"),
    (("127.0.0.1:1", 2, -1), "needs num_processes"),
    (("127.0.0.1:1", 2, 2), "out of range"),
    (("127.0.0.1", 2, 0), "host:port"),
    (("", 2, 1), "without a coordinator"),
])
def test_explicit_errors(args, match):
    with pytest.raises(ValueError, match=match):
        _plan({}, *args)


def test_owl_distributed_switch():
    explicit = ("127.0.0.1:1", 2, 0)
    assert _plan({"OWL_DISTRIBUTED": "off"}, *explicit).kind == "single"
    slurm = dict(SLURM_ENV, OWL_DISTRIBUTED="off")
    assert _plan(slurm).kind == "single"
    p = _plan({"OWL_DISTRIBUTED": "on"})
    assert p.kind == "auto" and p.coordinator_address is None  # jax.distributed.initialize() detects
    assert _plan({"OWL_DISTRIBUTED": "on"}, *explicit).kind == "explicit"
    with pytest.raises(ValueError, match="OWL_DISTRIBUTED"):
        _plan({"OWL_DISTRIBUTED": "yes"})


# ------------------------------------------------------------------------------------- SLURM
SLURM_ENV = {  # srun step: 2 nodes x 8 tasks, all 8 GPUs visible to each task
    "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
}


def test_slurm_one_process_per_gpu_uses_jax_default():
    p = _plan(SLURM_ENV)
    assert p.kind == "slurm" and p.initializes
    assert (p.coordinator_address, p.num_processes, p.process_id, p.local_device_ids) == (None, None, None, None)
    assert not p.gloo


def test_slurm_one_process_per_gpu_bound_sees_its_gpu_as_0():
    p = _plan(dict(SLURM_ENV, CUDA_VISIBLE_DEVICES="1"))
    assert p.kind == "slurm" and p.local_device_ids == (0,)


def test_slurm_one_process_per_node_uses_every_gpu():
    env = dict(SLURM_ENV, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)")
    assert _plan(env).local_device_ids == tuple(range(8))
    env.pop("CUDA_VISIBLE_DEVICES")
    env.update(SLURM_GPUS_ON_NODE="4", SLURM_STEP_TASKS_PER_NODE="", SLURM_NTASKS_PER_NODE="1")
    assert _plan(env).local_device_ids == (0, 1, 2, 3)


def test_slurm_uneven_tasks_per_node():
    env = dict(SLURM_ENV, SLURM_NTASKS="3", SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_NODEID="1")
    assert _plan(env).local_device_ids == tuple(range(8))  # the node with one task takes all its GPUs
    assert distributed._slurm_tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "8(x2),4", "SLURM_NODEID": "2"}) == 4


def test_slurm_jax_local_device_ids_wins():
    assert _plan(dict(SLURM_ENV, JAX_LOCAL_DEVICE_IDS="0,1")).local_device_ids is None


def test_slurm_cpu_job_uses_gloo():
    env = {k: v for k, v in SLURM_ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
    p = _plan(dict(env, JAX_PLATFORMS="cpu"))
    assert p.kind == "slurm" and p.gloo


@pytest.mark.parametrize("change", [
    {"SLURM_NTASKS": "1"},  # a one-task step
    {"SLURM_STEP_NODELIST": None},  # python run bare in the batch script, outside srun
    {"SLURM_PROCID": None},
])
def test_slurm_not_multi_process(change):
    env = {k: v for k, v in {**SLURM_ENV, **change}.items() if v is not None}
    assert _plan(env).kind == "single"


def test_explicit_wins_over_slurm():
    assert _plan(SLURM_ENV, "127.0.0.1:1", 2, 0).kind == "explicit"


# --------------------------------------------------------------------------------------- TPU
def test_multi_host_tpu_from_gke_env():
    p = _plan({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}, chips=lambda: 4)
    assert p.kind == "tpu" and p.coordinator_address is None and "4 hosts" in p.reason


def test_multi_host_tpu_vm_from_metadata():
    asked = []

    def metadata(key):
        asked.append(key)
        return "t1v-n-0:0:10.0.0.2,t1v-n-1:1:10.0.0.3"  # the old name:id:ip format

    p = _plan({}, chips=lambda: 4, metadata=metadata)
    assert p.kind == "tpu" and asked == ["worker-network-endpoints"]


def test_single_host_tpu_vm_initialises_nothing():
    assert _plan({}, chips=lambda: 8, metadata=lambda key: "10.0.0.2").kind == "single"  # e.g. v5litepod-8
    assert _plan({}, chips=lambda: 4, metadata=lambda key: None).kind == "single"  # metadata server unreachable
    assert _plan({"TPU_WORKER_HOSTNAMES": "localhost"}, chips=lambda: 4).kind == "single"
    assert _plan({"TPU_SKIP_MDS_QUERY": "1"}, chips=lambda: 4).kind == "single"  # no_metadata: never asked


def test_tpu_hints_without_tpu_chips_are_ignored():
    assert _plan({"TPU_WORKER_HOSTNAMES": "a,b"}).kind == "single"  # no chips: JAX could not detect either


def test_multislice_and_cpu_override():
    assert _plan({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}).kind == "tpu"
    assert _plan({"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "w-0"}, chips=lambda: 4).kind == "tpu"
    # JAX_PLATFORMS=cpu on a TPU host: the TPU is not used, so no pod start-up (and no metadata query)
    assert _plan({"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "a,b"}, chips=lambda: 4).kind == "single"


def test_tpu_chip_count_from_jax_else_from_the_device_files(monkeypatch):
    from jax._src import hardware_utils

    monkeypatch.setattr(
        distributed.glob, "glob", lambda pattern: ["/dev/accel0", "/dev/accel1"] if "accel" in pattern else []
    )
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, "4x v5e"))
    assert distributed._tpu_chips_on_host() == 4

    def moved():
        raise AttributeError("private JAX API moved")

    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", moved)
    assert distributed._tpu_chips_on_host() == 2


# ------------------------------------------------------------------------------ initialize()
@pytest.fixture
def fake_jax_distributed(monkeypatch):
    calls = {"initialize": [], "config": []}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls["initialize"].append((a, k)))
    real_update = jax.config.update
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls["config"].append((name, value))
                        if name == "jax_cpu_collectives_implementation" else real_update(name, value))
    for var in ("OWL_DISTRIBUTED", "OWL_COORDINATOR_ADDRESS", "OWL_NUM_PROCESSES", "OWL_PROCESS_ID", "SLURM_JOB_ID",
                "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    return calls


def test_initialize_single_process_calls_nothing(fake_jax_distributed):
    assert distributed.initialize().kind == "single"
    assert fake_jax_distributed == {"initialize": [], "config": []}


def test_initialize_explicit_passes_arguments_and_gloo(fake_jax_distributed):
    distributed.initialize("127.0.0.1:4321", 2, 1)
    assert fake_jax_distributed["config"] == [("jax_cpu_collectives_implementation", "gloo")]
    assert fake_jax_distributed["initialize"] == [
        (("127.0.0.1:4321",), {"num_processes": 2, "process_id": 1, "local_device_ids": None})]


def test_initialize_slurm_per_node_passes_device_ids(fake_jax_distributed, monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS")
    for k, v in dict(
        SLURM_ENV, SLURM_NTASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", CUDA_VISIBLE_DEVICES="0,1"
    ).items():
        monkeypatch.setenv(k, v)
    distributed.initialize()
    assert fake_jax_distributed["initialize"] == [
        ((None,), {"num_processes": None, "process_id": None, "local_device_ids": [0, 1]})]
