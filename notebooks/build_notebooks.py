"""Writes the kit's five notebooks (nbformat v4): linear, a papermill `parameters` cell, logic in the library."""

from __future__ import annotations

import platform
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from edgeshard_kit.experiments.notebooks import KERNEL, KERNEL_DISPLAY

HERE = Path(__file__).resolve().parent

UNITS_MD = r"""
**The unit convention.** A model with $N$ decoder layers has $N+2$ *units*: unit $0$ is the token
embedding, units $1..N$ are the decoder layers, unit $N+1$ is the final norm and the `lm_head`
(Llama2-7B: 34 units). A stage owns a half-open range $[s, e)$ of units; a plan is an ordered list of
`(device, start, end)` covering $[0, N+2)$ exactly. Unit 0 runs on the *source* device, the one that
holds the user's prompt.
"""

DP_MD = r"""
**The two dynamic programmes** (EdgeShard, §IV). Let $t_{d,u}$ be the time of unit $u$ on device $d$
(ms), $m_u$ its memory (bytes), $o_u$ the activation bytes it sends on, $\tau_{a\to b}(x)$ the time to
send $x$ bytes over the link $a\to b$ (latency $+\,8x/\text{Mbps}$), $M_d$ device $d$'s memory budget.

*Latency* (one request, stages run one after another). $L(e, d)$ = least time to finish units
$[0, e)$ with the last stage $[s, e)$ on device $d$:

$$L(e, d) = \min_{s<e,\ d'} \Big[ L(s, d') + \tau_{d'\to d}(o_{s-1}) \Big] + \sum_{u=s}^{e-1} t_{d,u},
\qquad \text{s.t. } \sum_{u=s}^{e-1} m_u \le M_d,$$

with $L(e, \text{src}) = \sum_{u<e} t_{\text{src},u}$ for the first stage, and the answer
$\min_d L(N+2, d) + \tau_{d\to\text{src}}(\text{token})$ (the token goes back to the source).

*Throughput* (micro-batches in a pipeline, every stage busy at once). With $S$ the set of devices
used so far, $B(e, d, S)$ = least *bottleneck* (slowest stage or link) over plans of $[0, e)$ ending on $d$:

$$B(e, d, S) = \min_{s<e,\ d' \in S} \max\Big( B(s, d', S\setminus\{d\}),\ \tau_{d'\to d}(o_{s-1}),\
\sum_{u=s}^{e-1} t_{d,u} \Big),$$

and the throughput is $\text{micro-batch size} \times 1000 / B$ tokens per second.
"""

BUBBLE_MD = r"""
**What a bubble is.** In the Gantt chart every row is a resource (a device, or a link); a bar is one
micro-batch being computed (solid) or sent (hatched). A *bubble* is a gap in a row: that resource waits
for its input. With $P$ stages and $K$ micro-batches a pipeline fills and drains, so each device idles
for roughly a fraction $\frac{P-1}{K+P-1}$ of the time; more micro-batches shrink the bubbles, and the
slowest resource (the bottleneck) sets the steady-state rate.
"""


def build(cells: list[tuple[str, str]], title: str) -> nbformat.NotebookNode:
    """A notebook from ("md" | "params" | "code", source) pairs."""
    nb = new_notebook()
    # What JupyterLab writes once the kernel is up (the kernelspec's names, ipykernel's language_info): stored as
    # is, opening a notebook does not mark it modified. language_info.version is this interpreter's.
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": KERNEL_DISPLAY, "language": "python"}
    nb.metadata["language_info"] = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                                    "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                                    "pygments_lexer": "ipython3", "version": platform.python_version()}
    nb.metadata["title"] = title
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            nb.cells.append(new_markdown_cell(src))
        else:
            cell = new_code_cell(src)
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    return nb


