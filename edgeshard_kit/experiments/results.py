"""Run folders: `results/<run-id>/` with manifest.json, tidy CSVs (one row per measurement) and figures (HTML
sharing one plotly.js per results root, plus PNG/SVG/PDF). A run is "running" until `finish`; an exception in the
experiment (in a `with` block, an `@experiment` function, a notebook cell, or one that ends the process) records
it "failed" with the error."""

from __future__ import annotations

import atexit
import datetime as _dt
import functools
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json, to_jsonable, write_rows
from edgeshard_kit.experiments.figure_files import export_static, write_html

# Libraries whose versions every manifest records (a result is only comparable with the same stack).
LIBRARIES = ("edgeshard-kit", "torch", "transformers", "safetensors", "tokenizers", "numpy", "pandas",
             "plotly", "kaleido", "paramiko", "papermill", "nbformat", "ipywidgets")
MANIFEST = "manifest.json"


@dataclass
class Outcome:
    """What an experiment hands a notebook or a command: its run folder, tidy tables, figures, a summary table."""

    path: Path
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    summary: Any = None


def git_commit(where: Path | None = None) -> str:
    """The commit of the kit's repository (with "+dirty" when modified), or "unknown" when not a repo."""
    where = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on (None when absent)."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_info() -> dict:
    """Where the run happened: host name, OS, CPU count, memory (bytes)."""
    info = {"hostname": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python_executable": sys.executable}
    try:
        import psutil
        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def make_run_id(name: str, when: _dt.datetime | None = None) -> str:
    """UTC timestamp + short name, e.g. 20261122T061500Z-demo (sorts by time)."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:40] or "run"
    return f"{when:%Y%m%dT%H%M%S}Z-{slug}"


def save_figure(fig: Any, path: str | Path, standalone: bool = False, js_dir: str | Path | None = None,
                static: bool = True) -> Path:
    """Write a plotly figure as HTML at `path` (figure_files.write_html) and, with `static`, as PNG/SVG/PDF beside it.

    Not standalone: the page loads plotly.js shared in `js_dir` (default its folder); standalone: inline
    (~4.8 MB, opens alone offline). When no Chrome/Chromium is found the static copies are skipped with one line
    on stderr saying why.
    """
    path = write_html(fig, path, standalone=standalone, js_dir=js_dir)
    if static:
        _, why = export_static([(fig, path)])
        _say_skipped(why)
    return path


_SKIP_SAID: set[str] = set()


def _say_skipped(why: str) -> None:
    if why and why not in _SKIP_SAID:  # one line per reason and process
        _SKIP_SAID.add(why)
        print(f"edgeshard: figures written as HTML only: {why}", file=sys.stderr)


class Run:
    """One run folder being written: CSVs, figures, JSON files; the manifest is kept up to date."""

    def __init__(self, path: Path, manifest: dict, js_dir: Path | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self.js_dir = Path(js_dir) if js_dir else self.path  # where the figures' shared plotly.js lies
        self._pending: list[tuple[Any, Path]] = []  # figures whose PNG/SVG/PDF `finish` writes (one browser)

    @property
    def id(self) -> str:
        return self.manifest["run_id"]

    @property
    def status(self) -> str:
        return self.manifest.get("status", "running")

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, etype, exc, tb) -> bool:
        if exc is not None:
            self.fail(exc)
        elif self.status == "running":
            self.finish()
        return False

    def record(self, **fields: Any) -> None:
        """Add fields to the manifest (testbed, profiles, plan, seeds, ...) and rewrite it."""
        for k, v in fields.items():
            self.manifest[k] = to_jsonable(v)
        self._write_manifest()

    def write_csv(self, name: str, records: Any) -> Path:
        """Write a tidy CSV `<name>.csv` from a list of dicts or a DataFrame; returns its path."""
        path = self.path / _with_suffix(name, ".csv")
        if type(records).__name__ == "DataFrame":
            records.to_csv(path, index=False)
        else:  # every key of every record is a column, in order of first appearance
            rows = [to_jsonable(r) for r in records]
            write_rows(rows, path, list(dict.fromkeys(k for r in rows for k in r)))
        self._add_file("csv", path)
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        """Write `<name>.json` (plans, profiles, testbeds ...); returns its path."""
        path = self.path / _with_suffix(name, ".json")
        path.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
        self._add_file("json", path)
        return path

    def save_figure(self, name: str, fig: Any, standalone: bool = False) -> Path:
        """Save a plotly figure as `<name>.html` next to the CSVs (plotly.js shared in the results root, or inline
        with `standalone`); its PNG/SVG/PDF copies are written by `finish` (or `export_figures`)."""
        path = save_figure(fig, self.path / _with_suffix(name, ".html"), standalone=standalone,
                           js_dir=self.js_dir, static=False)
        self._pending = [(f, p) for f, p in self._pending if p != path] + [(fig, path)]
        self._add_file("figures", path)
        return path

    def export_figures(self) -> list[Path]:
        """Write the PNG/SVG/PDF copies of the figures saved so far (one browser for all); returns the files.

        Without kaleido or a Chrome/Chromium: nothing, the reason in the manifest ("static_figures") and one
        line on stderr."""
        items, self._pending = self._pending, []
        if not items:
            return []
        written, why = export_static(items)
        for p in written:
            self._add_file("static_figures", p, write=False)
        self.manifest["static_figures_skipped"] = why or None
        self._write_manifest()
        _say_skipped(why)
        return written

    def finish(self, status: str = "ok", **summary: Any) -> Path:
        """Mark the run finished (time, status, optional summary), write the figures' static copies, return the folder."""
        if status != "failed":
            self.export_figures()
            self.manifest["error"] = None
        self.manifest["finished_utc"] = _now()
        self.manifest["status"] = status
        if summary:
            self.manifest.setdefault("summary", {}).update(to_jsonable(summary))
            if status == "failed" and summary.get("error"):
                self.manifest["error"] = str(summary["error"])
        self._write_manifest()
        _OPEN.discard(self)
        return self.path

    def fail(self, error: Any, export: bool = True) -> Path:
        """Mark the run failed with `error` (an exception or a line); figures saved so far keep their static copies."""
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if export:
            try:
                self.export_figures()
            except Exception:  # noqa: BLE001  the run's own error is the one to record
                pass
        self.manifest["error"] = str(error).strip()
        return self.finish("failed")
    def _add_file(self, kind: str, path: Path, write: bool = True) -> None:
        files = self.manifest.setdefault("files", {}).setdefault(kind, [])
        if path.name not in files:
            files.append(path.name)
        if write:
            self._write_manifest()

    def _write_manifest(self) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        tmp.replace(self.path / MANIFEST)  # atomic: a reader never sees half a manifest

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def _with_suffix(name: str, suffix: str) -> str:
    if "/" in name or name.startswith("."):
        raise KitError(f"result file name {name!r} must be a plain name (no folders)")
    return name if name.endswith(suffix) else name + suffix


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run(name: str, params: dict | None = None, root: str | Path = "results", out: str | Path | None = None,
            **fields: Any) -> Run:
    """Create `root/<run-id>/` (or exactly `out` when given) with a manifest; extra fields go into it.

    The run is "running" until `finish`. Use it as `with new_run(...) as run:` (or pass it to an `@experiment`
    function) so that an exception records it "failed" with the error; in a notebook an exception in any later
    cell does so too, and a process that exits without finishing it leaves it "failed" as well. Figures share one
    plotly.js in `root` when the run folder lies under it (in the run folder otherwise).
    """
    path = Path(out) if out else Path(root) / make_run_id(name)
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"run_id": path.name, "name": name, "started_utc": _now(), "finished_utc": None,
                "status": "running", "error": None, "pid": os.getpid(), "git_commit": git_commit(),
                "versions": library_versions(), "host": host_info(), "command": " ".join(sys.argv),
                "parameters": to_jsonable(params or {}), "seeds": None, "testbed": None, "profiles": None,
                "plan": None, "files": {}}
    old = path / MANIFEST
    if old.exists():  # re-using a folder (papermill output dir): keep what earlier steps listed
        manifest["files"] = read_json(old, "run manifest ").get("files", {})
    manifest.update({k: to_jsonable(v) for k, v in fields.items()})
    root_abs, path_abs = Path(root).resolve(), path.resolve()
    js_dir = root_abs if root_abs in path_abs.parents else path_abs
    run = Run(path, manifest, js_dir)
    run._write_manifest()
    _OPEN.add(run)
    _watch_notebook_cells(run)
    return run


