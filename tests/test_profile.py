"""Profiles as data (round trips, pandas, errors) and the measured profiler on a tiny checkpoint."""

import dataclasses
import json
import math

import pandas as pd
import pytest

from edgeshard_kit.profiling.profile import (Profile, UnitProfile, check_profile_matches, load_profile, merge_profiles,
                                   profiles_frame, save_profile, scale_times)
from edgeshard_kit.core.errors import KitError


def make_profile(n_layers=2, device_type="dev-a", model="m", scale=1.0) -> Profile:
    units = tuple(
        UnitProfile(unit=u, name=f"u{u}", prefill_ms=2.0 * scale * (u + 1), decode_ms=1.0 * scale * (u + 1),
                    decode_ms_by_kv={16: 1.0 * scale * (u + 1), 48: 3.0 * scale * (u + 1)},
                    prefill_min_ms=1.5, prefill_max_ms=2.5, decode_min_ms_by_kv={16: 0.5, 48: 2.5},
                    decode_max_ms_by_kv={16: 1.5, 48: 3.5}, param_bytes=100 * (u + 1), kv_bytes_per_token=8,
                    out_bytes_per_token=64, peak_mem_bytes=1000)
        for u in range(n_layers + 2))
    return Profile(model=model, n_layers=n_layers, device_type=device_type, dtype="float32", batch=1,
                   prompt_len=8, kv_lens=(16, 48), ref_kv_len=16, units=units,
                   config={"num_hidden_layers": n_layers, "hidden_size": 64},
                   overhead={"decode_step_ms": 0.5, "prefill_ms": 1.0}, meta={"host": "h"})


def test_json_round_trip_and_csv_twin(tmp_path):
    p = make_profile()
    jp = save_profile(p, tmp_path / "prof")
    assert jp.name == "prof.json" and (tmp_path / "prof.csv").exists()
    assert load_profile(jp) == p
    assert load_profile(tmp_path / "prof.csv") == p  # the CSV's path leads to its JSON
    df = pd.read_csv(tmp_path / "prof.csv")
    assert len(df) == p.n_units * (1 + len(p.kv_lens))  # one row per unit x measurement
    assert set(df["phase"]) == {"prefill", "decode"}
    dec = df[(df.phase == "decode") & (df.kv_len == 48)].sort_values("unit")
    assert dec["median_ms"].tolist() == [3.0 * (u + 1) for u in range(p.n_units)]
    pd.testing.assert_frame_equal(df, p.to_frame(), check_dtype=False)


def test_accessors_and_interpolation():
    p = make_profile()
    assert p.n_units == 4
    assert p.prefill_ms() == [2.0, 4.0, 6.0, 8.0]
    assert p.decode_ms() == [1.0, 2.0, 3.0, 4.0]
    assert p.decode_ms(32) == pytest.approx([2.0, 4.0, 6.0, 8.0])  # halfway between 16 and 48
    assert p.decode_ms(80) == pytest.approx([5.0, 10.0, 15.0, 20.0])  # linear past the last point
    assert p.param_bytes() == [100, 200, 300, 400]
    assert p.kv_bytes_per_token() == [8] * 4 and p.out_bytes_per_token() == [64] * 4
    assert p.predict_decode_ms() == pytest.approx(10.5)  # units + step overhead
    assert p.predict_decode_ms(start=1, end=3) == pytest.approx(5.0)  # a stage: units only
    assert scale_times(p, 2.0).predict_decode_ms() == pytest.approx(21.0)


def test_merge_and_frame():
    a, b = make_profile(device_type="a"), make_profile(device_type="b", scale=2)
    ps = merge_profiles([a, b])
    assert set(ps) == {"a", "b"} and ps["b"].decode_ms()[0] == 2.0
    assert set(profiles_frame(ps)["device_type"]) == {"a", "b"}
    with pytest.raises(KitError, match="with 5 units"):
        merge_profiles([a, make_profile(n_layers=3, device_type="c")])
    with pytest.raises(KitError, match="two different profiles"):
        merge_profiles([a, make_profile(device_type="a", scale=3)])


