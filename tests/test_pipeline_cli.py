"""`edgeshard generate --testbed`: plan (given or solved), deploy, generate, tear down; one JSON object."""

import json
import subprocess
import sys

import psutil
import pytest

from edgeshard_kit.model.generate import generate_split
from edgeshard_kit.planning.plan import Plan, save_plan
from edgeshard_kit.core.units import Stage

TESTBED = """name: t
devices:
  - {name: e0, type: cpu-local, memory: 1GiB, source: true}
  - {name: e1, type: cpu-local, memory: 1GiB}
links:
  default: {mbps: 1000, latency_ms: 0.5}
emulation: {mode: app}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    d = tmp_path_factory.mktemp("cli")
    ck = tiny_checkpoint
    tb = d / "tb.yaml"
    tb.write_text(TESTBED)
    return ck, tb, d


def _run(*args):
    before = {p.pid for p in psutil.process_iter()}
    out = subprocess.run([sys.executable, "-m", "edgeshard_kit", "generate", *map(str, args)],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    workers = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid not in before
               and "edgeshard_kit.runtime.worker" in " ".join(p.info["cmdline"] or [])]
    assert not workers, "generate left a worker process running"
    return out


@pytest.mark.slow
def test_generate_with_a_plan_file(setup):
    ck, tb, d = setup
    plan = save_plan(Plan("latency", (Stage("e0", 0, 2), Stage("e1", 2, 4)), 0, 0, 0), d / "plan.json")
    out = _run("--model", ck, "--prompt", "hello world", "--prompt", "a b", "--max-new-tokens", 4,
               "--testbed", tb, "--plan", plan, "--micro-batches", 2, "--schedule", "bubbles", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    ref = generate_split(ck, prompts=["hello world", "a b"], max_new_tokens=4)
    assert res["tokens"] == ref.tokens and res["text"] == ref.text
    assert res["plan"] == [{"device": "e0", "start": 0, "end": 2}, {"device": "e1", "start": 2, "end": 4}]
    assert res["summary"]["mode"] == "pipelined" and res["summary"]["schedule"] == "bubbles"
    assert {r["stage"] for r in res["per_stage"]} == {0, 1}


@pytest.mark.slow
def test_generate_plans_itself_and_prints_the_prediction(setup):
    ck, tb, d = setup
    out = _run("--model", ck, "--prompt", "hello", "--max-new-tokens", 3, "--testbed", tb, "--objective", "latency")
    assert out.returncode == 0, out.stderr
    assert "predicted" in out.stdout and "plan: " in out.stdout


def test_generate_bad_plan_exits_2(setup):
    ck, tb, d = setup
    out = _run("--model", ck, "--prompt", "x", "--testbed", tb, "--plan", d / "missing.json")
    assert out.returncode == 2 and "missing.json" in out.stderr and "Traceback" not in out.stderr
