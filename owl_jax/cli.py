"""What the command-line programs share: paths made absolute at the edge, a user's mistake as one
line, logging that shows our progress without every library's, and the exit codes launchers read.

Exit codes: 0 done; 2 a user error (bad flag, file, config field: the message names it);
75 (EX_TEMPFAIL) stopped by SIGTERM after saving a checkpoint: rerun the same command to resume.
"""
from __future__ import annotations

import logging as std_logging
import os
import sys

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75


class UserError(ValueError):
    """Bad input a user can fix (a flag, a file, a config field): shown as its message alone."""


def absolute(path: str) -> str:
    """A local path made absolute against the current directory; gs:// and other URLs as given.

    Libraries that run in background threads (orbax) or other processes resolve a relative path
    elsewhere or refuse it, so every path a user passes is made absolute once, where it enters."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def fail(message: str) -> None:
    """Prints `error: message` (one line) on stderr and exits with EXIT_USER_ERROR."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with a first contact that fits a terminal: --help exits 0, a mistyped
    `--config.x.y` override or a missing config file is one line, not a traceback."""
    from absl import app, flags

    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.keys()  # config_flags defers a failed load until the first use
        return rest
    except AttributeError as e:  # ml_collections: most often an override that names no field
        hint = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        fail(f"--config: no such field {hint}")
    except (OSError, ImportError, SyntaxError) as e:  # config_flags: the config file does not load
        lines = [line.strip() for line in str(e).strip().splitlines()]
        fail(f"--config: {lines[-1] if lines else type(e).__name__} (expected a config file, configs/*.py[:arg])")
    except flags.Error as e:
        fail(f"{e} (--help lists the flags)")
    raise AssertionError("unreachable")


def _run_as_main(module: str) -> None:
    """Runs `module` as `python -m module` does: absl takes a program's --help text and flags from
    `__main__`, which for a console script would otherwise be pip's wrapper."""
    import runpy

    runpy.run_module(module, run_name="__main__", alter_sys=True)


def owl_train() -> None:
    """The `owl-train` console script: python -m owl_jax.train."""
    _run_as_main("owl_jax.train")


def owl_aot() -> None:
    """The `owl-aot` console script: python -m owl_jax.aot."""
    _run_as_main("owl_jax.aot")


def owl_demo() -> None:
    """The `owl-demo` console script: python -m owl_jax.demo.run."""
    _run_as_main("owl_jax.demo.run")


class _OursOrImportant(std_logging.Filter):
    """Passes warnings and errors from anywhere, and info from owl_jax only (orbax and jax log every
    save and compile at INFO)."""

    _package = os.path.dirname(os.path.abspath(__file__))

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or record.pathname.startswith(self._package)


def setup_logging(verbosity_given: bool) -> None:
    """Our progress messages at INFO, other libraries' at WARNING; `--verbosity` shows everything."""
    from absl import logging

    if verbosity_given:
        return
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OursOrImportant())