def experiment(fn: Callable) -> Callable:
    """Decorator for an experiment that writes into a Run given as an argument: an exception marks that run
    failed (with the error) before it propagates."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, Run) and a.status == "running":
                    a.fail(e)
            raise
    return wrapper


# Runs of this process not yet finished: the process's end records them failed (with an uncaught exception's text).
_OPEN: set[Run] = set()
_LAST_ERROR: list[str] = []
_IPY_HOOK: list = []


def fail_open_runs(error: str | None = None) -> None:
    """Record every run of this process that is still running as failed with `error` (a command's error handler
    calls it; at exit it runs with the uncaught exception's text, or "the process exited ...")."""
    why = error or (_LAST_ERROR[-1] if _LAST_ERROR else "the process exited before the run finished")
    for run in list(_OPEN):
        if run.status == "running":
            try:
                run.fail(why, export=False)
            except OSError:
                pass


def _excepthook(etype, value, tb, _prev=sys.excepthook) -> None:
    _LAST_ERROR.append(f"{etype.__name__}: {(str(value).strip().splitlines() or [''])[0]}")
    _prev(etype, value, tb)


atexit.register(fail_open_runs)
sys.excepthook = _excepthook


def _watch_notebook_cells(run: Run) -> None:
    """In IPython/Jupyter: a cell that raises while `run` is running records it failed (the latest run only)."""
    ipy_mod = sys.modules.get("IPython")
    ip = ipy_mod.get_ipython() if ipy_mod is not None and hasattr(ipy_mod, "get_ipython") else None
    if ip is None or not hasattr(ip, "events"):
        return

    def post_run_cell(result, _run=run) -> None:
        err = getattr(result, "error_in_exec", None)
        if err is not None and _run.status == "running":
            _run.fail(err)

    for old in _IPY_HOOK:
        try:
            ip.events.unregister("post_run_cell", old)
        except ValueError:
            pass
    _IPY_HOOK[:] = [post_run_cell]
    ip.events.register("post_run_cell", post_run_cell)


def load_run(path: str | Path) -> dict:
    """Read a run folder: {"manifest": dict, "<csv stem>": DataFrame, ...} (CSVs of the folder itself)."""
    import pandas as pd
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise KitError(f"{path}: not a run folder (no {MANIFEST})")
    out: dict[str, Any] = {"manifest": read_json(path / MANIFEST, "run manifest ")}
    for table in sorted(path.glob("*.csv")):
        out[table.stem] = pd.read_csv(table)
    return out


def _process_gone(m: dict) -> bool:
    """A run "running" on this host whose process no longer exists (killed, crashed)."""
    pid = m.get("pid")
    if m.get("status") != "running" or not isinstance(pid, int) or (m.get("host") or {}).get("hostname") != platform.node():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def list_runs(root: str | Path = "results") -> list[dict]:
    """Run folders under `root` (also one level deeper, for notebook runs), oldest first.

    csvs / figures: the CSV and HTML files in the folder and its subfolders (what is on disk, not only what the
    manifest lists). status: as recorded; "failed" with error "process ended ..." for a running run whose
    process on this host is gone.
    """
    root = Path(root)
    rows = []
    for man in sorted(list(root.glob(f"*/{MANIFEST}")) + list(root.glob(f"*/*/{MANIFEST}"))):
        try:
            m = json.loads(man.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a folder being written or broken: listing skips it, `show` names the problem
        status, error = m.get("status"), m.get("error") or ""
        if _process_gone(m):
            status, error = "failed", f"process {m['pid']} ended before the run finished"
        folder = man.parent
        rows.append({"run": str(folder.relative_to(root)), "name": m.get("name"), "status": status,
                     "started_utc": m.get("started_utc"), "git_commit": (m.get("git_commit") or "")[:12],
                     "csvs": sum(1 for _ in folder.rglob("*.csv")),
                     "figures": sum(1 for _ in folder.rglob("*.html")),
                     "error": error, "path": str(folder)})
    return rows


def find_run(run: str | Path, root: str | Path = "results") -> Path:
    """The run folder meant by `run`: a folder, a run id under `root`, or a unique prefix / suffix of one."""
    p = Path(run)
    if (p / MANIFEST).is_file():
        return p
    if (Path(root) / run / MANIFEST).is_file():
        return Path(root) / run
    hits = [Path(r["path"]) for r in list_runs(root) if r["run"].startswith(str(run)) or r["run"].endswith(str(run))]
    if len(hits) == 1:
        return hits[0]
    raise KitError(f"run {str(run)!r}: " + ("ambiguous, matches " + ", ".join(map(str, hits)) if hits
                                            else f"no such run folder under {root}"))
