"""`edgeshard generate --testbed`: plan (given or solved) for the real prompts, deploy, generate, tear down;
the same checks, chat and stop-at-EOS behaviour as `generate` on this host."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import uuid

import psutil
import pytest

from edgeshard_kit.cli.main import main
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


def _ours(p: psutil.Process, mark: str) -> bool:
    """A worker started by this test's command (its environment carries the mark; other tests run beside us)."""
    try:
        return "edgeshard_kit.runtime.worker" in " ".join(p.cmdline()) and p.environ().get("ESK_TEST_RUN") == mark
    except (psutil.Error, OSError):
        return False


def _run(*args, input=None):
    mark = uuid.uuid4().hex
    out = subprocess.run([sys.executable, "-m", "edgeshard_kit", "generate", *map(str, args)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "ESK_TEST_RUN": mark},
                         **({"input": input} if input is not None else {"stdin": subprocess.DEVNULL}))
    workers = [p for p in psutil.process_iter() if _ours(p, mark)]
    assert not workers, "generate left a worker process running"
    return out


def _here(*args) -> subprocess.CompletedProcess:
    """`edgeshard generate` on this host (no testbed), run in this process: the reference a testbed's run is
    compared with (exit status, stdout, stderr as `_run` gives them; a process start less per comparison)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["generate", *map(str, args)])
        except SystemExit as e:  # argparse's own refusals
            rc = e.code
    return subprocess.CompletedProcess(["edgeshard", "generate", *map(str, args)], rc, out.getvalue(), err.getvalue())


def _here_on_testbed(*args) -> subprocess.CompletedProcess:
    """`edgeshard generate --testbed ...` run in this process (`_here`): for the checks and refusals, where the
    process boundary is not what is tested (`_run` covers that); no worker it started may outlive it."""
    out = _here(*args)
    left = [p for p in psutil.Process().children(recursive=True) if _is_worker(p)]
    assert not left, "generate left a worker process running"
    return out


def _is_worker(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE and \
            "edgeshard_kit.runtime.worker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def _json(out) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _refused(out) -> str:
    """The one-line error of a refused command (exit 2, no traceback)."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr.strip()


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
    out = _here_on_testbed("--model", ck, "--prompt", "x", "--testbed", tb, "--plan", d / "missing.json")
    assert out.returncode == 2 and "missing.json" in out.stderr and "Traceback" not in out.stderr


def _plan_file(d, name, *stages):
    return save_plan(Plan("latency", tuple(Stage(*s) for s in stages), 0, 0, 0), d / name)


@pytest.fixture(scope="module")
def four(tmp_path_factory, tiny_checkpoint_factory):
    """A 4-layer checkpoint (6 units) and a testbed file."""
    d = tmp_path_factory.mktemp("four")
    (d / "tb.yaml").write_text(TESTBED)
    return tiny_checkpoint_factory(layers=4, seed=1), d / "tb.yaml", d


@pytest.mark.parametrize("stages,words", [((("e0", 0, 3), ("e1", 2, 6)), "overlaps"),
                                          ((("e0", 0, 2), ("e1", 3, 6)), "not covered"),
                                          ((("e0", 0, 3), ("e1", 3, 5)), "not covered"),
                                          ((("e0", 0, 3), ("zz", 3, 6)), "unknown device")])
def test_generate_refuses_a_bad_plan_before_deploying(four, stages, words):
    ck, tb, d = four
    plan = _plan_file(d, f"bad-{words.replace(' ', '_')}.json", *stages)
    err = _refused(_here_on_testbed("--model", ck, "--prompt", "hello", "--max-new-tokens", 2, "--testbed", tb,
                                    "--plan", plan))
    assert words in err and "plan" in err


def test_sampling_is_checked_as_on_this_host(four):
    ck, tb, d = four
    plan = _plan_file(d, "ok.json", ("e0", 0, 3), ("e1", 3, 6))
    for bad in (["--top-p", "0"], ["--top-p", "1.5"], ["--temperature", "-1"]):
        local = _refused(_here("--model", ck, "--prompt", "hello", *bad))
        remote = _refused(_here_on_testbed("--model", ck, "--prompt", "hello", *bad, "--testbed", tb, "--plan", plan))
        assert remote == local


