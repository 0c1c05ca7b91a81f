"""Every command the docs show is one the code accepts.

The shell code blocks of README.md and docs/*.md are read, and each command in them that runs
`python -m owl_jax.<module>` or a launcher under launch/ is checked against the real entry point,
without running the job:

* absl.app programs (owl_jax.train, owl_jax.demo.run, owl_jax.demo.towers, owl_jax.aot): the module's own
  `_define_flags()` on a fresh FlagValues, then absl's parse of the arguments: the config file loaded
  with its `:arg`, and every `--config.x=y` override applied (a field the config lacks fails). Then
  what the program refuses before its first step: owl_jax.train's `validate_config`, the model
  config, the stage, and for a `tfds` dataset its tokenizer (`pipeline.resolve_tokenizer_path`) and
  split; for the demo's programs, the train config of each stage and of the LLM tower as the job
  builds them.
* programs with flags of their own (owl_jax.convert, .generate, .evaluate, .data.prepare, ...: an absl
  FlagValues each, parsed by `owl_jax.cli.parse_flags` or `parse_command`): `main(args)`, stopped
  right after that parse succeeds, so the required flags and a command's flags are checked too.
* launchers: run with `--dry-run` (or `DRY_RUN=1`); every `python -m owl_jax...` command they print
  is checked as above.

Shell variables that a doc's code block assigns (`DATA1="..."`) are expanded in every doc's
commands. Placeholders (gs://BUCKET, PATH/...) are fine as values: nothing is read or written.

To check other markdown, e.g. an older README::

    git show HEAD~1:README.md > /tmp/README.md && python tests/test_docs_commands.py /tmp/README.md
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
from unittest import mock

import pytest

# ml_collections loads config files with a loader method that Python 3.12 removes.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console", "zsh")
OPERATORS = {"&&", "||", ";", "|", "&"}
# Flags each absl program cannot run without: what its `__main__` marks required (train, aot) or
# its main() refuses to start without (train, run: --workdir).
REQUIRED_FLAGS = {"owl_jax.train": ("config", "workdir"), "owl_jax.aot": ("config",), "owl_jax.demo.run": ("workdir",),
                  "owl_jax.demo.towers": ("workdir",)}
# The splits `python -m owl_jax.data.prepare` builds for owl_jsonl (owl_jax/data/prepare.py,
# prepare_owl_jsonl): `train` from --jsonl, `validation` from --val_jsonl.
OWL_JSONL_SPLITS = ("train", "validation")


class CommandError(Exception):
    """What the real entry point refused, in its own words where it has them."""


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # FILE:LINE of the command's first line
    kind: str  # "module" (python -m owl_jax.X) or "launcher" (launch/X)
    target: str  # the module name or the launcher's path relative to the repository
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        head = f"python -m {self.target}" if self.kind == "module" else self.target
        return f"{self.where}: {head} {shlex.join(self.args)}"


# ------------------------------------------------------------------------------ reading markdown


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first line, body) of every fenced shell code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*```\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
        if m.group(1).lower() in SHELL_LANGUAGES:
            blocks.append((i + 2, "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def logical_lines(body: str, first_line: int) -> list[tuple[int, str]]:
    """Lines with their backslash-newline continuations joined (as the shell reads them, inside
    double quotes too), each with the number of its first physical line."""
    out, pending, start = [], "", None
    for n, line in enumerate(body.splitlines(), first_line):
        if start is None:
            start = n
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def shell_words(line: str) -> list[str]:
    """Words as the shell splits them, with `&&`, `|`, `;`, `(`, ... as words of their own and
    comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
MENTION = re.compile(r"-m\s+owl_jax|(^|\s)launch/")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def variables_of(paths: list[str]) -> dict[str, str]:
    """NAME -> value of every `NAME="..."` line in the files' shell blocks (the first one wins)."""
    found = {}
    for path in paths:
        with open(path) as f:
            text = f.read()
        for first, body in shell_blocks(text):
            for _, line in logical_lines(body, first):
                m = ASSIGNMENT.match(line.strip())
                if m:
                    words = shell_words(m.group(2))
                    found.setdefault(m.group(1), words[0] if words else "")
    return found


def _is_python(word: str) -> bool:
    return re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", word) is not None


