"""What the command-line programs share: paths made absolute at the edge, a user's mistake as one
line, logging that shows our progress without every library's, and the exit codes launchers read.

Exit codes: 0 done; 2 a user error (bad flag, file, config field: the message names it);
75 (EX_TEMPFAIL) stopped by SIGTERM after saving a checkpoint: rerun the same command to resume.
"""
from __future__ import annotations

import difflib
import logging as std_logging
import os
import sys
import textwrap
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

if TYPE_CHECKING:  # absl loads with the programs that parse flags, not with every library import
    from absl import flags

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


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def _wants_help(args: Sequence[str]) -> bool:
    args = list(args)
    return any(a in HELP_FLAGS for a in args[: args.index("--") if "--" in args else len(args)])


def _parse(fv: flags.FlagValues, argv: list[str], config: bool = False,
           others: Mapping[str, flags.FlagValues] | None = None) -> list[str]:
    """`fv(argv)` (argv[0]: the program) with what it refuses as one line, exit status 2: the shared
    core of parse_absl_flags and parse_flags. `config`: `fv` has a config_flags --config, loaded here;
    `others`: the flags of a program's other commands, named when one of theirs is given."""
    from absl import flags

    try:
        rest = fv(argv)
        if config and "config" in fv and fv.config is not None:
            fv.config.keys()  # config_flags defers a failed load until the first use
        return rest
    except AttributeError as e:  # ml_collections: most often an override that names no field
        if not config:
            raise
        hint = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        fail(f"--config: no such field {hint}")
    except (OSError, ImportError, SyntaxError) as e:  # config_flags: the config file does not load
        if not config:
            raise
        lines = [line.strip() for line in str(e).strip().splitlines()]
        fail(f"--config: {lines[-1] if lines else type(e).__name__} (expected a config file, configs/*.py[:arg])")
    except flags.UnrecognizedFlagError as e:
        fail(_unknown_flag(fv, argv[0], e.flagname, others or {}))
    except flags.Error as e:
        fail(f"{e} (--help lists the flags)")
    raise AssertionError("unreachable")


def _unknown_flag(fv: flags.FlagValues, command: str, name: str, others: Mapping[str, flags.FlagValues]) -> str:
    """The message for --name, which `fv` lacks: the command that takes it, or the spelling meant."""
    owners = [other for other, other_fv in others.items() if name in other_fv]
    if owners:
        return f"{command} does not take --{name} (a flag of {' and '.join(owners)}; --help lists the flags)"
    underscored = name.replace("-", "_")
    if underscored != name and underscored in fv:  # a dash spelling, as GNU-style programs take
        return f"unknown flag --{name}: flag names are spelled with underscores, --{underscored}"
    close = difflib.get_close_matches(name, list(fv), n=3)
    hint = f"did you mean {' or '.join('--' + c for c in close)}? " if close else ""
    return f"unknown flag --{name} ({hint}--help lists the flags)"


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (flags.FLAGS, for absl.app programs) with a first contact that fits a
    terminal: --help exits 0, a mistyped `--config.x.y` override or a missing config file is one
    line, not a traceback."""
    from absl import app, flags

    if _wants_help(argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    return _parse(flags.FLAGS, argv, config=True)


def parse_flags(argv: Sequence[str] | None, fv: flags.FlagValues, doc: str, *,
                required: Sequence[str] = ()) -> flags.FlagValues:
    """A program's arguments parsed into its own FlagValues `fv` (never the process-wide flags.FLAGS,
    which other programs and libraries fill), so that `main(argv)` runs again in the same process.

    `argv`: the arguments after the program's name (None: sys.argv's). Flags are `--name=value` or
    `--name value`, `--flag`/`--noflag` for a switch, a DEFINE_multi_* flag once per value. --help
    prints `doc` and the flags, exit status 0; a mistake (an unknown flag, a bad value, a `required`
    flag missing, an argument that is no flag) is one line `error: ...`, exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if _wants_help(args):
        _print_help(doc, [("flags", fv, required)])
    _check_parsed(fv, _parse(fv, [sys.argv[0], *args])[1:], required)
    return fv


def positive_ints(text: str) -> list[int]:
    """`8,16,32` -> [8, 16, 32]: a comma-separated flag value; ValueError unless each is a positive integer."""
    values = [int(x) for x in text.split(",")]
    if min(values) < 1:
        raise ValueError(text)
    return values


def register_positive_ints(name: str, fv: flags.FlagValues) -> None:
    """Refuses a value of flag `name` that `positive_ints` cannot read, when the flags are parsed."""
    from absl import flags

    def valid(text: str) -> bool:
        try:
            return bool(positive_ints(text))
        except ValueError:
            return False

    flags.register_validator(name, valid, "expected positive integers, comma-separated", flag_values=fv)


class Command(NamedTuple):
    """One command of a program that takes a command first (`python -m owl_jax.convert to-torch ...`)."""

    flags: flags.FlagValues  # its own, fresh for each parse
    help: str  # one line
    required: tuple[str, ...] = ()


def parse_command(argv: Sequence[str] | None, commands: Mapping[str, Command],
                  doc: str) -> tuple[str, flags.FlagValues]:
    """parse_flags for a program whose first argument names a command, each with flags of its own:
    (the command, its parsed flags). A flag of another command is refused, naming that command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in commands:
        if _wants_help(args):
            _print_help(doc, [(f"{name} flags ({c.help})", c.flags, c.required) for name, c in commands.items()])
        got = f", got {args[0]!r}" if args else ""
        fail(f"expected a command first, one of {', '.join(commands)}{got} (--help lists each one's flags)")
    name, command = args[0], commands[args[0]]
    if _wants_help(args[1:]):
        _print_help(doc, [(f"{name} flags ({command.help})", command.flags, command.required)])
    others = {other: c.flags for other, c in commands.items() if other != name}
    rest = _parse(command.flags, [name, *args[1:]], others=others)[1:]
    _check_parsed(command.flags, rest, command.required, f"{name}: ")
    return name, command.flags


def _check_parsed(fv: flags.FlagValues, rest: list[str], required: Sequence[str], where: str = "") -> None:
    if rest:  # what absl found to be no flag: these programs take flags only
        fail(f"{where}unexpected argument {rest[0]!r}: expected --flag=value (--help lists the flags)")
    missing = [f"--{name}" for name in required if fv[name].value is None]
    if missing:
        fail(f"{where}{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (--help lists the flags)")


def _print_help(doc: str, sections: list[tuple[str, flags.FlagValues, Sequence[str]]]) -> None:
    """`doc`, then each section's flags as `--name: help (default: ...)`; exits 0."""
    lines = [(doc or "").strip(), ""]  # no docstrings under python -OO
    for title, fv, required in sections:
        lines.append(f"{title}:")
        for name in fv:
            flag = fv[name]
            if name != flag.name:  # a short name of a flag already listed
                continue
            notes = ["required"] if name in required else []
            default = ("true" if flag.default else None) if flag.boolean else flag.default
            if default not in (None, "", []):
                notes.append(f"default: {default}")
            text = f"--{'[no]' if flag.boolean else ''}{name}: {' '.join((flag.help or '').split())}" + (
                f" ({'; '.join(notes)})" if notes else "")
            lines += textwrap.wrap(text, 100, initial_indent="  ", subsequent_indent="      ")
        lines.append("")
    print("\n".join(lines).rstrip())
    sys.exit(0)


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
