"""The repository contract: environment.yml mirrors pyproject.toml; the CLI entry points work."""

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pip_deps_of_environment() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml must have one pip: section"
    return {p.replace(" ", "") for p in pips[0] if not p.startswith("-e")}


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    wanted = {p.replace(" ", "") for p in wanted}
    have = _pip_deps_of_environment()
    assert have == wanted, f"only in pyproject: {sorted(wanted - have)}; only in environment.yml: {sorted(have - wanted)}"


def test_cli_entry_points():
    for cmd in ([sys.executable, "-m", "edgeshard_kit", "--version"],):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert out.stdout.startswith("edgeshard-kit ")


def test_ci_runs_make_test():
    text = (ROOT / ".ci" / "run").read_text()
    assert "make test" in text and "|| true" not in text


def test_every_command_module_registers_commands():
    import importlib

    from edgeshard_kit.cli.main import COMMAND_MODULES, build_parser

    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        assert hasattr(mod, "add_commands") or hasattr(mod, "add_bench_commands"), name
    build_parser()  # every module imports and registers without error
