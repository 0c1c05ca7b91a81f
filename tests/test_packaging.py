"""The package metadata installs: every pin of the core requirements and of every extra resolves on
the package index (pip's resolver, --dry-run), so a pin that does not exist fails here, not for a
user on a fresh machine. Its console scripts run, and CI runs exactly the README's test command."""
import json
import os
import re
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_every_pin_and_extra_resolves_on_the_index(tmp_path):
    project = _project()
    extras = sorted(project["optional-dependencies"])
    assert {"test", "tpu", "gcs"} <= set(extras)
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         f"{REPO}[{','.join(extras)}]"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    pins = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    for pin in pins:
        name, _, version = pin.partition("==")
        assert version, f"{pin}: every requirement is pinned"
        got = resolved.get(name.lower().replace("_", "-"), "")
        assert got.split("+")[0] == version, (pin, got)  # a local build tag (torch's +cpu) is the same release


def test_console_scripts_are_installed_and_answer_help():
    bin_dir = os.path.dirname(sys.executable)
    scripts = _project()["scripts"]
    assert {"owl-train", "owl-generate", "owl-convert"} <= set(scripts)
    for name in scripts:
        proc = subprocess.run([os.path.join(bin_dir, name), "--help"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert "--" in proc.stdout, (name, proc.stdout[:500])  # a usage that lists flags


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", open(os.path.join(REPO, "README.md")).read(), re.S)
    (command,) = [b.strip() for b in blocks if "pytest" in b and "pip install" in b][:1]
    assert command in open(os.path.join(REPO, ".ci", "run")).read().splitlines()
    assert "ruff check ." in command