NB01 = [
    ("md", """
# 01 · Profile a testbed

EdgeShard's first step: measure what every unit costs on every *device type* (prefill and decode time,
memory), and measure every *link* (bandwidth, round-trip time). The planner only ever sees these numbers.
The model is the kit's default, SmolLM2-135M-Instruct (30 decoder layers = 32 units, converted once into the
kit's cache folder by `edgeshard fetch-model`); `model_path = "tiny"` profiles a tiny random checkpoint instead.
""" + UNITS_MD),
    ("params", """
model_path = ""                    # empty: SmolLM2-135M-Instruct (the default); "tiny": a tiny random checkpoint;
                                   # or a Hugging Face Llama checkpoint folder
tiny_layers = 4                    # tiny model: decoder layers
tiny_hidden = 128                  # tiny model: hidden size
testbed_file = "../testbed/local.yaml"
repeats = 5                        # timed repeats per figure (median, min, max kept)
prompt_len = 32                    # tokens timed for prefill (the paper's prompts: 32 tokens)
kv_lens = "32,128"                 # cached tokens at which decode is timed (32 prompt + 96 generated)
probe_bytes = 262144               # bytes per link probe message
out_dir = ""                       # results folder; empty: a new run folder under results_root
results_root = "../results"
"""),
    ("code", """
import pandas as pd

from edgeshard_kit.experiments import plots
from edgeshard_kit.experiments import results
from edgeshard_kit.experiments import steps

plots.notebook_renderer()
run = results.new_run("01_profile_testbed", steps.params_of(globals()), root=results_root, out=out_dir or None)
checkpoint = steps.checkpoint_for(model_path, run.path, layers=tiny_layers, hidden=tiny_hidden)
testbed = steps.load_testbed(testbed_file)
run.record(testbed=testbed, checkpoint=str(checkpoint))
pd.DataFrame(testbed.to_dict()["devices"]).fillna("")
"""),
    ("md", """
Every ordered pair of devices and the link the inventory declares for it (`inf` Mbps: not shaped).
"""),
    ("code", """
pd.DataFrame([{"src": a, "dst": b, "mbps": testbed.link(a, b).mbps, "latency_ms": testbed.link(a, b).latency_ms}
              for a in testbed.names for b in testbed.names if a != b])
"""),
    ("md", """
## Per-unit cost on each device type
Devices of the same type share a profile. Times are medians over the repeats (ms); every row of the CSV is
one measurement figure, ready for pandas.
"""),
    ("code", """
profiles = steps.profile_testbed(checkpoint, testbed, repeats=repeats, prompt_len=prompt_len, kv_lens=kv_lens, run=run)
table = steps.profiles_frame(profiles)
run.write_csv("profiles", table)
table.head(12)
"""),
    ("code", """
prefill = table[table.phase == "prefill"]
decode = table[(table.phase == "decode") & (table.kv_len == table.kv_len.max())]
figs = {"prefill_time": plots.per_unit(prefill, y="median_ms", color="device_type", title="prefill time per unit (ms)"),
        "decode_time": plots.per_unit(decode, y="median_ms", color="device_type", title="decode time per unit (ms)"),
        "memory": plots.per_unit(prefill, y="param_bytes", color="device_type", title="parameter bytes per unit")}
for name, fig in figs.items():
    run.save_figure(name, fig); fig.show()
"""),
    ("md", """
## Links
Each ordered pair of devices is probed over the kit's own wire: round-trip time of a small message and the
goodput of `probe_bytes`-byte messages, beside what the inventory declares.
"""),
    ("code", """
links = steps.probe_links(testbed, nbytes=probe_bytes)
run.write_csv("links", links)
run.finish()
pd.DataFrame(links)
"""),
]

OBJECTIVES_MD = r"""
**Three objectives, and what "throughput" means.** $L$ is a plan's per-token latency (every stage and
transfer one after another, one micro-batch in flight) and $B$ its bottleneck (the slowest stage or link).

* *latency*: the plan with the least $L$; what one request sees.
* *throughput at K* (`objective = "throughput"`, the default): the most tokens per second with exactly $K$
  micro-batches in flight. $K$ micro-batches go round the pipeline in $\max(L, K B)$ ms, so the plan maximises
  $K \cdot 1000 / \max(L, K B)$ tokens/s (times the micro-batch size). With few micro-batches a long pipeline
  never fills: a short plan with a low $L$ beats a long one with a lower $B$.
* *steady-state throughput* (`"throughput-steady"`): the paper's dynamic programme below, the least $B$ as if the
  pipeline were kept full. It reaches $1000 / B$ tokens/s only with $K \ge L / B$ micro-batches in flight; at a
  smaller $K$ its many stages sit idle. It is kept, under its own name, to reproduce the paper.

Switch between the last two at the default $K = 4$ and compare the readout and the table: the steady-state
plan's "steady state" figure is never lower, and its tokens/s at $K$ never higher (at 20 Mbps to the cloud it
has many more stages and far fewer tokens/s at $K$).
"""