def commands_in(text: str, name: str, variables: dict[str, str]) -> list[Command]:
    """The owl_jax and launcher commands of a markdown text. A shell line that mentions
    `-m owl_jax` or `launch/` but yields no command is an error: nothing a doc shows goes unchecked."""
    commands = []
    for first, body in shell_blocks(text):
        for n, line in logical_lines(body, first):
            try:
                words = shell_words(line)  # comments dropped
            except ValueError as e:  # an unclosed quote: prose in an unlabelled block, or a broken command
                if MENTION.search(line):
                    raise CommandError(f"{name}:{n}: {e}: {line}") from None
                continue
            if not MENTION.search(" ".join(words)):
                continue

            def expand(m, n=n):
                var = m.group(1) or m.group(2)
                if var not in variables:
                    raise CommandError(f"{name}:{n}: uses ${var}, which no doc's code block defines")
                return variables[var]

            found, simple = [], []
            for word in shell_words(VARIABLE.sub(expand, line)) + [";"]:
                if word not in OPERATORS:
                    simple.append(word)
                    continue
                command = _classify(simple, f"{name}:{n}")
                if command is not None:
                    found.append(command)
                simple = []
            if not found:
                raise CommandError(
                    f"{name}:{n}: mentions owl_jax or a launcher, but no command was recognised in: {line}"
                )
            commands += found
    return commands


def _classify(words: list[str], where: str) -> Command | None:
    env = []
    while words and ASSIGNMENT.match(words[0]):
        env.append(tuple(words[0].split("=", 1)))
        words = words[1:]
    if len(words) >= 3 and _is_python(words[0]) and words[1] == "-m" and words[2].startswith("owl_jax"):
        return Command(where, "module", words[2], tuple(words[3:]), tuple(env))
    if words and words[0] == "sbatch":  # sbatch [its options] SCRIPT [script args]
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]
    elif words and words[0] == "bash":
        words = words[1:]
    if words and words[0].startswith("launch/"):
        return Command(where, "launcher", words[0], tuple(words[1:]), tuple(env))
    return None


def doc_commands(paths: list[str] = DOCS) -> list[Command]:
    variables = variables_of(paths + [p for p in DOCS if p not in paths])
    commands = []
    for path in paths:
        with open(path) as f:
            name = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
            commands += commands_in(f.read(), name, variables)
    return commands


# ------------------------------------------------------------------------------ absl programs


def _with_flag_values(fn, fv):
    """`fn` (an absl/config_flags DEFINE or mark function) defining on `fv` unless told otherwise."""
    signature = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        if "flag_values" not in signature.bind_partial(*args, **kwargs).arguments:
            kwargs["flag_values"] = fv
        return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _flags_on(fv, argv: list[str]):
    """absl's and config_flags' definitions go to `fv`, not the process-wide FLAGS (other tests
    share this process), and owl_jax modules' `FLAGS` is `fv`. sys.argv is `argv`: config_flags
    reads a config's overrides from it, when the flag's default is set and when it is parsed."""
    import grain  # noqa: F401 - defines its own absl flags at import: they must land in FLAGS, not `fv`
    from absl import flags
    from ml_collections import config_flags

    with contextlib.ExitStack() as stack:
        for owner in (flags, config_flags):
            for name in dir(owner):
                fn = getattr(owner, name)
                if not (callable(fn) and (name.startswith(("DEFINE", "mark_")) or name == "adopt_module_key_flags")):
                    continue
                try:
                    takes_flag_values = "flag_values" in inspect.signature(fn).parameters
                except (TypeError, ValueError):
                    continue
                if takes_flag_values:
                    stack.enter_context(mock.patch.object(owner, name, _with_flag_values(fn, fv)))
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("owl_jax") and getattr(module, "FLAGS", None) is flags.FLAGS:
                stack.enter_context(mock.patch.object(module, "FLAGS", fv))
        stack.enter_context(mock.patch.object(sys, "argv", argv))
        yield


