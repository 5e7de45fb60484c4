"""Run folders: manifest contents, tidy CSVs round-trip through load_run, figures offline, listing and the CLI."""

import json
import subprocess
import sys

import pandas as pd
import plotly.graph_objects as go
import pytest

from edgeshard_kit.cli.main import main
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments import figure_files, plots, results


@pytest.fixture(autouse=True)
def _html_only(monkeypatch):
    monkeypatch.setenv("EDGESHARD_FIGURE_FORMATS", "none")  # static export has its own tests (a browser per run)


def test_run_folder_round_trip(tmp_path):
    run = results.new_run("unit test", {"mbps": [10, 100], "objective": "latency"}, root=tmp_path, seeds={"torch": 0})
    assert run.path.parent == tmp_path and run.id.endswith("Z-unit-test")
    records = [{"method": "EdgeShard-latency", "repeat": r, "latency_ms": 10.0 + r} for r in range(3)]
    run.write_csv("latency", records)
    run.write_csv("frame", pd.DataFrame({"a": [1, 2]}))
    run.write_json("plan", {"stages": [{"device": "d0", "start": 0, "end": 4}]})
    run.save_figure("fig", go.Figure(go.Bar(x=[1], y=[2])))
    run.record(testbed={"name": "local"})
    run.finish(best="EdgeShard-latency")

    loaded = results.load_run(run.path)
    m = loaded["manifest"]
    assert m["status"] == "ok" and m["summary"] == {"best": "EdgeShard-latency"}
    assert m["parameters"]["mbps"] == [10, 100] and m["seeds"] == {"torch": 0}
    assert m["testbed"] == {"name": "local"} and m["git_commit"]
    assert m["versions"]["pandas"] == pd.__version__ and m["host"]["cpus"] >= 1
    assert m["files"]["csv"] == ["latency.csv", "frame.csv"] and m["files"]["figures"] == ["fig.html"]
    pd.testing.assert_frame_equal(loaded["latency"], pd.DataFrame(records))
    js = tmp_path / figure_files.plotlyjs_name()  # one plotly.js for every run under the results root
    assert js.is_file() and not list(run.path.glob("*.js"))
    assert f'src="../{js.name}"' in (run.path / "fig.html").read_text()
    assert results.list_runs(tmp_path)[0]["csvs"] == 2


def test_records_with_different_keys_make_one_tidy_csv(tmp_path):
    run = results.new_run("rows", root=tmp_path)
    path = run.write_csv("rows", [{"method": "a", "latency_ms": 1.5}, {"method": "b", "status": "oom"}])
    back = pd.read_csv(path)
    assert list(back.columns) == ["method", "latency_ms", "status"]
    assert back.latency_ms.isna().tolist() == [False, True] and back.status.tolist()[1] == "oom"


def test_save_figure_writes_html(tmp_path):
    p = results.save_figure(plots.per_unit([{"unit": 0, "decode_ms": 1, "device": "d"}]), tmp_path / "f")
    name = figure_files.plotlyjs_name()
    assert p.suffix == ".html" and name in p.read_text() and (tmp_path / name).is_file()
    alone = results.save_figure(plots.per_unit([{"unit": 0, "decode_ms": 1, "device": "d"}]), tmp_path / "g",
                                standalone=True)
    assert "src=" not in alone.read_text()[:5000] and alone.stat().st_size > 1e6  # plotly.js inline


def test_run_figures_get_static_copies(tmp_path, monkeypatch):
    browser, why = figure_files.find_browser()
    if browser is None:
        pytest.skip(f"static figure export needs a Chrome/Chromium: {why}")
    monkeypatch.delenv("EDGESHARD_FIGURE_FORMATS")
    run = results.new_run("static", root=tmp_path)
    run.save_figure("a", plots.per_unit([{"unit": 0, "decode_ms": 1, "device": "d"}]))
    run.save_figure("b", plots.per_unit([{"unit": 1, "decode_ms": 2, "device": "d"}]))
    run.finish()
    for name in ("a", "b"):
        for ext in ("png", "svg", "pdf"):
            assert (run.path / f"{name}.{ext}").stat().st_size > 1000
    m = json.loads((run.path / "manifest.json").read_text())
    assert sorted(m["files"]["static_figures"]) == sorted(f"{n}.{e}" for n in "ab" for e in ("png", "svg", "pdf"))
    assert m["static_figures_skipped"] is None


