"""Analytic profiles: parameter counts of the published models, the device catalog, calibration, the paper's data."""

import json

import pytest

from edgeshard_kit.profiling.analytic import (Efficiency, analytic_profile, calibrate, calibration_transfer, model_spec,
                                    total_params)
from edgeshard_kit.profiling.catalog import CATALOG, get_device
from edgeshard_kit.profiling.reference import paper_profiles, paper_testbed
from edgeshard_kit.bench.analytic import analytic_vs_paper
from edgeshard_kit.core.errors import KitError


@pytest.mark.parametrize("name,total", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                        ("llama2-70b", 68_976_648_192)])
def test_parameter_counts_equal_published_totals(name, total):
    assert total_params(model_spec(name)) == total


def test_spec_from_config_and_refusals(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = model_spec(tmp_path)
    assert s.n_units == 4 and s.hd == 16
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(KitError, match="not 'llama'"):
        model_spec(tmp_path)
    with pytest.raises(KitError, match="neither a built-in spec"):
        model_spec("llama9-1b")


def test_unknown_device_lists_known_ones():
    with pytest.raises(KitError, match="unknown device type 'tpu-v9'.*jetson-agx-orin-32gb.*this-machine"):
        get_device("tpu-v9")
    for name in ("jetson-agx-orin-32gb", "jetson-orin-nx-16gb", "rtx-3090-24gb", "a100-80gb", "raspberry-pi-5-8gb"):
        d = CATALOG[name]
        assert d.memory_bytes > 0 and d.mem_bw_gbs > 0 and d.peak_flops["float32"] > 0
        assert {"memory_bytes", "mem_bw_gbs", "peak_flops.float32"} <= set(d.sources)


def test_analytic_profile_bytes_and_roofline():
    p = analytic_profile("llama2-7b", "rtx-3090-24gb", dtype="float16", kv_lens=(32, 128))
    assert p.n_units == 34 and p.device_type == "rtx-3090-24gb"
    assert p.param_bytes()[1] == 202_383_360 * 2  # one decoder layer, fp16
    assert p.kv_bytes_per_token()[1] == 2 * 4096 * 2 and p.kv_bytes_per_token()[0] == 0
    assert p.out_bytes_per_token()[-1] == 32000 * 4  # float32 logits of the last position
    # Decode of a 7B layer is memory-bound: weights / (bandwidth x efficiency) + overhead.
    eff = Efficiency()
    expect = 1e3 * 202_383_360 * 2 / (936.2e9 * eff.memory)
    assert p.decode_ms(32)[1] == pytest.approx(expect + eff.unit_overhead_ms, rel=0.01)
    assert p.decode_ms(128)[1] > p.decode_ms(32)[1]  # more KV to read
    p70 = analytic_profile("llama2-70b", "a100-80gb", dtype="bfloat16")
    assert p70.kv_bytes_per_token()[1] == 2 * 8 * 128 * 2  # GQA: 8 KV heads


def test_calibration_recovers_known_efficiency():
    truth = Efficiency(compute=0.2, memory=0.4, unit_overhead_ms=0.1)
    measured = analytic_profile("llama2-7b", "jetson-agx-orin-32gb", kv_lens=(32, 128), efficiency=truth)
    eff = calibrate(measured, "llama2-7b", "jetson-agx-orin-32gb")
    assert eff.fit_error < 0.02
    assert eff.memory == pytest.approx(0.4, rel=0.1) and eff.unit_overhead_ms == pytest.approx(0.1, abs=0.05)
    other = analytic_profile("llama2-13b", "jetson-agx-orin-32gb", kv_lens=(32, 128), efficiency=truth)
    pred = analytic_profile("llama2-13b", "jetson-agx-orin-32gb", kv_lens=(32, 128), efficiency=eff)
    assert pred.predict_decode_ms() == pytest.approx(other.predict_decode_ms(), rel=0.05)


def test_paper_profiles_load_as_profiles():
    ps = paper_profiles()
    assert set(ps) == {"jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "rtx-3090-24gb"}
    for p in ps.values():
        assert p.n_units == 34 and p.model == "llama2-7b" and "KasperXMS" in p.meta["source"]
        assert p.out_bytes_per_token()[1] == 65536 and p.out_bytes_per_token()[-1] == 512000
        assert p.param_bytes()[1] == round(0.754 * 2**30)
    assert ps["rtx-3090-24gb"].decode_ms()[0] == 0.077
    tb = paper_testbed()
    assert tb["devices"]["jetson-agx-orin-32gb"] == 12 and tb["memory_budget_gb"]["rtx-3090-24gb"] == 22


def test_analytic_vs_paper_rows():
    rows = analytic_vs_paper()
    assert len(rows) == 3
    for r in rows:
        assert abs(r["calibrated_error_pct"]) <= abs(r["uncalibrated_error_pct"]) + 1e-9


@pytest.fixture(scope="module")
def two_tiny(tiny_checkpoint_factory):
    from edgeshard_kit.profiling.measure import measure_profile

    small = tiny_checkpoint_factory(layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512)
    large = tiny_checkpoint_factory(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=512)
    kw = dict(repeats=2, warmup=1, prompt_len=8, kv_lens=(8, 16), progress=False)
    return measure_profile(small, **kw), measure_profile(large, **kw)


def test_calibrate_on_one_measured_size_predict_another(two_tiny):
    small, large = two_tiny
    row = calibration_transfer(small, large, "this-machine")
    assert row["measured_ms"] > 0 and row["calibrated_ms"] > 0
    assert row["calibrated_on"] == small.model and row["predicted"] == large.model


def test_cli_devices_and_analytic_vs_paper(tmp_path, capsys):
    import pandas as pd

    from edgeshard_kit.cli.main import main

    assert main(["devices", "--json"]) == 0
    names = [d["name"] for d in json.loads(capsys.readouterr().out)]
    assert "rtx-3090-24gb" in names and "raspberry-pi-5-8gb" in names
    out = tmp_path / "avp.csv"
    assert main(["bench", "analytic-vs-paper", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(df) == 3 and {"measured_ms", "analytic_calibrated_ms", "calibrated_error_pct"} <= set(df.columns)
    assert main(["profile", "--analytic", "llama2-7b", "--device-type", "nope", "--out", "-"]) == 2
    assert "unknown device type 'nope'" in capsys.readouterr().err
