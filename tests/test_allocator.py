"""The training programs start themselves again with tcmalloc preloaded where the system has it:
the same process (pid), the same arguments, once; OWL_JAX_ALLOCATOR=system opts out."""
import subprocess
import sys

from owl_jax import allocator

from conftest import subprocess_env

# Prints a line at each start, then (after the restart) the allocator it runs with.
SCRIPT = """
import os, sys
print("start", os.getpid(), sys.argv[1:], flush=True)
from owl_jax import allocator
allocator.restart_with_tcmalloc()
print("tcmalloc" if allocator.tcmalloc_loaded() else "system", flush=True)
"""


def _run(**env) -> list[str]:
    child_env = subprocess_env(**env)
    if "LD_PRELOAD" not in env:
        child_env.pop("LD_PRELOAD", None)  # as a user's shell starts it
    if "OWL_JAX_ALLOCATOR" not in env:
        child_env.pop("OWL_JAX_ALLOCATOR", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "--flag=1", "x"], env=child_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_restarts_once_with_tcmalloc_where_the_system_has_it():
    lines = _run()
    if allocator.tcmalloc_library() is None:  # nothing to preload: one start, the system's malloc
        assert [line.split()[0] for line in lines] == ["start", "system"]
        return
    starts = [line for line in lines if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # the same pid and arguments, started twice
    assert starts[0].endswith("['--flag=1', 'x']")
    assert lines[-1] == "tcmalloc"


def test_opt_out_keeps_the_system_malloc():
    lines = _run(OWL_JAX_ALLOCATOR="system")
    assert [line.split()[0] for line in lines] == ["start", "system"]


def test_a_preload_that_does_not_take_does_not_loop():
    # The second start is marked; a marked process never restarts, whatever it runs with.
    lines = _run(OWL_JAX_ALLOCATOR="restarted")
    assert [line.split()[0] for line in lines] == ["start", "system"]


def test_a_preload_of_the_users_is_left_alone():
    lines = _run(LD_PRELOAD="libm.so.6")
    assert [line.split()[0] for line in lines] == ["start", "system"]
