"""Run folders: manifest contents, tidy CSVs round-trip through load_run, figures offline, listing and the CLI."""

import json
import subprocess
import sys

import pandas as pd
import plotly.graph_objects as go
import pytest

from edgeshard_kit.cli.main import main
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments import plots, results


def test_run_folder_round_trip(tmp_path):
    run = results.new_run("unit test", {"mbps": [10, 100], "objective": "latency"}, root=tmp_path, seeds={"torch": 0})
    assert run.path.parent == tmp_path and run.id.endswith("Z-unit-test")
    records = [{"method": "edgeshard", "repeat": r, "latency_ms": 10.0 + r} for r in range(3)]
    run.write_csv("latency", records)
    run.write_csv("frame", pd.DataFrame({"a": [1, 2]}))
    run.write_json("plan", {"stages": [{"device": "d0", "start": 0, "end": 4}]})
    run.save_figure("fig", go.Figure(go.Bar(x=[1], y=[2])))
    run.record(testbed={"name": "local"})
    run.finish(best="edgeshard")

    loaded = results.load_run(run.path)
    m = loaded["manifest"]
    assert m["status"] == "ok" and m["summary"] == {"best": "edgeshard"}
    assert m["parameters"]["mbps"] == [10, 100] and m["seeds"] == {"torch": 0}
    assert m["testbed"] == {"name": "local"} and m["git_commit"]
    assert m["versions"]["pandas"] == pd.__version__ and m["host"]["cpus"] >= 1
    assert m["files"]["csv"] == ["latency.csv", "frame.csv"] and m["files"]["figures"] == ["fig.html"]
    pd.testing.assert_frame_equal(loaded["latency"], pd.DataFrame(records))
    assert (run.path / "plotly.min.js").is_file()  # figures work offline
    assert results.list_runs(tmp_path)[0]["csvs"] == 2


def test_records_with_different_keys_make_one_tidy_csv(tmp_path):
    run = results.new_run("rows", root=tmp_path)
    path = run.write_csv("rows", [{"method": "a", "latency_ms": 1.5}, {"method": "b", "status": "oom"}])
    back = pd.read_csv(path)
    assert list(back.columns) == ["method", "latency_ms", "status"]
    assert back.latency_ms.isna().tolist() == [False, True] and back.status.tolist()[1] == "oom"


def test_save_figure_writes_html(tmp_path):
    p = results.save_figure(plots.per_unit([{"unit": 0, "decode_ms": 1, "device": "d"}]), tmp_path / "f")
    assert p.suffix == ".html" and "plotly.min.js" in p.read_text() and (tmp_path / "plotly.min.js").is_file()


def test_find_run_by_id_prefix_and_suffix(tmp_path):
    a = results.new_run("alpha", root=tmp_path)
    results.new_run("beta", root=tmp_path)
    assert results.find_run(a.path) == a.path
    assert results.find_run(a.id, tmp_path) == a.path
    assert results.find_run("alpha", tmp_path) == a.path  # suffix of the run id
    with pytest.raises(KitError, match="no such run"):
        results.find_run("gamma", tmp_path)


def test_git_commit_unknown_outside_repo(tmp_path):
    assert results.git_commit(tmp_path) == "unknown"


def test_bad_names_and_missing_runs(tmp_path):
    run = results.new_run("x", root=tmp_path)
    with pytest.raises(KitError, match="plain name"):
        run.write_csv("../evil", [{"a": 1}])
    with pytest.raises(KitError, match="not a run folder"):
        results.load_run(tmp_path / "nope")


def test_cli_list_and_show(tmp_path):
    run = results.new_run("cli", {"k": 1}, root=tmp_path)
    run.write_csv("t", [{"method": "m", "value": 1.5}])
    run.finish()
    cmd = [sys.executable, "-m", "edgeshard_kit", "results"]
    out = subprocess.run(cmd + ["list", "--root", str(tmp_path)], capture_output=True, text=True, check=True)
    assert run.id in out.stdout
    out = subprocess.run(cmd + ["show", run.id, "--root", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "t.csv: 1 rows" in out.stdout
    bad = subprocess.run(cmd + ["show", "nosuch", "--root", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such run" in bad.stderr and "Traceback" not in bad.stderr
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "ok"


def test_cli_results_without_action_prints_its_help(capsys):
    assert main(["results"]) == 2
    assert "usage: edgeshard results" in capsys.readouterr().out
