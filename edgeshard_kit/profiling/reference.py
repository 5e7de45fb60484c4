"""The EdgeShard paper's measured Llama2-7B profiles and testbed, as shipped in data/ (a copy of the published figures)."""

from __future__ import annotations

import functools
import json
from importlib import resources

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import unit_name
from edgeshard_kit.profiling.analytic import BUILTIN_SPECS
from edgeshard_kit.profiling.profile import Profile, UnitProfile

DATA_FILE = "edgeshard_paper_llama2_7b.json"
GIB = 2**30


@functools.lru_cache(maxsize=1)
def paper_data() -> dict:
    """The raw reference JSON shipped with the kit (a copy of the paper's measured figures)."""
    try:
        text = resources.files("edgeshard_kit").joinpath("data", DATA_FILE).read_text()
    except FileNotFoundError:
        raise KitError(f"the kit's data file {DATA_FILE} is missing (reinstall edgeshard-kit)") from None
    return json.loads(text)


def paper_profiles() -> dict[str, Profile]:
    """The paper's three device types as Profiles of Llama2-7B (fp32), keyed by device type."""
    d = paper_data()
    mem_gb = d["unit_memory_gb"]  # the scripts' GiB figures (0.754 = 202M params x 4 bytes / 2^30)
    n_layers = int(d["model"]["n_decoder_layers"])
    act, logits = int(d["activation_bytes_between_units"]), int(d["logits_bytes"])
    out = {}
    for dev, times in d["unit_decode_ms"].items():
        if len(times) != n_layers + 2 or len(mem_gb) != n_layers + 2:
            raise KitError(f"{DATA_FILE}: {dev} lists {len(times)} unit times, expected {n_layers + 2}")
        units = tuple(
            UnitProfile(unit=u, name=unit_name(u, n_layers), prefill_ms=float(t), decode_ms=float(t),
                        param_bytes=int(round(mem_gb[u] * GIB)),
                        # fp32 K and V of 32 heads x 128 dims per layer (not in the source; exact for the model)
                        kv_bytes_per_token=2 * 4096 * 4 if 1 <= u <= n_layers else 0,
                        out_bytes_per_token=logits if u == n_layers + 1 else act,
                        peak_mem_bytes=int(round(mem_gb[u] * GIB)))
            for u, t in enumerate(times))
        out[dev] = Profile(
            model="llama2-7b", n_layers=n_layers, device_type=dev, dtype="float32", batch=1,
            prompt_len=32, kv_lens=(), ref_kv_len=0, units=units,
            config={**BUILTIN_SPECS["llama2-7b"], "model_type": "llama", "name": "llama2-7b"},
            overhead={"decode_step_ms": 0.0, "prefill_ms": 0.0},
            meta={"source": d["sources"]["profile"], "what": d["what"], "prefill_measured": False,
                  "notes": ["decode times per unit as published; the source has no prefill times, so "
                            "prefill_ms = decode_ms (a stand-in: the planner's latency objective uses decode)",
                            "param_bytes = peak_mem_bytes = unit_memory_gb x 2^30",
                            "out_bytes_per_token = the scripts' data_size (4 x 4096 x 4 bytes) and, for the "
                            "head, their output_size (4 x 32000 x 4 bytes of logits), kept as published so "
                            "that simulations reproduce their plans",
                            f"transfer model of the scripts: {d['transfer_time_model_ms']}"],
                  "device_memory_budget_gb": d["device_memory_budget_gb"].get(dev),
                  "peak_tflops_fp32_reported": d["device_peak_tflops_fp32_reported"].get(dev)})
    return out


def paper_testbed() -> dict:
    """Facts of the paper's testbed: device counts, memory budgets (GB), network and workload."""
    d = paper_data()
    t = d["paper_testbed"]
    return {"devices": dict(t["devices"]), "memory_budget_gb": dict(d["device_memory_budget_gb"]),
            "source_device_type": t["source_device_type"].split()[0], "network": t["network"],
            "workload": t["workload"], "prompt_tokens": 32, "generated_tokens": 96,
            "transfer_fixed_ms": 2.1, "reported": d["paper_reported"],
            "source": d["sources"]["testbed_and_results"]}