NB02 = [
    ("md", """
# 02 · Plan interactively

Move the controls: every change re-solves the placement problem and updates, under the controls, a readout of the
plan (its stages, predicted ms per token and tokens/s), the layer-to-device map, the predicted per-token latency
and throughput beside the baselines, the pipeline timeline and the methods' table. The two bandwidth sliders set
every link to or from the cloud server (*edge ↔ cloud*, the paper's main knob) and every link between two edge
devices (*edge ↔ edge*); single links are under *advanced*. When no plan fits (a memory too small, too many
devices off) the readout says which constraint fails and the figures are cleared.
""" + OBJECTIVES_MD + UNITS_MD + DP_MD + BUBBLE_MD),
    ("params", """
problem_file = ""            # a problem JSON (edgeshard plan --dump-problem); empty: the paper setting, Llama2-7B
objective = "throughput"     # latency | throughput (tokens/s at micro_batches) | throughput-steady (the paper's DP)
micro_batches = 4            # K: micro-batches in flight (throughput at K, the timeline, the table)
out_dir = ""                 # results folder; empty: a new run folder under results_root
results_root = "../results"
"""),
    ("code", """
from edgeshard_kit.experiments import interactive
from edgeshard_kit.experiments import plots
from edgeshard_kit.experiments import results
from edgeshard_kit.experiments import steps

plots.notebook_renderer()
run = results.new_run("02_plan_interactive", steps.params_of(globals()), root=results_root, out=out_dir or None)
problem = interactive.problem_for(problem_file)
explorer = interactive.PlanExplorer(problem, objective=objective, micro_batches=micro_batches)
explorer.widget
"""),
    ("md", """
## The first solve, for the record
The widget above follows the controls; it needs a live kernel. For exported HTML and papermill runs, here is the
first solve again as static figures and a table, and the run folder gets its CSVs and figures.
"""),
    ("code", """
explorer.show_static()
explorer.save(run)
run.finish()
explorer.table_frame()
"""),
]

NB03 = [
    ("md", """
# 03 · Deploy a plan and generate

Plan on measured profiles, start one worker per chosen device, stream activations stage to stage over TCP,
and compare: the tokens against one-device generation (they must be identical), and the measured per-stage
times against the planner's prediction. With `testbed_file = ""` the testbed is local: three edge processes
too small to hold the model alone and a cloud process behind a `cloud_mbps` link (shaped in the kit's wire).
The model is SmolLM2-135M-Instruct, and the prompt a chat prompt (its chat template, generation stops at the
end-of-turn token); `model_path = "tiny"` with `chat = False` runs a tiny random checkpoint in seconds.
""" + UNITS_MD),
    ("params", """
model_path = ""                    # empty: SmolLM2-135M-Instruct; "tiny": a tiny random checkpoint in the results folder
tiny_layers = 4
tiny_hidden = 128
testbed_file = ""                  # empty: the built-in local testbed (3 edge processes + cloud)
cloud_mbps = 20.0                  # built-in testbed: bandwidth of the links to the cloud
objective = "latency"              # latency | throughput | throughput-steady (one prompt: 1 micro-batch)
prompt = "Why does a heavy ship made of steel float on water while a small stone sinks? Explain it simply."
chat = True                        # the prompt is a user message through the model's chat template (stops at EOS)
max_new_tokens = 48
repeats = 3                        # profiling repeats
out_dir = ""
results_root = "../results"
"""),
    ("code", """
from edgeshard_kit.experiments import plots, results, steps, testbeds

plots.notebook_renderer()
run = results.new_run("03_deploy_and_generate", steps.params_of(globals()), root=results_root, out=out_dir or None)
checkpoint = steps.checkpoint_for(model_path, run.path, layers=tiny_layers, hidden=tiny_hidden)
testbed = steps.load_testbed(testbed_file) if testbed_file else testbeds.bench_testbed(checkpoint, cloud_mbps)
profiles = steps.profile_testbed(checkpoint, testbed, repeats=repeats, prompt_len=32, kv_lens="32,64", run=run)
problem, plan = steps.plan_for(profiles, testbed, objective, prompt_len=32, gen_tokens=max_new_tokens)
run.record(testbed=testbed, plan=plan)
plots.partition_map(plan, devices=testbed.names, n_units=problem.n_units).show()
"""),
    ("code", """
out = steps.deploy_and_generate(checkpoint, testbed, plan, prompt, max_new_tokens, problem=problem, chat=chat)
run.write_csv("tokens", out["tokens"]); run.write_csv("stage_timing", out["stages"])
print(repr(out["text"]))
print("tokens identical to one-device generation:", out["matches_reference"])
"""),
    ("md", """
## Measured against predicted
One point per stage (compute) and per hop (transfer, including the token's way back to the source),
averaged over the decode steps; on the dotted line the prediction is exact. The gap is the runtime's own
cost per hop (framing, loopback TCP, Python), which the per-unit profile does not see.
"""),
    ("code", """
fig = plots.predicted_vs_measured(out["stages"], color="kind", title="per-stage time per decode step (ms)")
run.save_figure("predicted_vs_measured", fig); run.finish(matches_reference=out["matches_reference"])
fig.show()
out["stages"]
"""),
]

