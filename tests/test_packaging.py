"""The package metadata installs: every pin of the core requirements and of every extra resolves on
the package index (pip's resolver, --dry-run), so a pin that does not exist fails here, not for a
user on a fresh machine."""
import json
import os
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


def test_console_scripts_name_callables():
    import importlib

    scripts = _project()["scripts"]
    assert {"owl-train", "owl-generate", "owl-convert"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), (name, target)
