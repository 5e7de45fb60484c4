"""The notebooks run headless (behind `edgeshard run-notebooks`): papermill executes them into one results folder."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments.nbparams import RUN_LOCATION, cell_parameters, check_parameters
from edgeshard_kit.experiments.results import new_run

KERNEL = "edgeshard-kit"
KERNEL_DISPLAY = "edgeshard-kit (.venv)"  # as `make setup` installs it; the notebooks' metadata names it
NOTEBOOKS = {
    "01": "01_profile_testbed.ipynb",
    "02": "02_plan_interactive.ipynb",
    "03": "03_deploy_and_generate.ipynb",
    "04": "04_benchmark_vs_baselines.ipynb",
    "05": "05_paper_reproduction.ipynb",
    "06": "06_adaptive.ipynb",
}


def notebooks_dir() -> Path:
    """The repository's notebooks/ folder (next to the package)."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def ensure_kernel(name: str = KERNEL) -> str:
    """A kernelspec `name` that runs this interpreter; made in a temp folder (JUPYTER_PATH) if absent."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve() or spec.argv[0] == sys.executable:
            return name
    except NoSuchKernel:
        pass
    # The installed spec is missing or runs another Python: point a private one at sys.executable.
    from ipykernel.kernelspec import install
    prefix = tempfile.mkdtemp(prefix="edgeshard-kernel-")
    install(kernel_name=name, display_name=KERNEL_DISPLAY, prefix=prefix)  # the notebooks' name: no change on open
    share = str(Path(prefix) / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (share, os.environ.get("JUPYTER_PATH")) if p)
    return name


def select(only: str | list[str] | None) -> list[str]:
    """Notebook ids from "02,05" (or a list); all five when None."""
    if not only:
        return list(NOTEBOOKS)
    ids = [s.strip().zfill(2) for s in (only.split(",") if isinstance(only, str) else only) if str(s).strip()]
    bad = [i for i in ids if i not in NOTEBOOKS]
    if bad:
        raise KitError(f"--only: unknown notebook id(s) {bad}; choose from {list(NOTEBOOKS)}")
    return ids


def load_params(path: str | Path | None) -> dict[str, dict]:
    """Per-notebook parameters from YAML: top-level keys apply to all, keys "01".."05" to one notebook.

    Returns {"*": common, "02": {...}, ...}, unchecked (run_notebooks checks them against the notebooks).
    """
    if not path:
        return {}
    import yaml
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise KitError(f"--params: {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise KitError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KitError(f"{p}: expected a mapping of parameter names to values")
    common = {k: v for k, v in data.items() if str(k).zfill(2) not in NOTEBOOKS}
    out = {"*": common}
    for k, v in data.items():
        if str(k).zfill(2) in NOTEBOOKS:
            if not isinstance(v, dict):
                raise KitError(f"{p}: section {k!r} must be a mapping of parameters")
            out[str(k).zfill(2)] = v
    return out


def declared_parameters(nb_path: Path) -> set[str]:
    """Names in a notebook's `parameters` cell."""
    return set(cell_parameters(nb_path))


def resolve_params(params: dict[str, dict], ids: list[str], nb_dir: str | Path | None = None,
                   cwd: str | Path | None = None, where: str = "--params") -> dict[str, dict]:
    """Per notebook id, the checked parameters to pass (nbparams.check_parameters), before anything runs.

    Top-level ("*") names apply to every chosen notebook that declares them, and must be declared by one of the
    five; a section's names must be declared by its notebook. KitError of one line naming the parameter.
    """
    nb_dir = Path(nb_dir) if nb_dir else notebooks_dir()
    declared = {nid: cell_parameters(nb_dir / name) if (nb_dir / name).is_file() else {}
                for nid, name in NOTEBOOKS.items()}
    common = params.get("*", {})
    for name in common:
        if not any(name in d for d in declared.values()):
            known = sorted({n for d in declared.values() for n in d} - set(RUN_LOCATION))
            raise KitError(f"{where}: no notebook has a parameter {name!r}; the notebooks declare {', '.join(known)}")
    out = {}
    for nid in ids:
        src = nb_dir / NOTEBOOKS[nid]
        if not src.is_file():
            raise KitError(f"notebook {src} does not exist")
        given = {k: v for k, v in common.items() if k in declared[nid]}
        sect = params.get(nid, {})
        section_where = f"{where}: section {nid!r}" if sect else where
        out[nid] = {**check_parameters(src, given, cwd, where), **check_parameters(src, sect, cwd, section_where)}
    return out


def run_notebooks(out: str | Path | None = None, params: dict[str, dict] | None = None, only: Any = None,
                  root: str | Path = "results", nb_dir: str | Path | None = None, progress: bool = False,
                  log: Callable[[str], None] | None = None, cwd: str | Path | None = None,
                  where: str = "--params") -> Path:
    """Execute the chosen notebooks; each writes `<out>/<stem>/` (its CSVs, figures, the executed notebook).

    `params` (load_params) are checked against each notebook's parameters cell before any runs (resolve_params;
    relative paths against `cwd`, default the current directory; errors start with `where`); the manifest records, per notebook, every
    parameter it ran with (given and default). `log` gets one line per notebook as it starts; `progress` shows
    papermill's per-cell bar.
    """
    import papermill as pm

    nb_dir = Path(nb_dir) if nb_dir else notebooks_dir()
    ids = select(only)
    given = resolve_params(params or {}, ids, nb_dir, cwd, where)
    used = {nid: {**{k: v for k, v in cell_parameters(nb_dir / NOTEBOOKS[nid]).items() if k not in RUN_LOCATION},
                  **given[nid]} for nid in ids}
    run = new_run("notebooks", {"only": ids, "params": used}, root=root, out=out)
    kernel = ensure_kernel()
    done, failed = [], None
    for nid in ids:
        src = nb_dir / NOTEBOOKS[nid]
        dest = run.path / src.stem
        dest.mkdir(parents=True, exist_ok=True)
        values = {**given[nid], "out_dir": str(dest.resolve())}
        if log:
            log(f"[run-notebooks] {src.name} -> {dest}")
        try:
            # cwd = notebooks/ so the notebooks' relative paths mean the same here as in JupyterLab.
            pm.execute_notebook(str(src), str(dest / src.name), parameters=values, kernel_name=kernel,
                                cwd=str(nb_dir), progress_bar=progress)
        except pm.PapermillExecutionError as e:
            failed = f"{src.name}: cell {e.exec_count}: {e.ename}: {e.evalue}".splitlines()[0]
            break
        done.append(src.stem)
    run.record(notebooks=done)
    run.finish(status="failed" if failed else "ok", **({"error": failed} if failed else {}))
    if failed:
        raise KitError(f"notebook failed ({failed}); executed copy in {run.path}")
    return run.path