NB04 = [
    ("md", """
# 04 · EdgeShard against the baselines

The model is SmolLM2-135M-Instruct (32 units); as in the paper, every generation starts from a 32-token
prompt (the kit's prompt set, `edgeshard_kit/data/prompts.txt`, in place of WikiText-2) and generates 96 tokens.
With `model_path = "tiny"` a tiny random checkpoint makes the whole run take a minute.

On a testbed with a *cloud* device behind a shaped link, sweep the cloud link's bandwidth and, at each
bandwidth, deploy and measure: EdgeShard (latency objective, sequential schedule; throughput objective,
pipelined schedule), Edge-Solo (everything on the source), Cloud-Edge-Even (half the units on the source,
half on the cloud), Cloud-Edge-Opt (the best single split between source and cloud) and a
memory-proportional placement. The planner's predictions sit beside the measurements.

Before the sweep the kit measures the runtime's *fixed costs* (with `calibrate = True`): a cost per stage on
each device type (the worker's framework work, decoding and encoding frames) and a cost per token (the
coordinator). The planner then optimises with them, and its predictions (`source = predicted`) sit beside the
paper's model of the same plans (`predicted-paper`: layers and transfers only) and the measurements. On a small
model these fixed costs are of the order of the layers themselves; on Llama2-7B they are a few percent.
""" + DP_MD + BUBBLE_MD),
    ("params", """
model_path = ""                    # empty: SmolLM2-135M-Instruct; "tiny": a tiny random checkpoint; or a folder
tiny_layers = 6
tiny_hidden = 128
testbed_file = ""                  # empty: a built-in local testbed (3 edge processes + cloud, app-level shaping);
                                   # "../testbed/emulated.yaml" (root): brought up for the run, down after
cloud_mbps = "2,20,200"            # cloud link bandwidths swept (Mbps)
methods = "edgeshard-latency,edgeshard-throughput,edge-solo,cloud-edge-even,cloud-edge-opt,mem-proportional"
prompt_len = 32                    # prompt tokens (the kit's prompts cut to this length; the paper: 32)
max_new_tokens = 96                # tokens generated per prompt (the paper: 96)
micro_batches = 3                  # K: micro-batches in flight for every method (throughput at K)
repeats = 3                        # measured generations per (method, bandwidth), interleaved across methods
profile_repeats = 3                # timed repeats per profiled figure
calibrate = True                   # measure per-stage / per-token fixed costs first and plan with them
calibrate_repeats = 6              # generations per calibration deployment, in interleaved windows
probe = True                       # emulated testbed: probe every link at the model's message sizes, plan with it
memory_share = 0.0                 # > 0: scale the testbed file's memory so the source holds this share of the model
out_dir = ""
results_root = "../results"
"""),
    ("code", """
from edgeshard_kit.experiments import benchmark, plots, results, steps

plots.notebook_renderer()
params = steps.params_of(globals())
config = benchmark.BenchmarkConfig.from_params(params)  # every parameter above but out_dir and results_root
run = results.new_run("04_benchmark_vs_baselines", params, root=results_root, out=out_dir or None)
exp = benchmark.run_benchmark(run, config, log=print)
exp.summary
"""),
    ("code", """
for name, fig in exp.figures.items():
    fig.show()
"""),
]

NB05 = [
    ("md", """
# 05 · The paper's setting, by simulation

Llama2-7B, 13B and 70B on the paper's 15-device testbed (Jetson Orin NX, Jetson AGX Orin, an RTX 3090
cloud server), with the paper's measured per-unit times (and the roofline scaling of them for 13B and 70B).
The planner's predictions for EdgeShard and the baselines, swept over the cloud bandwidth, beside the
numbers the paper reports. Nothing runs on real hardware here: this is the cost model.
""" + DP_MD),
    ("params", """
models = "llama2-7b,llama2-13b,llama2-70b"
cloud_mbps = "1,2,5,10,20,50"       # the paper swept 1 to 50 Mbps; its figures are compared at the highest
out_dir = ""
results_root = "../results"
"""),
    ("code", """
from edgeshard_kit.experiments import plots, reproduction, results, steps

plots.notebook_renderer()
run = results.new_run("05_paper_reproduction", steps.params_of(globals()), root=results_root, out=out_dir or None)
rep = reproduction.paper_reproduction(run, models=models, cloud_mbps=cloud_mbps)
rep.summary
"""),
    ("code", """
for name, fig in rep.figures.items():
    fig.show()
"""),
]