def parse_absl(module, name: str, args: list[str]):
    """The program's flags parsed from `args` as absl.app would: returns the FlagValues."""
    from absl import flags

    fv = flags.FlagValues()
    argv = [f"python -m {name}", *args]
    with _flags_on(fv, argv):
        try:
            module._define_flags()
            rest = fv(argv)
            if "config" in fv and fv["config"].value is not None:
                fv["config"].value.keys()  # config_flags defers a failed load until the first use
        except flags.Error as e:
            raise CommandError(str(e)) from e
        except AttributeError as e:  # ml_collections: an override that names no field
            hint = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
            raise CommandError(f"--config: no such field {hint}") from e
        except Exception as e:  # noqa: BLE001 - the config file does not load
            raise CommandError(f"--config: {type(e).__name__}: {e}") from e
    if rest[1:]:
        raise CommandError(f"arguments that are no flag (absl ignores them): {rest[1:]}")
    missing = [f"--{flag}" for flag in REQUIRED_FLAGS.get(name, ()) if fv[flag].value in (None, "")]
    if missing:
        raise CommandError(f"missing {', '.join(missing)}")
    return fv


def training_config_problems(config) -> list[str]:
    """What owl_jax.train refuses before its first step, for a config that parsed."""
    from owl_jax import train
    from owl_jax.cli import UserError
    from owl_jax.models.config import owl_config_from_dict
    from owl_jax.training.stages import trainable_patterns

    config = config.copy_and_resolve_references()
    problems = []
    checks = [
        lambda: train.validate_config(config),
        lambda: owl_config_from_dict(config.model.to_dict()),
        lambda: trainable_patterns(
            config.stage, config.get("train_abstractor", False), config.get("extra_trainable", ())
        ),
    ]
    for check in checks:
        try:
            check()
        except (UserError, ValueError, TypeError) as e:
            problems.append(str(e))
    data = config.data
    if data.source == "tfds":
        from owl_jax.data.pipeline import resolve_tokenizer_path

        try:
            resolve_tokenizer_path(data)
        except UserError as e:
            problems.append(str(e))
        if data.dataset == "owl_jsonl":
            splits = OWL_JSONL_SPLITS
        elif data.dataset == "shapesworld":
            from owl_jax.demo.scenes import SPLITS as splits
        else:
            splits = None
            problems.append(
                f"config.data.dataset={data.dataset!r}: owl_jax.data.prepare builds 'owl_jsonl', "
                "owl_jax.demo.dataset 'shapesworld'"
            )
        if splits is not None and data.split not in splits:
            problems.append(f"config.data.split={data.split!r}: {data.dataset} has the splits {list(splits)}")
    elif data.source != "synthetic":
        problems.append(f"config.data.source={data.source!r}: expected 'tfds' or 'synthetic'")
    return problems


def check_absl(module, name: str, args: list[str]) -> None:
    fv = parse_absl(module, name, args)
    problems = []
    if name in ("owl_jax.train", "owl_jax.aot"):
        problems += training_config_problems(fv.config)
    if name == "owl_jax.aot":
        generation = fv.topology.split(":")[0].lower()
        if generation not in module.HBM_BYTES or not re.fullmatch(r"[^:]+:\d+(x\d+)+", fv.topology):
            problems.append(f"--topology={fv.topology}: expected GENERATION:AxB[xC] with a generation of "
                            f"{sorted(module.HBM_BYTES)}")
    if name in ("owl_jax.demo.run", "owl_jax.demo.towers"):
        from owl_jax.cli import UserError
        from owl_jax.demo import jobs, run

        try:
            job = jobs.resolve_config(fv.config, fv.quick)
            for stage in run.STAGES:  # each stage's owl_jax.train config, as the job builds it
                problems += [f"stages.{stage}: {p}" for p in
                             training_config_problems(run.stage_config(job, stage, "DATA", ""))]
            llm = jobs.train_config(job.model, job.towers.llm, "towers.llm", "DATA", "")
            problems += [f"towers.llm: {p}" for p in training_config_problems(llm)]
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise CommandError("; ".join(problems))


# ------------------------------------------------------------------ programs with their own flags


class _Parsed(Exception):
    pass