def test_whitespace_prompts_as_on_this_host(four):
    ck, tb, d = four
    plan = _plan_file(d, "ok.json", ("e0", 0, 3), ("e1", 3, 6))
    args = ["--prompt", " \t ", "--prompt", "", "--max-new-tokens", 3, "--json"]
    local = _here("--model", ck, *args)
    remote = _here_on_testbed("--model", ck, *args, "--testbed", tb, "--plan", plan)
    assert remote.returncode == local.returncode, (local.stderr, remote.stderr)
    if local.returncode:
        assert _refused(remote) == _refused(local)
    else:
        assert _json(remote)["tokens"] == _json(local)["tokens"]


def test_chat_needs_text_prompts(four):
    ck, tb, d = four
    assert "--chat" in _refused(_here("--model", ck, "--prompt-ids", "1,2", "--chat"))
    assert "--chat" in _refused(_here_on_testbed("--model", ck, "--prompt-ids", "1,2", "--chat", "--testbed", tb))


def test_plans_for_the_real_prompt_length(setup, tmp_path):
    """Without --plan the problem has the prompts' real length: a 2,801-token prompt's KV cache does not fit."""
    ck, _, d = setup
    tb = tmp_path / "small.yaml"
    tb.write_text(TESTBED.replace("memory: 1GiB", "memory: 600KiB"))  # the 0.46 MB model fits, 1.4 MB of KV does not
    long = "a" + " a" * 2799  # 2,801 tokens with <s>
    err = _refused(_here_on_testbed("--model", ck, "--prompt", long, "--max-new-tokens", 4, "--testbed", tb))
    assert "infeasible" in err
    res = _json(_here_on_testbed("--model", ck, "--prompt", "a a a", "--max-new-tokens", 4, "--testbed", tb, "--json"))
    assert res["tokens"] == generate_split(ck, prompts=["a a a"], max_new_tokens=4).tokens


@pytest.mark.slow
def test_chat_and_stop_at_eos_on_a_testbed_equal_this_host(four, tmp_path):
    """--chat (which stops at EOS) and --stop-at-eos give the tokens of `generate` on this host, pipelined too."""
    ck, tb, d = four
    chat = tmp_path / "chat"
    shutil.copytree(ck, chat)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    tok.save_pretrained(chat)
    prompts = ["hello world", "a b c", "the cat sat", "x"]
    args = [a for p in prompts for a in ("--prompt", p)] + ["--max-new-tokens", 6, "--json"]
    greedy = generate_split(chat, prompts=prompts, max_new_tokens=6, chat=True, stop_at_eos=False).tokens
    # EOS ids that greedy decoding produces: rows end early, as a trained model's would
    eos = sorted({greedy[0][2], greedy[2][3]})
    (chat / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 3}))
    plan = _plan_file(d, "chat.json", ("e0", 0, 3), ("e1", 3, 6))
    runs = [(["--chat"], ["--micro-batches", 2, "--schedule", "bubbles"]), (["--stop-at-eos"], ["--micro-batches", 4])]
    local: dict[str, dict] = {}
    for flags, extra in runs:
        key = " ".join(flags)
        if key not in local:
            local[key] = _json(_here("--model", chat, *args, *flags))
            if key == "--chat":  # rows ended: padded with 3, or all ended together
                assert any(3 in row for row in local[key]["tokens"]) or len(local[key]["tokens"][0]) < 6
        run = _run if key == "--chat" else _here_on_testbed  # one through a process of its own, one in this one
        remote = _json(run("--model", chat, *args, *flags, "--testbed", tb, "--plan", plan, *extra))
        assert remote["tokens"] == local[key]["tokens"] and remote["text"] == local[key]["text"], (flags, extra)