def test_run_without_browser_records_why(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("EDGESHARD_FIGURE_FORMATS")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))
    run = results.new_run("nobrowser", root=tmp_path)
    run.save_figure("a", plots.per_unit([{"unit": 0, "decode_ms": 1, "device": "d"}]))
    run.finish()
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "ok" and "BROWSER_PATH" in m["static_figures_skipped"]
    assert (run.path / "a.html").is_file() and not (run.path / "a.png").exists()
    err = capsys.readouterr().err
    assert err.count("HTML only") <= 1 and "\n" not in err.strip()


def test_failed_run_is_recorded_failed_with_its_error(tmp_path):
    with pytest.raises(ValueError):
        with results.new_run("ctx", root=tmp_path) as run:
            run.write_csv("partial", [{"a": 1}])
            raise ValueError("bandwidth 0 Mbps\nsecond line")
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == "ValueError: bandwidth 0 Mbps" and m["finished_utc"]

    @results.experiment
    def broken(run, x):
        raise KitError(f"x: {x} is not a bandwidth")
    run2 = results.new_run("decorated", root=tmp_path)
    with pytest.raises(KitError):
        broken(run2, -1)
    assert json.loads((run2.path / "manifest.json").read_text())["error"] == "KitError: x: -1 is not a bandwidth"

    with results.new_run("fine", root=tmp_path) as run3:
        pass
    listed = {r["name"]: r for r in results.list_runs(tmp_path)}
    assert listed["ctx"]["status"] == "failed" and "bandwidth 0 Mbps" in listed["ctx"]["error"]
    assert listed["decorated"]["status"] == "failed" and listed["fine"]["status"] == "ok"
    assert json.loads((run3.path / "manifest.json").read_text())["error"] is None


def test_a_process_that_dies_leaves_its_run_failed(tmp_path):
    code = ("import sys; from edgeshard_kit.experiments import results; "
            f"run = results.new_run('crash', root={str(tmp_path)!r}); "
            "raise RuntimeError('worker agx1 unreachable')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    m = json.loads(next(tmp_path.glob("*-crash/manifest.json")).read_text())
    assert m["status"] == "failed" and m["error"] == "RuntimeError: worker agx1 unreachable"
    # killed outright (no Python exit handlers): `results list` sees the process gone
    code = ("import os, signal; from edgeshard_kit.experiments import results; "
            f"results.new_run('killed', root={str(tmp_path)!r}); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    row = [r for r in results.list_runs(tmp_path) if r["name"] == "killed"][0]
    assert row["status"] == "failed" and "ended before the run finished" in row["error"]


def test_list_counts_every_csv_in_the_folder(tmp_path):
    run = results.new_run("count", root=tmp_path)
    for i in range(4):
        run.write_csv(f"t{i}", [{"a": i}])
    for i in range(3):  # written beside the run's own (a profile's CSV twin), and in a subfolder
        (run.path / f"extra{i}.csv").write_text("a\n1\n")
    (run.path / "sub").mkdir()
    (run.path / "sub" / "deep.csv").write_text("a\n1\n")
    run.finish()
    assert [r["csvs"] for r in results.list_runs(tmp_path)] == [8]


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


def test_cli_standalone_and_failed_runs_in_the_list(tmp_path, capsys):
    run = results.new_run("figs", root=tmp_path)
    run.save_figure("fig", plots.per_unit([{"unit": 0, "decode_ms": 1, "device": "d"}]))
    run.finish()
    assert main(["results", "standalone", run.id, "--root", str(tmp_path)]) == 0
    text = (run.path / "fig.html").read_text()
    assert "src=" not in text[:5000] and len(text) > 1_000_000 and "self-contained" in capsys.readouterr().out
    bad = results.new_run("bad", root=tmp_path)
    bad.fail(KitError("testbed.yaml: links.default.mbps: -1 is negative"))
    assert main(["results", "list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "KitError: testbed.yaml: links.default.mbps" in out
    assert main(["results", "show", bad.id, "--root", str(tmp_path)]) == 0
    assert "error: KitError: testbed.yaml" in capsys.readouterr().out


def test_a_notebook_cell_that_raises_marks_the_run_failed(tmp_path):
    code = f"""
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_cell("from edgeshard_kit.experiments import results; run = results.new_run('nb', root={str(tmp_path)!r})")
shell.run_cell("raise ValueError('micro_batches: 0 is not >= 1')")
"""
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    m = json.loads(next(tmp_path.glob("*-nb/manifest.json")).read_text())
    assert m["status"] == "failed" and m["error"] == "ValueError: micro_batches: 0 is not >= 1"