def test_wrong_model_is_refused():
    p = make_profile()
    check_profile_matches(p, 2)
    check_profile_matches(p, {"num_hidden_layers": 2, "hidden_size": 64})
    with pytest.raises(KitError, match="profile dev-a is for model m with 4 units, the plan's model has 34"):
        check_profile_matches(p, 32)
    with pytest.raises(KitError, match="hidden size 64"):
        check_profile_matches(p, {"num_hidden_layers": 2, "hidden_size": 128})


def test_malformed_files_name_file_and_field(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(KitError, match="bad.json: not valid JSON"):
        load_profile(f)
    d = make_profile().to_dict()
    del d["device_type"]
    f.write_text(json.dumps(d))
    with pytest.raises(KitError, match="bad.json lacks the field 'device_type'"):
        load_profile(f)
    d = make_profile().to_dict()
    d["units"][1]["decode_ms"] = "fast"
    f.write_text(json.dumps(d))
    with pytest.raises(KitError, match=r"units\[1\]\.decode_ms is not a number"):
        load_profile(f)
    d = make_profile().to_dict()
    d["units"].pop()
    f.write_text(json.dumps(d))
    with pytest.raises(KitError, match="3 units listed but n_layers=2 needs 4"):
        load_profile(f)
    with pytest.raises(KitError, match="no such file"):
        load_profile(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512)


def test_measured_profile_on_tiny_checkpoint(tiny, tmp_path):
    from edgeshard_kit.profiling.measure import measure_profile
    from edgeshard_kit.model.stage import StageModel

    p = measure_profile(tiny, repeats=2, warmup=1, prompt_len=8, kv_lens=(8, 16), progress=False)
    assert p.n_units == 4 and p.kv_lens == (8, 16) and p.ref_kv_len == 16
    assert [u.name for u in p.units] == ["embed", "layer1", "layer2", "head"]
    for u in p.units:
        assert u.prefill_ms > 0 and all(v > 0 for v in u.decode_ms_by_kv.values())
        assert u.prefill_min_ms <= u.prefill_ms <= u.prefill_max_ms
        assert set(u.decode_ms_by_kv) == {8, 16}
    whole = StageModel(tiny, 0, 4)
    assert sum(p.param_bytes()) == whole.param_bytes  # every parameter in exactly one unit
    assert p.kv_bytes_per_token() == [0, 2 * 2 * 16 * 4, 2 * 2 * 16 * 4, 0]  # K+V x 2 kv heads x 16 dims x fp32
    assert p.out_bytes_per_token() == [64 * 4, 64 * 4, 64 * 4, 512 * 4]  # hidden fp32; head: fp32 logits
    assert math.isfinite(p.decode_overhead_ms) and "decode_step_ms" in p.overhead
    assert p.meta["method"]["repeats"] == 2 and p.meta["torch"] and p.meta["host"]
    assert load_profile(save_profile(p, tmp_path / "t.json")) == p


def test_measure_refuses_bad_settings(tiny):
    from edgeshard_kit.profiling.measure import measure_profile

    with pytest.raises(KitError, match="repeats must be a positive integer"):
        measure_profile(tiny, repeats=0)
    with pytest.raises(KitError, match="warmup must be a non-negative integer"):
        measure_profile(tiny, warmup=-1)
    with pytest.raises(KitError, match="kv_lens"):
        measure_profile(tiny, kv_lens=(0, 8))
    with pytest.raises(KitError, match="batch"):
        measure_profile(tiny, batch=0)


def test_cli_profile_to_stdout_is_pure_json(tiny, capsys):
    from edgeshard_kit.cli.main import main

    rc = main(["profile", "--model", str(tiny), "--repeats", "1", "--warmup", "0", "--prompt-len", "4",
               "--kv-lens", "8", "--device-type", "edge-x", "--out", "-"])
    assert rc == 0
    p = Profile.from_dict(json.loads(capsys.readouterr().out))  # stdout carries the JSON and nothing else
    assert p.device_type == "edge-x" and p.n_units == 4
    assert main(["profile", "--model", str(tiny), "--repeats", "0", "--out", "-"]) == 2
    assert "repeats must be a positive integer" in capsys.readouterr().err


def test_profile_check_runs_generate_against_the_profile(tiny):
    from edgeshard_kit.bench.profile_check import profile_check

    rows = profile_check(tiny, repeats=1, warmup=0, rounds=1, new_tokens=3, prompt_len=4, progress=False)
    assert len(rows) == 1 and rows[0]["measured_ms"] > 0 and rows[0]["ratio"] > 0
    assert rows[0]["predicted_ms"] == pytest.approx(rows[0]["units_only_ms"] + rows[0]["decode_step_overhead_ms"])


def test_tied_bytes_round_trip_and_checks(tmp_path):
    p = make_profile()
    units = p.units[:-1] + (UnitProfile(**{**p.units[-1].to_dict(), "tied_bytes": 100}),)
    t = Profile(**{**{f: getattr(p, f) for f in p.__dataclass_fields__}, "units": units})
    assert t.tied_bytes == 100 and p.tied_bytes == 0
    assert t.model_param_bytes() == sum(t.param_bytes()) - 100
    jp = save_profile(t, tmp_path / "tied")
    assert load_profile(jp) == t
    assert pd.read_csv(tmp_path / "tied.csv")["tied_bytes"].max() == 100
    d = t.to_dict()
    d["units"][-1]["tied_bytes"] = 150  # more than unit 0's 100 parameter bytes
    with pytest.raises(KitError, match="tied_bytes 150 exceed unit 0's param_bytes 100"):
        Profile.from_dict(d)
    d["units"][-1]["tied_bytes"] = 0
    d["units"][1]["tied_bytes"] = 10
    with pytest.raises(KitError, match="only the last unit"):
        Profile.from_dict(d)


@pytest.fixture(scope="module")
def tied_profile(tiny_checkpoint_factory):
    from edgeshard_kit.profiling.measure import measure_profile

    tied = tiny_checkpoint_factory(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512,
                                   tie_word_embeddings=True)
    return tied, measure_profile(tied, repeats=1, warmup=0, prompt_len=4, kv_lens=(8,), progress=False)


def test_measured_profile_of_tied_embeddings(tied_profile):
    """The whole model profiles as one stage; the head carries the tied tensor's bytes and says so."""
    from edgeshard_kit.model.stage import StageModel

    tied, p = tied_profile
    table = 512 * 64 * 4  # vocab x hidden x fp32
    assert p.units[0].param_bytes == table and p.units[-1].param_bytes == table + 64 * 4  # + the norm
    assert p.tied_bytes == table and [u.tied_bytes for u in p.units[:-1]] == [0, 0, 0]
    assert p.model_param_bytes() == StageModel(tied, 0, 4).param_bytes  # the tensor once, as the model holds it
    assert p.units[-1].param_bytes == StageModel(tied, 3, 4).param_bytes  # the head alone holds its own copy


def test_planner_counts_the_tied_tensor_once(tied_profile):
    """build_problem carries tied_bytes; one stage [0, N+2) and relay stages on one device count it once."""
    import yaml

    from edgeshard_kit.core.units import Stage
    from edgeshard_kit.planning.build import Workload, build_problem
    from edgeshard_kit.planning.dp import solve
    from edgeshard_kit.planning.plan import figures
    from edgeshard_kit.planning.problem import problem_from_dict
    from edgeshard_kit.testbed.inventory import testbed_from_dict

    _, p = tied_profile
    wl = Workload(prompt_len=4, gen_tokens=4)

    def problem(src_mem: int, other_mem: int):
        tb = testbed_from_dict(yaml.safe_load(yaml.safe_dump({"name": "t", "devices": [
            {"name": "a", "type": p.device_type, "memory": src_mem, "source": True},
            {"name": "b", "type": p.device_type, "memory": other_mem}]})), "t")
        return build_problem({p.device_type: p}, tb, wl)

    pr = problem(10**9, 10**9)
    assert pr.tied_bytes == p.tied_bytes and problem_from_dict(pr.to_dict()) == pr
    total = sum(u.mem_bytes for u in pr.units)
    whole = figures(pr, [Stage("a", 0, 4)])
    assert whole["memory_bytes"] == {"a": pytest.approx(total - p.tied_bytes)}
    split = figures(pr, [Stage("a", 0, 3), Stage("b", 3, 4)])
    assert sum(split["memory_bytes"].values()) == pytest.approx(total)  # two devices: two copies
    relay = figures(pr, [Stage("a", 0, 1), Stage("b", 1, 3), Stage("a", 3, 4)])
    # two stages on one device are two workers, each loading its own copy of the tied tensor
    assert relay["memory_bytes"]["a"] == pytest.approx(pr.units[0].mem_bytes + pr.units[3].mem_bytes)
    # the source fits the model only with the tensor counted once; the other device is too small for anything
    fits = problem(int(total - p.tied_bytes) + 1, 1)
    plan = solve(fits, "latency")
    assert [(s.device, s.start, s.end) for s in plan.stages] == [("a", 0, 4)] and plan.feasible
    assert [(s.device, s.start, s.end) for s in solve(fits, "throughput", relay=True).stages] == [("a", 0, 4)]
    with pytest.raises(KitError, match="infeasible"):
        solve(problem(int(total - p.tied_bytes) - 1, 1), "latency")


# ---- the constrained fit (profiling.fit) ---------------------------------------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from edgeshard_kit.profiling.fit import fit_profile, nonneg_fit, spread_flags  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(fixed=st.floats(0, 50), per=st.floats(0, 0.5),
       noise=st.lists(st.floats(-20, 20), min_size=4, max_size=30),
       xs=st.lists(st.integers(1, 512), min_size=4, max_size=30))
