"""build_problem: profiles + testbed + workload -> Problem, against the real Profile and Testbed classes."""

from __future__ import annotations

import json

import pytest
import yaml

from edgeshard_kit.cli.main import main
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.planning.build import Workload, build_problem
from edgeshard_kit.planning.dp import solve
from edgeshard_kit.planning.problem import load_problem
from edgeshard_kit.profiling.analytic import analytic_profile
from edgeshard_kit.profiling.profile import save_profile
from edgeshard_kit.testbed.inventory import load_testbed

TESTBED = {
    "name": "t", "devices": [
        {"name": "agx", "type": "jetson-agx-orin-32gb", "memory": "29GiB", "source": True},
        {"name": "nx", "type": "jetson-orin-nx-16gb", "memory": "14GiB"},
        {"name": "gpu", "type": "rtx-3090-24gb", "memory": "22GiB", "cloud": True}],
    "links": {"default": {"mbps": 1000, "latency_ms": 0.5},
              "pairs": [{"src": "agx", "dst": "gpu", "mbps": 10, "latency_ms": 2.0}]}}


@pytest.fixture(scope="module")
def profiles():
    return {d: analytic_profile("llama2-7b", d, kv_lens=(32, 128))
            for d in ("jetson-agx-orin-32gb", "jetson-orin-nx-16gb", "rtx-3090-24gb")}


@pytest.fixture()
def testbed(tmp_path):
    path = tmp_path / "tb.yaml"
    path.write_text(yaml.safe_dump(TESTBED))
    return load_testbed(path)


def test_build_problem_fields(profiles, testbed):
    wl = Workload(prompt_len=32, gen_tokens=96, batch=4, micro_batches=2)
    p = build_problem(profiles, testbed, wl)
    prof = profiles["jetson-agx-orin-32gb"]
    assert p.n_units == 34 and p.names == ["agx", "nx", "gpu"]
    assert p.devices[0].source and p.devices[2].cloud and p.micro_batch_size == 2
    # decode time averaged over the generated tokens' KV lengths 32..127 (linear between 32 and 128)
    want = [sum(prof.decode_ms(k)[u] for k in range(32, 128)) / 96 for u in range(34)]
    assert p.devices[0].unit_ms == pytest.approx(want)
    # params + KV of 128 tokens x 4 sequences; activations of one micro-batch (2 sequences)
    assert p.units[5].mem_bytes == prof.param_bytes()[5] + prof.kv_bytes_per_token()[5] * 128 * 4
    assert p.units[5].out_bytes == prof.out_bytes_per_token()[5] * 2
    assert p.return_bytes == 8 * 2  # an int64 token id per sequence of a micro-batch
    assert p.link("agx", "gpu").mbps == 10 and p.link("gpu", "agx").mbps == 1000
    assert p.devices[2].memory_bytes == 22 * 2**30
    assert solve(p, "latency").stages[0].device == "agx"


def test_return_hop_priced_as_the_runtime_sends_it(profiles, testbed):
    head = profiles["jetson-agx-orin-32gb"].out_bytes_per_token()[-1]  # logits of one sequence (batch-1 profile)
    for mbs in (1, 3):
        wl = Workload(batch=2 * mbs, micro_batches=2)
        assert build_problem(profiles, testbed, wl).return_bytes == 8 * mbs
        assert build_problem(profiles, testbed, wl, returns="tokens").return_bytes == 8 * mbs
        logits = build_problem(profiles, testbed, wl, returns="logits")
        assert logits.return_bytes == head * mbs and head > 8
        assert logits.meta["returns"] == "logits"
        assert build_problem(profiles, testbed, wl, returns=4).return_bytes == 4 * mbs
    with pytest.raises(KitError, match="returns: 'ids'"):
        build_problem(profiles, testbed, Workload(), returns="ids")


def test_runtime_fixed_costs_from_an_object_or_a_dict(profiles, testbed):
    costs = {"stage_ms": {"rtx-3090-24gb": 0.7}, "step_ms": 1.5}

    class Costs:  # the shape of runtime.calibrate's RuntimeCosts
        stage_ms = costs["stage_ms"]
        step_ms = costs["step_ms"]

    a, b = build_problem(profiles, testbed, runtime=costs), build_problem(profiles, testbed, runtime=Costs())
    assert a == b and a.step_ms == 1.5 and [d.stage_ms for d in a.devices] == [0.0, 0.0, 0.7]
    assert a.meta["runtime_overheads"] == costs
    assert "runtime_overheads" not in build_problem(profiles, testbed).meta


def test_build_problem_errors(profiles, testbed):
    with pytest.raises(KitError, match="no profile is given for it"):
        build_problem({"rtx-3090-24gb": profiles["rtx-3090-24gb"]}, testbed, Workload())
    with pytest.raises(KitError, match="not a multiple"):
        Workload(batch=3, micro_batches=2)
    with pytest.raises(KitError, match="prompt_len"):
        Workload(prompt_len=0)


def test_cli_dump_problem(profiles, tmp_path, capsys):
    paths = [str(save_profile(p, tmp_path / d)) for d, p in profiles.items()]
    tb = tmp_path / "tb.yaml"
    tb.write_text(yaml.safe_dump(TESTBED))
    out = tmp_path / "problem.json"
    assert main(["plan", "--profiles", ",".join(paths), "--testbed", str(tb), "--prompt-len", "16",
                 "--gen-tokens", "8", "--dump-problem", str(out)]) == 0
    p = load_problem(out)
    assert p.n_units == 34 and p.meta["workload"]["prompt_len"] == 16
    assert main(["plan", "--problem", str(out), "--objective", "throughput", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["objective"] == "throughput"