def check_own_flags(module, name: str, args: list[str]):
    """`module.main(args)`, stopped right after owl_jax.cli parsed its flags: returns what the parse
    returned (the FlagValues, or the command and its FlagValues)."""
    from owl_jax import cli

    def parse_then_stop(parse):
        def wrapped(*a, **kw):
            raise _Parsed(parse(*a, **kw))

        return wrapped

    err = io.StringIO()
    with contextlib.ExitStack() as stack:
        for parse in (cli.parse_flags, cli.parse_command):  # also where a program imported it by name
            for module_name, owner in list(sys.modules.items()):
                if module_name.startswith("owl_jax") and getattr(owner, parse.__name__, None) is parse:
                    stack.enter_context(mock.patch.object(owner, parse.__name__, parse_then_stop(parse)))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        try:
            module.main(list(args))
        except _Parsed as parsed:
            return parsed.args[0]
        except SystemExit as e:
            lines = err.getvalue().strip().splitlines()
            raise CommandError(lines[-1] if lines else f"exit status {e.code}") from None
    raise CommandError(f"{name}: main() returned without parsing its arguments")


def check_module(name: str, args: list[str]) -> None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        raise CommandError(f"no module {name}")
    module = importlib.import_module(name + ".__main__" if spec.submodule_search_locations else name)
    if hasattr(module, "_define_flags"):
        check_absl(module, name, args)
    elif hasattr(module, "main"):
        check_own_flags(module, name, args)
    else:
        raise CommandError(f"{name} has neither _define_flags() (absl.app) nor main(argv) (its own flags)")


# ---------------------------------------------------------------------------------- launchers


def printed_invocations(output: str) -> list[tuple[str, list[str]]]:
    """(module, args) of every `python -m owl_jax.X ...` in a launcher's dry-run output, also those
    inside a quoted remote command (tpu_pod.sh's `--command=...`)."""
    found = []

    def scan(words: list[str]) -> None:
        for i, word in enumerate(words):
            if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("owl_jax"):
                args = []
                for arg in words[i + 2:]:
                    if set(arg) <= set("();<>|&"):
                        break
                    args.append(arg)
                found.append((words[i + 1], args))
            elif re.search(r"\s-m\s+owl_jax", word):
                scan(shell_words(word))

    for line in output.splitlines():
        scan(shlex.split(line))
    return found


def check_launcher(script: str, args: list[str], env: dict[str, str]) -> None:
    path = os.path.join(ROOT, script)
    if not os.path.isfile(path):
        raise CommandError(f"no launcher {script}")
    with open(path) as f:
        source = f.read()
    cmd = ["bash", path]
    if re.search(r"^\s*--dry-run\)", source, re.M):
        cmd.append("--dry-run")
    elif "DRY_RUN" not in source:
        raise CommandError(f"{script} has neither --dry-run nor DRY_RUN=1: it cannot be checked without running it")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**base, **env, "DRY_RUN": "1", "PYTHON": sys.executable})
    if r.returncode != 0:
        raise CommandError(f"{script} --dry-run: exit status {r.returncode}: {r.stderr.strip()}")
    invocations = printed_invocations(r.stdout)
    if not invocations:
        raise CommandError(f"{script} --dry-run printed no `python -m owl_jax...` command:\n{r.stdout}")
    for module, module_args in invocations:
        try:
            check_module(module, module_args)
        except CommandError as e:
            raise CommandError(f"the {module} command it runs: {e}") from None