def test_nonneg_fit_is_never_negative_and_is_the_nnls_optimum(fixed, per, noise, xs):
    n = min(len(noise), len(xs))
    x, y = xs[:n], [fixed + per * xi + e for xi, e in zip(xs[:n], noise[:n])]
    a, b = nonneg_fit(x, y)
    assert a >= 0 and b >= 0
    # Reference: the KKT conditions of min ||A [a b] - y||^2 s.t. a, b >= 0 (gradient 0 on a free term, >= 0 on a
    # term held at 0), which only the optimum satisfies.
    r = [a + b * xi - yi for xi, yi in zip(x, y)]
    grad = (2 * sum(r), 2 * sum(ri * xi for ri, xi in zip(r, x)))
    scale = 1e-6 * (1 + sum(abs(v) for v in y)) * (1 + max(x))
    for term, g in zip((a, b), grad):
        assert g >= -scale and (term == 0 or abs(g) <= scale)


def test_fit_profile_clamps_negative_overheads_and_keeps_the_raw_ones():
    prof = make_profile()
    prof = dataclasses.replace(prof, overhead={"prefill_ms": -21.2, "decode_step_ms": 0.3})
    out = fit_profile(prof)
    assert out.overhead["prefill_ms"] == 0.0 and out.overhead["raw_prefill_ms"] == -21.2
    assert out.overhead["decode_step_ms"] == 0.3


def test_spread_flags_name_the_figure_whose_repeats_disagree():
    prof = make_profile()
    u = dataclasses.replace(prof.units[1], prefill_ms=1.0, prefill_min_ms=0.5, prefill_max_ms=2.0)
    prof = dataclasses.replace(prof, units=(prof.units[0], u) + prof.units[2:])
    flags = spread_flags(prof, limit=0.5)
    assert any("unit 1" in f and "prefill" in f for f in flags)
    assert not spread_flags(prof, limit=10.0)
