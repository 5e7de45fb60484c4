"""Distributed generation equals transformers generate on one device, for every mode, schedule and plan."""

import psutil
import pytest
import torch

from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.core.errors import KitError
from helpers import plan_of

PROMPTS = ["hello world", "a b c", "the cat sat", "x"]
NEW = 6


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(layers=4, seed=1)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy tokens of transformers' own generate on one device, the padded batch at once."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from edgeshard_kit.model.generate import encode_prompts

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids, mask = encode_prompts(tok, PROMPTS)
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=tok.pad_token_id or 0)
    return out[:, ids.shape[1]:].tolist()


def _children_pids(dep):
    return [h.pid for h in dep.handles]


@pytest.fixture(scope="module")
def two_workers(ckpt, local_testbed):
    """Two workers; the head (last unit) runs on the worker that is not the source."""
    dep = deploy(plan_of(("d0", 0, 3), ("d1", 3, 6)), local_testbed(2), ckpt)
    yield dep
    dep.close()


@pytest.fixture(scope="module")
def three_workers_head_on_source(ckpt, local_testbed):
    """Three workers; the head runs on the source device again (its own worker there)."""
    dep = deploy(plan_of(("d0", 0, 2), ("d1", 2, 4), ("d0", 4, 6)), local_testbed(2), ckpt)
    yield dep
    dep.close()


RUNS = [("sequential", 1, "no-bubbles"), ("pipelined", 2, "bubbles"), ("pipelined", 2, "no-bubbles"),
        ("pipelined", 4, "no-bubbles")]


@pytest.mark.parametrize("mode,k,schedule", RUNS)
def test_two_workers_equal_transformers(two_workers, reference, mode, k, schedule):
    r = two_workers.generate(PROMPTS, NEW, mode=mode, micro_batches=k, schedule=schedule)
    assert r.tokens == reference
    assert len(r.text) == len(PROMPTS)
    assert len(r.per_token) == k * NEW
    assert {rec["stage"] for rec in r.per_stage} == {0, 1}
    assert len(r.per_stage) == 2 * k * NEW
    assert all(rec["compute_ms"] > 0 and rec["bytes_in"] > 0 for rec in r.per_stage)
    assert r.summary["tokens_per_s"] > 0 and r.summary["micro_batches"] == k


@pytest.mark.parametrize("mode,k,schedule", RUNS[:3])
def test_three_workers_head_on_source_equal_transformers(three_workers_head_on_source, reference, mode, k, schedule):
    r = three_workers_head_on_source.generate(PROMPTS, NEW, mode=mode, micro_batches=k, schedule=schedule)
    assert r.tokens == reference
    assert [s["device"] for s in r.stages] == ["d0", "d1", "d0"]
    assert all(s["load_s"] > 0 and s["rss_bytes"] > 0 for s in r.stages)


def test_sampling_is_reproducible_with_a_seed(two_workers):
    a = two_workers.generate(PROMPTS[:2], NEW, temperature=1.0, top_p=0.9, seed=7)
    b = two_workers.generate(PROMPTS[:2], NEW, temperature=1.0, top_p=0.9, seed=7)
    assert a.tokens == b.tokens


def test_sampling_matches_the_local_split(two_workers, ckpt):
    from edgeshard_kit.model.generate import generate_split

    r = two_workers.generate(PROMPTS[:2], NEW, temperature=0.8, seed=3)
    ref = generate_split(ckpt, prompts=PROMPTS[:2], max_new_tokens=NEW, temperature=0.8, seed=3)
    assert r.tokens == ref.tokens


def test_token_ids_and_bad_arguments(two_workers, reference, ckpt):
    from edgeshard_kit.model.checkpoint import load_tokenizer
    from edgeshard_kit.model.generate import encode_prompts

    ids, mask = encode_prompts(load_tokenizer(ckpt), PROMPTS)
    r = two_workers.generate(ids, NEW, attention_mask=mask, mode="pipelined", micro_batches=2)
    assert r.tokens == reference and r.text == []
    with pytest.raises(KitError, match="micro_batches"):
        two_workers.generate(PROMPTS, 2, mode="pipelined", micro_batches=5)
    with pytest.raises(KitError, match="mode"):
        two_workers.generate(PROMPTS, 2, mode="parallel")


