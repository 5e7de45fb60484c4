"""The notebooks: valid, linear, papermill-parameterised, short cells; all six execute with small parameters."""

import ast
import json
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from edgeshard_kit.experiments import notebooks
from edgeshard_kit.core.errors import KitError

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", list(notebooks.NOTEBOOKS.values()))
def test_notebook_is_valid_linear_and_parameterised(name):
    nb = nbformat.read(NB_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and code[0] is params[0], "the first code cell is the one parameters cell"
    tree = ast.parse(params[0].source)
    for stmt in tree.body:  # flat literals only, so papermill can override them
        assert isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant), ast.unparse(stmt)
    assert "out_dir" in notebooks.declared_parameters(NB_DIR / name)
    for c in code:
        assert not c.outputs and c.execution_count is None, "notebooks are stored without outputs"
        logic = [ln for ln in c.source.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert c is params[0] or len(logic) <= 10, f"cell over 10 lines of logic:\n{c.source}"
    assert any(c.cell_type == "markdown" for c in nb.cells)


def test_notebooks_match_their_generator(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_notebooks", NB_DIR / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, (cells, title) in mod.NOTEBOOKS.items():
        built = mod.build(cells, title)
        stored = nbformat.read(NB_DIR / name, as_version=4)
        assert [c.source for c in built.cells] == [c.source for c in stored.cells], f"re-run build_notebooks.py ({name})"


@pytest.mark.parametrize("stem", ["01_profile_testbed", "03_deploy_and_generate", "04_benchmark_vs_baselines"])
def test_model_notebooks_default_to_smollm2_and_run_tiny_here(stem):
    import papermill as pm

    params = pm.inspect_notebook(str(NB_DIR / f"{stem}.ipynb"))
    assert params["model_path"]["default"] == '""'  # "" = SmolLM2-135M-Instruct, the kit's default model
    assert "SmolLM2-135M-Instruct" in nbformat.read(NB_DIR / f"{stem}.ipynb", as_version=4).cells[0].source
    assert SMALL["*"]["model_path"] == "tiny"  # the suite runs them on tiny checkpoints (2 cores in CI)


def test_select_and_params(tmp_path):
    assert notebooks.select("2,05") == ["02", "05"]
    with pytest.raises(KitError, match="unknown notebook"):
        notebooks.select("07")
    f = tmp_path / "p.yaml"
    f.write_text("max_new_tokens: 4\n'02': {objective: latency}\n")
    assert notebooks.load_params(f) == {"*": {"max_new_tokens": 4}, "02": {"objective": "latency"}}
    with pytest.raises(KitError, match="no parameter"):
        notebooks.run_notebooks(out=tmp_path / "r", params={"02": {"nosuch": 1}}, only="02")


# Tiny random checkpoints keep the suite's time down (the notebooks default to SmolLM2-135M-Instruct, which
# the hub and generation tests cover); "*" entries go to the notebooks that declare them.
SMALL = {
    "*": {"model_path": "tiny", "tiny_layers": 2, "tiny_hidden": 64, "repeats": 2},
    "01": {"kv_lens": "8", "prompt_len": 8, "probe_bytes": 65536},
    "03": {"max_new_tokens": 4, "chat": False, "prompt": "The edge devices share the model"},
    "04": {"cloud_mbps": "5,500", "prompt_len": 8, "max_new_tokens": 3, "micro_batches": 2, "repeats": 1},
    "05": {"models": "llama2-7b,llama2-70b", "cloud_mbps": "10,100"},
    "06": {"max_new_tokens": 16, "switch_at": 6, "parallel_profile": True},
}
# Notebook 06 (the emulated testbed when root) waits mostly on its devices' CPU quotas and on SSH, 04 on starting
# worker processes: each runs through the command line (`edgeshard run-notebooks --only`, its own results folder)
# beside the others, which run in this process (on 2 cores the three streams overlap those waits).
BESIDE = ("06", "04")


def _run_notebooks_command(tmp_path: Path, only: str) -> tuple[subprocess.Popen, Path, Path]:
    """`edgeshard run-notebooks --only ... --params small.yaml --out ...`, started (not waited for)."""
    import yaml

    params = tmp_path / "small.yaml"
    params.write_text(yaml.safe_dump({**SMALL["*"], **{k: v for k, v in SMALL.items() if k != "*"}}))
    tag = only.replace(",", "-")
    out, log = tmp_path / f"nbrun-{tag}", tmp_path / f"nbrun-{tag}.log"
    with log.open("w") as f:  # a file, not a pipe: nobody reads a pipe until the other notebooks are done
        proc = subprocess.Popen([sys.executable, "-m", "edgeshard_kit", "run-notebooks", "--only", only, "--params",
                                 str(params), "--out", str(out)], stdout=f, stderr=subprocess.STDOUT)
    return proc, out, log


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_notebooks_execute(tmp_path, monkeypatch):
    # Static copies (kaleido + Chromium) in one format, from the kernels of the notebooks run beside; the others
    # run with static export off (a Chromium start less each): the formats have their own tests (test_plots).
    monkeypatch.setenv("EDGESHARD_FIGURE_FORMATS", "png")
    beside = [_run_notebooks_command(tmp_path, only) for only in BESIDE]
    monkeypatch.setenv("EDGESHARD_FIGURE_FORMATS", "off")
    folder = {nid: out for only, (_, out, _) in zip(BESIDE, beside) for nid in notebooks.select(only)}
    try:
        rest = [nid for nid in notebooks.NOTEBOOKS if nid not in folder]
        folder.update(dict.fromkeys(rest, notebooks.run_notebooks(out=tmp_path / "nbrun", params=SMALL, only=rest)))
        for proc, _, _ in beside:
            proc.wait(timeout=600)
    finally:
        for proc, _, _ in beside:
            if proc.poll() is None:  # something failed first: stop the command as Ctrl-C would (kernels shut down)
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    for proc, out, log in beside:
        text = log.read_text()
        assert proc.returncode == 0 and f"executed notebooks and their results are in {out}" in text, text[-3000:]
    dirs = {nid: folder[nid] / Path(n).stem for nid, n in notebooks.NOTEBOOKS.items()}
    from edgeshard_kit.experiments.figure_files import find_browser
    browser, no_browser = find_browser()
    for nid, d in dirs.items():
        stem = d.name
        nb = nbformat.read(d / f"{stem}.ipynb", as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert any(o.get("output_type") == "display_data" or o.get("data") for o in outputs), f"{stem} shows nothing"
        warned = [o.text for o in outputs if o.get("name") == "stderr" and "Warning" in o.text]
        assert not warned, f"{stem} prints warnings (red in JupyterLab): {warned[0][:500]}"
        skipped = json.loads((d / "manifest.json").read_text()).get("static_figures_skipped")
        figures = sorted(d.glob("*.html"))
        if nid not in BESIDE:  # static export off: HTML only, and no reason to report
            assert figures and skipped is None and not list(d.glob("*.png")), (stem, skipped)
        elif browser:  # every figure also as PNG, exported from the notebook's kernel
            assert figures and not skipped, (stem, skipped)
            assert [f for f in figures if not f.with_suffix(".png").is_file()] == [], stem
        else:
            assert skipped == no_browser
    stdout = lambda stem: "".join(o.get("text", "") for c in nbformat.read(  # noqa: E731
        dirs[stem[:2]] / f"{stem}.ipynb", as_version=4).cells if c.cell_type == "code" for o in c.outputs)
    cols = lambda stem, csv: set(pd.read_csv(dirs[stem[:2]] / f"{csv}.csv").columns)  # noqa: E731
    assert {"device_type", "unit", "phase", "median_ms"} <= cols("01_profile_testbed", "profiles")
    assert {"src", "dst", "rtt_ms"} <= cols("01_profile_testbed", "links")
    assert {"method", "latency_ms", "throughput_tps"} <= cols("02_plan_interactive", "methods")
    tokens = pd.read_csv(dirs["03"] / "tokens.csv")
    assert (tokens["token"] == tokens["reference_token"]).all()
    assert {"kind", "predicted_ms", "measured_ms"} <= cols("03_deploy_and_generate", "stage_timing")
    bench = pd.read_csv(dirs["04"] / "measurements.csv")
    assert {"method", "cloud_mbps", "source", "latency_ms", "throughput_tps", "status"} <= set(bench.columns)
    measured = bench[(bench.status == "ok") & (bench.source == "measured")]
    assert len(measured) and measured["tokens_match"].astype(bool).all()
    # calibrated by default: the fixed costs are measured, recorded, and the paper's model is kept beside them
    overheads = pd.read_csv(dirs["04"] / "runtime_overheads.csv")
    assert {"deployment", "measured_ms", "predicted_without_overheads_ms", "stage_ms_source", "step_ms"} <= \
        set(overheads.columns) and len(overheads) >= 2
    predicted = bench[(bench.status == "ok") & (bench.source == "predicted")]
    paper = bench[bench.source == "predicted-paper"]
    assert set(zip(predicted.method, predicted.cloud_mbps)) == set(zip(paper.method, paper.cloud_mbps))
    manifest = json.loads((dirs["04"] / "manifest.json").read_text())
    assert set(manifest["runtime_overheads"]["stage_ms"]) == {"cpu-local"}
    assert {"model", "method", "cloud_mbps", "latency_ms"} <= cols("05_paper_reproduction", "sweep")
    # 06: every token of the generation recorded, and they equal one-device generation through the switch
    assert "tokens identical to one-device generation: True" in stdout("06_adaptive")
    per_token = pd.read_csv(dirs["06"] / "adaptive_per_token.csv")
    assert set(per_token["step"]) == set(range(SMALL["06"]["max_new_tokens"]))
    used = json.loads((folder["06"] / "manifest.json").read_text())["parameters"]["params"]["06"]
    assert {k: used[k] for k in (*SMALL["*"], *SMALL["06"])} == {**SMALL["*"], **SMALL["06"]}


def test_notebooks_store_what_jupyterlab_would_write_on_open():
    """JupyterLab fills kernelspec and language_info from the kernel once it starts; stored alike, opening a
    notebook leaves it unmodified (the browser test checks the dirty flag itself)."""
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager

    for name in notebooks.NOTEBOOKS.values():
        meta = nbformat.read(NB_DIR / name, as_version=4).metadata
        assert meta["kernelspec"] == {"name": notebooks.KERNEL, "display_name": notebooks.KERNEL_DISPLAY,
                                      "language": "python"}
        stored = dict(meta["language_info"])
        kernel = dict(IPythonKernel.language_info)
        assert stored.pop("version").split(".")[:2] == kernel.pop("version").split(".")[:2]
        assert stored == kernel
    spec = KernelSpecManager().get_kernel_spec(notebooks.ensure_kernel())
    assert spec.display_name == notebooks.KERNEL_DISPLAY


def _param_error(tmp_path, params, match, only="02", cwd=None):
    with pytest.raises(KitError, match=match) as e:
        notebooks.run_notebooks(out=tmp_path / "never", params=params, only=only, cwd=cwd)
    assert "\n" not in str(e.value) and not (tmp_path / "never").exists(), "checked before anything runs"
    return str(e.value)


def test_parameters_are_checked_against_the_parameters_cell(tmp_path):
    assert "micro_batches: Input should be a valid integer (got 4.5)" in _param_error(
        tmp_path, {"*": {"micro_batches": 4.5}}, "micro_batches")
    assert "greater than or equal to 1 (got 0)" in _param_error(tmp_path, {"02": {"micro_batches": 0}}, "micro_batches")
    _param_error(tmp_path, {"02": {"micro_batches": True}}, "micro_batches")
    _param_error(tmp_path, {"*": {"micro_batchs": 4}}, "no notebook has a parameter 'micro_batchs'")
    _param_error(tmp_path, {"02": {"tokens": 4}}, "02_plan_interactive.ipynb: no parameter 'tokens'")
    _param_error(tmp_path, {"02": {"objective": "fastest"}}, "objective: 'fastest' is not one of latency, throughput")
    _param_error(tmp_path, {"*": {"out_dir": "x"}}, "out_dir is set by run-notebooks")
    _param_error(tmp_path, {"04": {"cloud_mbps": "2,fast"}}, "cloud_mbps", only="04")
    _param_error(tmp_path, {"04": {"tiny_hidden": 100}}, "multiple of 16", only="04")
    _param_error(tmp_path, {"03": {"chat": "yes"}}, "chat: Input should be a valid boolean", only="03")
    _param_error(tmp_path, {"05": {"models": "llama2-7b,gpt-9"}}, "models", only="05")
    from edgeshard_kit.experiments import benchmark, nbparams  # the early check accepts what the benchmark reads
    assert {m.lower() for m in benchmark.ALL_METHODS} < set(nbparams.METHOD_KEYS)
    assert all(benchmark.pick_methods(k) for k in nbparams.METHOD_KEYS)
    # a relative path is taken from the directory the command runs in, and the error shows it resolved
    msg = _param_error(tmp_path, {"02": {"problem_file": "sub/p.json"}}, "problem_file", cwd=tmp_path)
    assert str((tmp_path / "sub" / "p.json").resolve()) in msg
    # a top-level name goes to the notebooks that declare it, each with its own type
    ok = notebooks.resolve_params({"*": {"cloud_mbps": 20, "micro_batches": 2}}, ["02", "03", "04"])
    assert ok["02"] == {"micro_batches": 2} and ok["03"] == {"cloud_mbps": 20.0}
    assert ok["04"] == {"cloud_mbps": "20", "micro_batches": 2}


def test_the_manifest_records_the_parameters_used(tmp_path, monkeypatch):
    """A stand-in notebook 02 (prints its parameters) run through run_notebooks from another directory."""
    nb_dir, elsewhere = tmp_path / "nbs", tmp_path / "elsewhere"
    nb_dir.mkdir(), elsewhere.mkdir()
    (elsewhere / "p.json").write_text("{}")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": notebooks.KERNEL, "language": "python",
                                                           "display_name": notebooks.KERNEL_DISPLAY}})
    cell = nbformat.v4.new_code_cell('objective = "latency"\nmicro_batches = 4\nproblem_file = ""\nout_dir = ""')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("print(objective, micro_batches, problem_file)")]
    nbformat.write(nb, nb_dir / notebooks.NOTEBOOKS["02"])
    monkeypatch.chdir(elsewhere)
    out = notebooks.run_notebooks(out=tmp_path / "run", params={"02": {"micro_batches": 3, "problem_file": "p.json"}},
                                  only="02", nb_dir=nb_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    used = {"objective": "latency", "micro_batches": 3, "problem_file": str(elsewhere / "p.json")}
    assert manifest["parameters"]["params"]["02"] == used
    executed = nbformat.read(out / "02_plan_interactive" / notebooks.NOTEBOOKS["02"], as_version=4)
    assert executed.cells[-1].outputs[0]["text"].split() == ["latency", "3", str(elsewhere / "p.json")]


def test_explorer_controls_readout_and_infeasible_reason():
    """Notebook 02's widget without a browser: the group sliders, a single link, the readout, the reason."""
    from edgeshard_kit.experiments import interactive
    from edgeshard_kit.planning.dp import infeasible_reason
    from edgeshard_kit.planning.objectives import solve_objective
    from edgeshard_kit.planning.schedule import evaluate

    paper = interactive.problem_for("")
    ex = interactive.PlanExplorer(paper, objective="throughput", micro_batches=1)
    assert "1 micro-batch in flight" in ex.readout.value and len(ex.out.outputs) == 3
    ex.micro.value = 4
    ex.cloud[0].value = 1000.0
    p = ex.problem()
    clouds = interactive.cloud_names(paper)
    assert clouds == {"rtx0"} and ex.cloud[1].value == "1,000 Mbps"
    assert all(p.link(a, b).mbps == 1000.0 for a in p.names for b in p.names if a != b and {a, b} & clouds)
    assert p.link("agx0", "agx1") == paper.link("agx0", "agx1")  # edge-to-edge untouched
    ev = evaluate(p, solve_objective(p, "throughput", 4), micro_batches=4, tokens=ex.tokens)
    assert f"{ev.latency_ms:.1f}</span> ms/token" in ex.readout.value
    assert f"{ev.simulations['no-bubbles'].throughput_per_s:.1f}</span> tokens/s" in ex.readout.value
    ex.edge[0].value = 100.0
    assert ex.problem().link("agx0", "agx1").mbps == 100.0 and ex.problem().link("agx0", "rtx0").mbps == 1000.0
    ex.link.value = "agx2->rtx0"  # advanced: one link
    ex.link_mbps[0].value = 1.0
    assert ex.problem().link("agx2", "rtx0").mbps == 1.0 and ex.problem().link("agx1", "rtx0").mbps == 1000.0
    ex.cloud[0].value = 50.0  # the group slider sets every cloud link again
    assert ex.problem().link("agx2", "rtx0").mbps == 50.0 and ex.link_mbps[0].value == 50.0
    ex.objective.value = "throughput-steady"
    assert "EdgeShard-throughput (steady state)" in set(ex.summary().method)
    # infeasible: the source cannot hold its unit; the reason is the planner's, the figures are gone
    ex.device.value = paper.names[paper.source]
    ex.mem.value = 0.1
    assert ex.result["plan"] is None and "No feasible plan" in ex.readout.value
    assert infeasible_reason(ex.problem()) in ex.result["error"]
    assert all("application/vnd.plotly.v1+json" not in o["data"] for o in ex.out.outputs)
    ex.mem.value = 10.0  # the source alone cannot hold Llama2-7B now
    assert ex.result["plan"] is not None
    for name, box in ex.on.items():  # every device off but the source
        box.value = box.disabled
    assert ex.result["plan"] is None and infeasible_reason(ex.problem()) in ex.result["error"]
