"""The package's layout: the import-linter contracts hold, no function-local kit imports, a docstring per module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "edgeshard_kit"
MODULES = sorted(PKG.rglob("*.py"))


def _kit_imports_in_functions(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of edgeshard_kit made inside a function or method."""
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("edgeshard_kit")):
                    out.append((node.lineno, node.module or "."))
                elif isinstance(node, ast.Import):
                    out += [(node.lineno, a.name) for a in node.names if a.name.startswith("edgeshard_kit")]
    return out


def test_no_function_local_imports_of_the_kit():
    found = []
    for path in MODULES:
        for line, mod in _kit_imports_in_functions(ast.parse(path.read_text())):
            found.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod}")
    assert not found, "function-local imports of the kit's own modules:\n" + "\n".join(found)


def test_every_module_starts_with_a_docstring():
    missing = [str(p.relative_to(PKG.parent)) for p in MODULES if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_subpackages_show_the_method():
    subs = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert {"core", "model", "profiling", "testbed", "planning", "runtime", "experiments", "bench", "cli"} <= subs
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == {"__init__", "__main__"}, f"modules left at the top level: {sorted(top - {'__init__', '__main__'})}"


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("lint-imports (import-linter) is not installed: pip install -e '.[dev]'")
    res = subprocess.run([exe, "--no-cache"], cwd=PKG.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def _imported_after(code: str) -> set[str]:
    res = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, cwd=PKG.parent)
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


def test_the_planner_never_loads_torch():
    mods = _imported_after("import edgeshard_kit.planning.dp, edgeshard_kit.planning.baselines, "
                           "edgeshard_kit.planning.schedule, edgeshard_kit.planning.build")
    assert "torch" not in mods


def test_results_list_does_not_load_torch():
    mods = _imported_after("from edgeshard_kit.cli.main import main\n"
                           "import contextlib, io\n"
                           "with contextlib.redirect_stdout(io.StringIO()):\n"
                           "    main(['results', 'list', '--root', '/nonexistent-results'])")
    assert "torch" not in mods
