"""The `edgeshard results` (list, show, standalone) and `edgeshard run-notebooks` commands: arguments and printing only."""

from __future__ import annotations

import json
from pathlib import Path

from edgeshard_kit.cli.main import COMMANDS
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments.figure_files import make_standalone
from edgeshard_kit.experiments.notebooks import load_params, run_notebooks
from edgeshard_kit.experiments.results import find_run, list_runs, load_run


def _cmd_list(args) -> int:
    import pandas as pd
    rows = list_runs(args.root)
    if not rows:
        print(f"no runs under {args.root}/")
        return 0
    df = pd.DataFrame(rows).drop(columns="path")
    if not df["error"].astype(bool).any():
        df = df.drop(columns="error")
    else:
        df["error"] = df["error"].str.slice(0, 60)
    print(df.to_string(index=False))
    return 0


def _cmd_show(args) -> int:
    data = load_run(find_run(args.run, args.root))
    m = data.pop("manifest")
    print(f"run {m.get('run_id')}  name={m.get('name')}  status={m.get('status')}  commit={m.get('git_commit')}")
    print(f"started {m.get('started_utc')}  finished {m.get('finished_utc')}")
    if m.get("error"):
        print(f"error: {m['error']}")
    print("parameters: " + json.dumps(m.get("parameters", {}))[:500])
    if m.get("summary"):
        print("summary: " + json.dumps(m["summary"])[:1000])
    for stem, frame in data.items():
        print(f"\n{stem}.csv: {len(frame)} rows, columns {list(frame.columns)}")
        print(frame.head(args.rows).to_string(index=False))
    return 0


def _cmd_standalone(args) -> int:
    folder = find_run(args.run, args.root)
    names = args.figures or [p.stem for p in sorted(folder.glob("*.html"))]
    if not names:
        raise KitError(f"{folder}: no HTML figures")
    for name in names:
        path = folder / (name if name.endswith(".html") else name + ".html")
        out = make_standalone(path)
        print(f"{out}: self-contained ({out.stat().st_size / 2**20:.1f} MiB, plotly.js inline), opens alone offline")
    return 0


def _cmd_run_notebooks(args) -> int:
    # parameters are checked before any notebook runs; relative paths in them are taken from this directory
    path = run_notebooks(out=args.out, params=load_params(args.params), only=args.only, root=args.root,
                         progress=args.progress, log=lambda line: print(line, flush=True), cwd=Path.cwd(),
                         where=str(Path(args.params).resolve()) if args.params else "--params")
    print(f"executed notebooks and their results are in {path}")
    return 0


def add_parsers(sub) -> None:
    """Register `edgeshard results` and `edgeshard run-notebooks`."""
    results = sub.add_parser("results", help=COMMANDS["results"][1])
    rs = results.add_subparsers(dest="results_cmd", metavar="ACTION")
    pl = rs.add_parser("list", help="list run folders")
    pl.add_argument("--root", default="results")
    pl.set_defaults(func=_cmd_list)
    ps = rs.add_parser("show", help="show a run's manifest and CSV heads")
    ps.add_argument("run", help="run folder, run id, or a unique prefix/suffix of it")
    ps.add_argument("--root", default="results")
    ps.add_argument("--rows", type=int, default=5, help="rows of each CSV to print")
    ps.set_defaults(func=_cmd_show)
    pa = rs.add_parser("standalone", help="make a run's HTML figures self-contained (plotly.js inline, ~4.8 MB "
                                          "each): they then open alone, offline")
    pa.add_argument("run", help="run folder, run id, or a unique prefix/suffix of it")
    pa.add_argument("figures", nargs="*", help="figure names (default: all of the run's HTML figures)")
    pa.add_argument("--root", default="results")
    pa.set_defaults(func=_cmd_standalone)
    results.set_defaults(func=lambda a: (results.print_help(), 2)[1])

    p = sub.add_parser("run-notebooks", help=COMMANDS["run-notebooks"][1])
    p.add_argument("--params", help="YAML: parameters for all notebooks, or under keys 01..06 per notebook; each is "
                                    "checked against the notebook's parameters cell before any runs; relative "
                                    "paths are taken from the current directory")
    p.add_argument("--out", help="results folder to write (default results/<utc-time>-notebooks)")
    p.add_argument("--only", help="comma-separated notebook ids, e.g. 02,05")
    p.add_argument("--root", default="results", help="where new run folders go")
    p.add_argument("--progress", action="store_true", help="show papermill's per-cell progress bar")
    p.set_defaults(func=_cmd_run_notebooks)