NOTEBOOKS = {
    "01_profile_testbed.ipynb": (NB01, "Profile a testbed"),
    "02_plan_interactive.ipynb": (NB02, "Plan interactively"),
    "03_deploy_and_generate.ipynb": (NB03, "Deploy a plan and generate"),
    "04_benchmark_vs_baselines.ipynb": (NB04, "EdgeShard against the baselines"),
    "05_paper_reproduction.ipynb": (NB05, "The paper's setting, by simulation"),
}


def adaptive_cells() -> list[tuple[str, str]]:
    """Notebook 06 (adaptive serving): a slider throttles the cloud links of a running deployment."""
    return [
        ("md", """
# 06 · Adaptive serving: the network changes, the pipeline re-plans

A deployment watches its own per-token timings (`adaptive=AdaptivePolicy(...)`): when a link or a stage drifts
from the plan's prediction it re-solves the plan and moves the shards at a token boundary, rebuilding the KV
caches by recomputation; the tokens stay identical to one-device generation (docs/adaptive.md). On the emulated
testbed (root) the slider below re-shapes the cloud links with tc *under the running workers*; without root the
local testbed cannot change a link under its workers, and a forced switch to the plan the planner would choose at
`throttle_mbps` shows the move instead.
"""),
        ("params", """
model_path = ""                    # empty: SmolLM2-135M-Instruct; "tiny": a tiny random checkpoint in the results folder
tiny_layers = 4
tiny_hidden = 128
testbed = "auto"                   # auto: emulated when root (tc), else local (forced switch) | emulated | local
cloud_mbps = 200.0                 # the cloud links when the generation starts
throttle_mbps = 0.2                # the cloud links after the throttle (the planner's choice moves below ~0.5 Mbps)
max_new_tokens = 80
switch_at = 25                     # headless runs: the scripted throttle (or forced switch) after this many tokens
repeats = 3                        # profiling repeats
parallel_profile = False           # True: the device types profiled at once (faster; emulated, they share memory bandwidth)
out_dir = ""
results_root = "../results"
"""),
        ("code", """
from edgeshard_kit.experiments import adaptive_demo, plots, results, steps

plots.notebook_renderer()
run = results.new_run("06_adaptive", steps.params_of(globals()), root=results_root, out=out_dir or None)
checkpoint = steps.checkpoint_for(model_path, run.path, layers=tiny_layers, hidden=tiny_hidden)
demo = adaptive_demo.AdaptiveDemo(checkpoint, testbed, cloud_mbps, throttle_mbps, max_new_tokens, switch_at,
                                  profile_repeats=repeats, run=run, parallel_profile=parallel_profile or None)
print(demo.summary())
"""),
        ("md", """
## Live: move the slider while it generates
The generation runs in the background; every token adds a point, one colour per plan. Drag the slider down
(say to 0.2 Mbps): a few tokens later the detector reports the link, the planner moves off the cloud, and a new
colour begins after the pause of the switch. (Headless runs and exported HTML: the next cell throttles at
`switch_at` tokens by itself.)
"""),
        ("code", """
view = demo.widget()
demo.start()
view
"""),
        ("code", """
demo.throttle_after(switch_at, throttle_mbps)  # what the slider does, scripted (a no-op move on the local testbed)
result = demo.wait()
print("tokens identical to one-device generation:", demo.tokens_match())
demo.figure().show()
"""),
        ("md", """
## The event records
One row per event: its cause (drift, fault, forced), the evidence (predicted vs measured), the old and new plan,
the predicted gain, the pause of the switch and the tokens recomputed. They and the figure go to the run folder.
"""),
        ("code", """
import pandas as pd

demo.save(run)
demo.close()
run.finish()
pd.DataFrame(demo.events())
"""),
    ]


NOTEBOOKS["06_adaptive.ipynb"] = (adaptive_cells(), "Adaptive serving")


def keep_cell_ids(nb: nbformat.NotebookNode, path: Path) -> None:
    """Reuse the stored notebook's cell ids, position by position, so that a rebuild changes only what changed."""
    if not path.is_file():
        return
    old = nbformat.read(path, as_version=4).cells
    for cell, prev in zip(nb.cells, old):
        if cell.cell_type == prev.cell_type and prev.get("id"):
            cell.id = prev.id


def main() -> None:
    for name, (cells, title) in NOTEBOOKS.items():
        nb = build(cells, title)
        keep_cell_ids(nb, HERE / name)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
