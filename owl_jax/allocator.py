"""tcmalloc for the programs that train, where the system has it.

XLA's CPU runtime allocates and frees large buffers on every step; glibc's malloc hands most of
them back to the kernel and maps them again, so a CPU training run spends a large share of its
time in the kernel (the main job on 2 cores: 554 s of system time in a 1632 s run, 289 million
minor page faults). tcmalloc keeps freed memory for reuse: the same run takes 1110 s with 15 s of
system time and the same results (BENCHMARKS.md, "The memory allocator"). A preloaded allocator
has to be in place before the process starts, so the program starts itself again with LD_PRELOAD
set, once, before its job starts. Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`.
OWL_JAX_ALLOCATOR=system keeps the system's malloc; a LD_PRELOAD of the user's is left as it is.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
_OPT_OUT = "OWL_JAX_ALLOCATOR"


def tcmalloc_library() -> str | None:
    """The tcmalloc shared library the dynamic linker would load (e.g. libtcmalloc_minimal.so.4), or None."""
    for name in _LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def tcmalloc_loaded() -> bool:
    """Whether this process runs with tcmalloc mapped in."""
    try:
        with open("/proc/self/maps") as f:
            return "libtcmalloc" in f.read()
    except OSError:
        return False


def loaded_name() -> str:
    """The allocator this process runs with, as logs and reports name it."""
    return "tcmalloc" if tcmalloc_loaded() else "the system malloc"


def restart_with_tcmalloc() -> None:
    """Replaces this process by the same command with tcmalloc preloaded, when the system has it, it
    is not loaded yet, nothing else is preloaded and OWL_JAX_ALLOCATOR is not "system"; otherwise
    returns. Call it in a program's main before its job starts (flags parsed, no checkpoint or data
    opened yet): the process stays the same (pid, environment, arguments), so launchers and signals
    see no difference."""
    # "restarted" marks the second start: no loop if the preload did not take.
    if os.environ.get(_OPT_OUT, "").lower() in ("system", "restarted") or sys.platform != "linux":
        return
    if os.environ.get("LD_PRELOAD", "").strip():  # the user's own preload (another allocator, a profiler)
        return
    library = tcmalloc_library()
    if library is None or tcmalloc_loaded():
        return
    # gperftools reports every host allocation over 1 GiB on stderr (a 7B restore makes many).
    env = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40), **os.environ, "LD_PRELOAD": library,
           _OPT_OUT: "restarted"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
