"""Run folders: `results/<run-id>/` with manifest.json, tidy CSVs (one row per measurement) and HTML figures."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.io import read_json, to_jsonable, write_rows

# Libraries whose versions every manifest records (a result is only comparable with the same stack).
LIBRARIES = ("edgeshard-kit", "torch", "transformers", "safetensors", "tokenizers", "numpy", "pandas",
             "plotly", "paramiko", "papermill", "nbformat", "ipywidgets")
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


def save_figure(fig: Any, path: str | Path, include_plotlyjs: Any = "directory") -> Path:
    """Write a plotly figure as standalone HTML; plotly.js goes once per folder (plotly.min.js beside it): offline."""
    path = Path(path)
    if path.suffix != ".html":
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=include_plotlyjs, full_html=True)
    return path


class Run:
    """One run folder being written: CSVs, figures, JSON files; the manifest is kept up to date."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    @property
    def id(self) -> str:
        return self.manifest["run_id"]

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

    def save_figure(self, name: str, fig: Any) -> Path:
        """Save a plotly figure as standalone HTML `<name>.html` next to the CSVs."""
        path = save_figure(fig, self.path / _with_suffix(name, ".html"))
        self._add_file("figures", path)
        return path

    def finish(self, status: str = "ok", **summary: Any) -> Path:
        """Mark the run finished (time, status, optional summary) and return its folder."""
        self.manifest["finished_utc"] = _now()
        self.manifest["status"] = status
        if summary:
            self.manifest.setdefault("summary", {}).update(to_jsonable(summary))
        self._write_manifest()
        return self.path

    def _add_file(self, kind: str, path: Path) -> None:
        files = self.manifest.setdefault("files", {}).setdefault(kind, [])
        if path.name not in files:
            files.append(path.name)
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
    """Create `root/<run-id>/` (or exactly `out` when given) with a manifest; extra fields go into it."""
    path = Path(out) if out else Path(root) / make_run_id(name)
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"run_id": path.name, "name": name, "started_utc": _now(), "finished_utc": None,
                "status": "running", "git_commit": git_commit(), "versions": library_versions(),
                "host": host_info(), "command": " ".join(sys.argv), "parameters": to_jsonable(params or {}),
                "seeds": None, "testbed": None, "profiles": None, "plan": None, "files": {}}
    old = path / MANIFEST
    if old.exists():  # re-using a folder (papermill output dir): keep what earlier steps listed
        manifest["files"] = read_json(old, "run manifest ").get("files", {})
    manifest.update({k: to_jsonable(v) for k, v in fields.items()})
    run = Run(path, manifest)
    run._write_manifest()
    return run


def load_run(path: str | Path) -> dict:
    """Read a run folder: {"manifest": dict, "<csv stem>": DataFrame, ...}."""
    import pandas as pd
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise KitError(f"{path}: not a run folder (no {MANIFEST})")
    out: dict[str, Any] = {"manifest": read_json(path / MANIFEST, "run manifest ")}
    for table in sorted(path.glob("*.csv")):
        out[table.stem] = pd.read_csv(table)
    return out


def list_runs(root: str | Path = "results") -> list[dict]:
    """Run folders under `root` (also one level deeper, for notebook runs), oldest first."""
    root = Path(root)
    rows = []
    for man in sorted(list(root.glob(f"*/{MANIFEST}")) + list(root.glob(f"*/*/{MANIFEST}"))):
        try:
            m = json.loads(man.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a folder being written or broken: listing skips it, `show` names the problem
        files = m.get("files", {})
        rows.append({"run": str(man.parent.relative_to(root)), "name": m.get("name"), "status": m.get("status"),
                     "started_utc": m.get("started_utc"), "git_commit": (m.get("git_commit") or "")[:12],
                     "csvs": len(files.get("csv", [])), "figures": len(files.get("figures", [])),
                     "path": str(man.parent)})
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
