"""What the runtime refuses before deploying or sending anything: bad plans, plans that do not fit, bad sampling
settings, prompts the local path refuses; the workload a testbed run plans for; the release rule with stopped
micro-batches."""

import pytest

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage
from edgeshard_kit.model.checkpoint import load_tokenizer
from edgeshard_kit.model.generate import check_sampling, encode_prompts, generate_split
from edgeshard_kit.planning.build import Workload, build_problem
from edgeshard_kit.planning.schedule import release
from edgeshard_kit.profiling.measure import measure_profile
from edgeshard_kit.runtime.deployment import check_plan, deploy
from edgeshard_kit.runtime.quickplan import prompt_workload, quick_workload
from helpers import plan_of

LONG = "a" + " a" * 2799  # 2,801 tokens with <s> (the tiny tokenizer has a token for " a")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(layers=4, seed=1)


@pytest.fixture(scope="module")
def dep(ckpt, local_testbed):
    d = deploy(plan_of(("d0", 0, 3), ("d1", 3, 6)), local_testbed(2), ckpt)
    yield d
    d.close()


# ---- plans -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages,words", [((("d0", 0, 3), ("d1", 2, 6)), "overlaps"),
                                          ((("d0", 0, 2), ("d1", 3, 6)), r"units \[2, 3\) are not covered"),
                                          ((("d0", 0, 3), ("d1", 3, 5)), r"units \[5, 6\) are not covered"),
                                          ((("d0", 0, 3), ("d1", 3, 7)), "out of range"),
                                          ((("d1", 0, 3), ("d0", 3, 6)), "source"),
                                          ((("d0", 0, 3), ("zz", 3, 6)), "unknown device")])
def test_deploy_refuses_bad_plans_before_starting_workers(ckpt, local_testbed, stages, words, monkeypatch):
    started = []
    monkeypatch.setattr("edgeshard_kit.runtime.deployment.start_workers", lambda *a: started.append(a))
    with pytest.raises(KitError, match=words):
        deploy(plan_of(*stages), local_testbed(2), ckpt)
    assert not started


def test_plan_that_does_not_fit_the_memory_is_refused_with_a_problem(tiny_checkpoint, local_testbed):
    """The tiny model's 0.46 MB fits two 600 KiB devices; its KV cache of 2,805 tokens (1.4 MB) does not."""
    tb = local_testbed(2, memory="600KiB")
    ck = tiny_checkpoint
    prof = {"cpu": measure_profile(ck, prompt_len=4, kv_lens=(6,), repeats=1, warmup=0, progress=False, threads=1)}
    stages = [Stage("d0", 0, 2), Stage("d1", 2, 4)]
    check_plan(stages, tb, ck, build_problem(prof, tb, Workload(prompt_len=8, gen_tokens=4)))
    with pytest.raises(KitError, match="memory"):
        check_plan(stages, tb, ck, build_problem(prof, tb, Workload(prompt_len=2801, gen_tokens=4)))


# ---- sampling and prompts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_p", [(-1.0, 1.0), (0.0, 0.0), (1.0, 1.5)])
def test_bad_sampling_is_refused_and_the_deployment_stays_usable(dep, ckpt, temperature, top_p):
    with pytest.raises(KitError) as local:
        check_sampling(temperature, top_p)
    with pytest.raises(KitError) as remote:
        dep.generate(["hello"], 2, temperature=temperature, top_p=top_p)
    assert str(remote.value) == str(local.value)
    assert not dep.closed
    assert dep.generate(["hello"], 2).tokens == generate_split(ckpt, prompts=["hello"], max_new_tokens=2).tokens


@pytest.mark.parametrize("prompts", [["  "], ["hello", " \t "], [""], []])
def test_prompts_are_refused_or_run_as_on_this_host(dep, ckpt, prompts):
    try:
        local = generate_split(ckpt, prompts=prompts, max_new_tokens=2)
    except KitError as e:
        with pytest.raises(KitError) as remote:
            dep.generate(prompts, 2)
        assert str(remote.value) == str(e)
    else:
        assert dep.generate(prompts, 2).tokens == local.tokens
    assert not dep.closed


def test_bad_token_ids_are_refused_before_sending(dep):
    with pytest.raises(KitError, match="vocabulary"):
        dep.generate([[1, 2, 100000]], 2)
    with pytest.raises(KitError, match="mask"):
        dep.generate([[1, 2, 3]], 2, attention_mask=[[1, 1]])
    assert not dep.closed and dep.generate([[1, 2, 3]], 2).tokens


# ---- the workload a testbed run plans for ------------------------------------------------------------------
def test_prompt_workload_is_the_real_one(ckpt):
    tok = load_tokenizer(ckpt)
    wl = prompt_workload(ckpt, [LONG], 1, 16)
    assert (wl.prompt_len, wl.batch, wl.micro_batches, wl.gen_tokens) == (2801, 1, 1, 16)
    prompts = ["hello world", "a b c the cat sat on the mat", "x"]
    wl = prompt_workload(ckpt, prompts, 2, 5)
    assert wl.prompt_len == encode_prompts(tok, prompts)[0].shape[1]  # the longest, after padding
    assert (wl.batch, wl.micro_batches, wl.micro_batch_size) == (4, 2, 2)  # rounded up: micro-batches of 2, 1
    assert prompt_workload(ckpt, [[5, 6, 7], [8]], 1, 3).prompt_len == 3
    with pytest.raises(KitError, match="text"):
        prompt_workload(ckpt, [[5, 6, 7]], 1, 3, chat=True)
    with pytest.raises(KitError, match="micro-batches"):
        prompt_workload(ckpt, ["a", "b"], 3, 3)
    assert quick_workload(5, 2, 8, 4).batch == 6


# ---- the release rule with micro-batches that stopped (EOS) ------------------------------------------------
def test_release_with_finished_micro_batches():
    assert release("no-bubbles", 1, 1, 3, finished={1}) == []
    assert release("no-bubbles", 1, 1, 3, finished={0}) == [1]
    assert release("bubbles", 1, 1, 1, finished={1}) == []
    # micro-batch 0 stopped at an earlier step: it counts as through, and is not released
    assert release("bubbles", 2, 2, 3, finished={0}) == []
    assert release("bubbles", 2, 3, 3, finished={0}) == [1, 2]
    # the last one back finished at this step: the others go on without it
    assert release("bubbles", 2, 3, 3, finished={2}) == [0, 1]
    assert release("bubbles", 2, 3, 3, finished={0, 1, 2}) == []
