"""The notebooks: valid, linear, papermill-parameterised, short cells; all five execute with small parameters."""

import ast
import json
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
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_notebooks_execute(tmp_path):
    out = notebooks.run_notebooks(out=tmp_path / "nbrun", params=SMALL)
    for stem in (Path(n).stem for n in notebooks.NOTEBOOKS.values()):
        nb = nbformat.read(out / stem / f"{stem}.ipynb", as_version=4)
        assert any(o.get("output_type") == "display_data" or o.get("data") for c in nb.cells
                   if c.cell_type == "code" for o in c.outputs), f"{stem} shows nothing"
        assert (out / stem / "manifest.json").is_file()
    cols = lambda stem, csv: set(pd.read_csv(out / stem / f"{csv}.csv").columns)  # noqa: E731
    assert {"device_type", "unit", "phase", "median_ms"} <= cols("01_profile_testbed", "profiles")
    assert {"src", "dst", "rtt_ms"} <= cols("01_profile_testbed", "links")
    assert {"method", "latency_ms", "throughput_tps"} <= cols("02_plan_interactive", "methods")
    tokens = pd.read_csv(out / "03_deploy_and_generate" / "tokens.csv")
    assert (tokens["token"] == tokens["reference_token"]).all()
    assert {"kind", "predicted_ms", "measured_ms"} <= cols("03_deploy_and_generate", "stage_timing")
    bench = pd.read_csv(out / "04_benchmark_vs_baselines" / "measurements.csv")
    assert {"method", "cloud_mbps", "source", "latency_ms", "throughput_tps", "status"} <= set(bench.columns)
    measured = bench[(bench.status == "ok") & (bench.source == "measured")]
    assert len(measured) and measured["tokens_match"].astype(bool).all()
    # calibrated by default: the fixed costs are measured, recorded, and the paper's model is kept beside them
    overheads = pd.read_csv(out / "04_benchmark_vs_baselines" / "runtime_overheads.csv")
    assert {"deployment", "measured_ms", "predicted_without_overheads_ms", "stage_ms_source", "step_ms"} <= \
        set(overheads.columns) and len(overheads) >= 2
    predicted = bench[(bench.status == "ok") & (bench.source == "predicted")]
    paper = bench[bench.source == "predicted-paper"]
    assert set(zip(predicted.method, predicted.cloud_mbps)) == set(zip(paper.method, paper.cloud_mbps))
    manifest = json.loads((out / "04_benchmark_vs_baselines" / "manifest.json").read_text())
    assert set(manifest["runtime_overheads"]["stage_ms"]) == {"cpu-local"}
    assert {"model", "method", "cloud_mbps", "latency_ms"} <= cols("05_paper_reproduction", "sweep")