def check(command: Command) -> None:
    """Raises CommandError with what the real entry point refused."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # the docs' relative paths (configs/...) are relative to the repository
    try:
        if command.kind == "module":
            check_module(command.target, list(command.args))
        else:
            check_launcher(command.target, list(command.args), dict(command.env))
    finally:
        os.chdir(cwd)


# -------------------------------------------------------------------------------------- tests

COMMANDS = doc_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}-{c.target}" for c in COMMANDS])
def test_doc_command_parses(command):
    try:
        check(command)
    except CommandError as e:
        pytest.fail(f"{command}\n  -> {e}", pytrace=False)


def test_docs_show_the_commands_this_test_is_for():
    """The extraction finds what the docs hold: training, conversion, generation, the launchers."""
    targets = {c.target for c in COMMANDS}
    assert {"owl_jax.demo.run", "owl_jax.train", "owl_jax.convert", "owl_jax.generate", "owl_jax.aot",
            "launch/tpu_pod.sh", "launch/gpu_slurm.sbatch"} <= targets
    assert {c.where.split(":")[0] for c in COMMANDS} >= {"README.md", os.path.join("docs", "training_7b.md")}


# The stage-1 command as README.md once showed it: an owl_jsonl dataset without the LLaMA tokenizer
# (and without a split: the default is owl_jsonl's "train").
OLD_STAGE1 = """
```bash
python -m owl_jax.train --config=configs/mplug_owl_llama7b.py:stage1 --workdir=gs://bucket/owl/stage1 \\
    --config.init.params_dir=stage1_init --config.data.source=tfds --config.data.dataset=owl_jsonl \\
    --config.data.dataset_dir=DATA
```
"""


def test_an_owl_jsonl_command_without_tokenizer_is_refused():
    (command,) = commands_in(OLD_STAGE1, "old README.md", {})
    with pytest.raises(CommandError) as e:
        check(command)
    assert "tokenizer_path is required" in str(e.value)
    with pytest.raises(CommandError, match="config.data.split='instructions_train'"):
        check(dataclasses.replace(command, args=command.args + ("--config.data.tokenizer_path=/ckpt/llama-7b",
                                                                "--config.data.split=instructions_train")))
    check(dataclasses.replace(command, args=command.args + ("--config.data.tokenizer_path=/ckpt/llama-7b",)))


@pytest.mark.parametrize("line, message", [
    ("python -m owl_jax.train --config=configs/tiny.py --workdir=w --config.optim.learning_rate=1", "learning_rate"),
    ("python -m owl_jax.train --config=configs/tiny.py:stage2_lora --workdir=w --epochs=3", "epochs"),
    ("python -m owl_jax.train --config=configs/nope.py --workdir=w", "--config"),
    ("python -m owl_jax.train --config=configs/tiny.py", "--workdir"),
    ("python -m owl_jax.demo.run --workdir=w --config.stages.stage1.steps=3", "steps"),
    ("python -m owl_jax.demo.run --workdir=w --config.stages.stage2.data.split=instructions", "stages.stage2"),
    ("python -m owl_jax.train --config=configs/tiny.py --workdir=w --config.batch_size=0", "batch_size must be >= 1"),
    ("python -m owl_jax.train --config=configs/tiny.py --workdir=w stray", "stray"),
    ("python -m owl_jax.aot --config=configs/tiny.py --topology=v9:2x2", "topology"),
    ("python -m owl_jax.convert from-torch --released R", "--out"),
    ("python -m owl_jax.generate --checkpoint c --prompt p --beams 4", "--beams"),
    ("python -m owl_jax.generate --checkpoint c --prompt p --max-new-tokens 8", "--max-new-tokens"),
    ("python -m owl_jax.generate --prompt p", "--checkpoint"),
    ("python -m owl_jax.convert from-torch --src S --out O", "--src"),
    ("python -m owl_jax.convert to-torch --src S --out O --adapter A", "'A'"),
    ("python -m owl_jax.convert --src S --out O", "from-torch, to-torch"),
    ("python -m owl_jax.evaluate owleval --checkpoint c --data d", "--out"),
    ("python -m owl_jax.evaluate owleval --checkpoint c --data d --out o --top-k 5", "--top-k"),
    ("python -m owl_jax.data.prepare --jsonl=a.jsonl --images=i", "--out"),
    ("python -m owl_jax.data.prepare --jsonl=a.jsonl --images=i --out=o --image_root=i", "--image_root"),
    ("python -m owl_jax.nope --x", "no module"),
    ("sbatch --nodes=1 launch/gpu_slurm.sbatch --workdir=w", "--config"),
    ("launch/tpu_pod.sh --tpu=t --zone=z --accelerator-type=v4-8 --config=configs/tiny.py --workdir=gs://b/w "
     "-- --config.num_step=2", "num_step"),
    ("echo $UNDEFINED_IN_THE_DOCS; python -m owl_jax.demo.run --workdir=w", "UNDEFINED_IN_THE_DOCS"),
])
def test_wrong_commands_are_refused(line, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        for command in commands_in(f"```bash\n{line}\n```\n", "wrong.md", {}):
            check(command)


def main(paths: list[str]) -> int:
    """Checks the commands of the given markdown files; prints one line per command."""
    failed = 0
    try:
        commands = doc_commands([os.path.abspath(p) for p in paths])
    except CommandError as e:
        print(f"FAIL {e}")
        return 1
    for command in commands:
        try:
            check(command)
            print(f"ok   {command}")
        except CommandError as e:
            failed += 1
            print(f"FAIL {command}\n     -> {e}")
    print(f"{len(commands) - failed} of {len(commands)} commands accepted")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main(sys.argv[1:] or DOCS))