def test_on_token_streams_every_token_and_stops_at_a_boundary(two_workers, reference):
    """The hook sees each token as it arrives (reference: transformers' generate); True stops the run there."""
    seen = []
    r = two_workers.generate(PROMPTS, NEW, on_token=lambda rec, toks: seen.append((rec["step"], toks)))
    assert [s for s, _ in seen] == list(range(NEW))
    assert [list(col) for col in zip(*(toks for _, toks in seen))] == reference == r.tokens
    r = two_workers.generate(PROMPTS, NEW, on_token=lambda rec, toks: rec["step"] == 2)
    assert r.tokens == [row[:3] for row in reference]
    assert two_workers.generate(PROMPTS, NEW).tokens == reference  # the deployment stays usable


def test_interleaved_latency_compares_the_same_tokens(two_workers, ckpt):
    """bench pipeline-latency's measurement: one-process decode steps run in the pipeline's hook decode the
    same greedy tokens as the workers, and every decode step is paired."""
    from transformers import LlamaForCausalLM

    from edgeshard_kit.bench.pipeline import OneProcess, TwoProcesses, interleaved_latency
    from edgeshard_kit.model.generate import build_stages

    ids = [[5, 9, 17, 33]]
    one = OneProcess(build_stages(ckpt, [(0, 6)]), len(ids[0]) + NEW)
    floor = TwoProcesses(ckpt, 3, 6, len(ids[0]) + NEW)  # the same halves, two processes, plain sockets
    try:
        rows = interleaved_latency(two_workers, one, ids, NEW, repeats=2, floor=floor)
    finally:
        floor.close()
    assert [p.returncode for p in floor.procs] == [0, 0]
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ref = model.generate(input_ids=torch.tensor(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         pad_token_id=0)[0, len(ids[0]):].tolist()
    assert one.tokens == ref == floor.tokens and len(one.ms) == len(floor.ms) == NEW - 1
    assert [r["same_tokens"] for r in rows] == [True, True]
    assert all(r["ratio"] > 0 and r["runtime_ratio"] > 0 and r["tokens"] == NEW for r in rows)
    with pytest.raises(KitError, match="at least 2"):
        interleaved_latency(two_workers, one, ids, 1, repeats=1)


def test_records_are_dataframe_ready(two_workers):
    r = two_workers.generate(PROMPTS, 3, mode="pipelined", micro_batches=2)
    frames = r.frames()
    assert set(frames["per_stage"].columns) >= {"stage", "mb", "step", "compute_ms", "send_ms", "recv_ms",
                                                 "wait_ms", "bytes_in", "bytes_out"}
    assert len(frames["per_token"]) == 6
    assert r.prediction  # the plan's own figures when no problem is given


def test_close_leaves_no_worker(ckpt, local_testbed):
    dep = deploy(plan_of(("d0", 0, 2), ("d1", 2, 6)), local_testbed(2), ckpt)
    pids = _children_pids(dep)
    with dep:
        assert dep.generate(["hi"], 2).tokens
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(KitError, match="closed"):
        dep.generate(["hi"], 2)


def test_deploy_rejects_bad_plans(ckpt, local_testbed, tmp_path):
    tb = local_testbed(2)
    with pytest.raises(KitError, match="source"):
        deploy(plan_of(("d1", 0, 3), ("d0", 3, 6)), tb, ckpt)
    with pytest.raises(KitError, match="unknown device"):
        deploy(plan_of(("d0", 0, 3), ("zz", 3, 6)), tb, ckpt)
    with pytest.raises(KitError, match="not a directory"):
        deploy(plan_of(("d0", 0, 6)), tb, tmp_path / "nope")
