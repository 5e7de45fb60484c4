"""Device catalog for analytic profiles: memory, memory bandwidth and peak FLOP/s per dtype, each with its source."""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import asdict, dataclass, field

from edgeshard_kit.core.errors import KitError

GB = 10**9


@dataclass(frozen=True)
class Hardware:
    """One device type: memory (bytes), bandwidth (GB/s), peak FLOP/s per dtype; `sources` says where each came from."""

    name: str
    kind: str  # "gpu" (incl. Jetson iGPU) or "cpu"
    memory_bytes: int
    mem_bw_gbs: float
    peak_flops: dict[str, float]  # {"float32": FLOP/s, "float16": ..., "bfloat16": ...}
    sources: dict[str, str] = field(default_factory=dict)  # {"memory_bytes": "...", "mem_bw_gbs": "...", ...}
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` (KitError if the catalog has no figure)."""
        if dtype not in self.peak_flops:
            raise KitError(f"device {self.name!r} has no peak FLOP/s for dtype {dtype!r} "
                           f"(known: {', '.join(self.peak_flops)})")
        return self.peak_flops[dtype]


_JETSON_BRIEF = "NVIDIA Jetson AGX Orin Series Technical Brief v1.2 / Jetson Orin NX Series data sheet"
# Orin iGPU (GA10B, Ampere): FP32 = CUDA cores x 2 FLOP x max GPU clock; FP16/BF16 dense tensor rate =
# SMs x 1024 FLOP/clk (the GA10x tensor-core rate per SM derived from the RTX 3090 figures below).
CATALOG: dict[str, Hardware] = {d.name: d for d in [
    Hardware(
        "jetson-agx-orin-32gb", "gpu", 32 * GB, 204.8,
        {"float32": 3.33e12, "float16": 13.3e12, "bfloat16": 13.3e12},
        {"memory_bytes": f"{_JETSON_BRIEF}: 32 GB 256-bit LPDDR5 (shared CPU/GPU)",
         "mem_bw_gbs": f"{_JETSON_BRIEF}: 204.8 GB/s",
         "peak_flops.float32": "derived from datasheet: 1792 CUDA cores x 2 FLOP x 0.93 GHz = 3.33 TFLOPS "
                               "(the EdgeShard paper reports 3.33)",
         "peak_flops.float16": "derived: 14 SMs x 1024 FLOP/clk (dense tensor) x 0.93 GHz",
         "peak_flops.bfloat16": "derived: as float16 (Ampere tensor cores run bf16 at the fp16 rate)"}),
    Hardware(
        "jetson-orin-nx-16gb", "gpu", 16 * GB, 102.4,
        {"float32": 1.88e12, "float16": 7.5e12, "bfloat16": 7.5e12},
        {"memory_bytes": f"{_JETSON_BRIEF}: 16 GB 128-bit LPDDR5 (shared CPU/GPU)",
         "mem_bw_gbs": f"{_JETSON_BRIEF}: 102.4 GB/s",
         "peak_flops.float32": "derived from datasheet: 1024 CUDA cores x 2 FLOP x 0.918 GHz = 1.88 TFLOPS "
                               "(the EdgeShard paper reports 1.88)",
         "peak_flops.float16": "derived: 8 SMs x 1024 FLOP/clk (dense tensor) x 0.918 GHz",
         "peak_flops.bfloat16": "derived: as float16"}),
    Hardware(
        "rtx-3090-24gb", "gpu", 24 * GB, 936.2,
        {"float32": 35.6e12, "float16": 71e12, "bfloat16": 71e12},
        {"memory_bytes": "NVIDIA GeForce RTX 3090 specifications: 24 GB GDDR6X",
         "mem_bw_gbs": "NVIDIA Ampere GA102 GPU Architecture whitepaper: 936 GB/s (19.5 Gbps x 384 bit)",
         "peak_flops.float32": "GA102 whitepaper: 35.6 TFLOPS FP32 (10496 cores x 2 x 1.695 GHz)",
         "peak_flops.float16": "GA102 whitepaper: 71 TFLOPS dense FP16 tensor with FP32 accumulate",
         "peak_flops.bfloat16": "GA102 whitepaper: 71 TFLOPS dense BF16 tensor with FP32 accumulate"}),
    Hardware(
        "a100-80gb", "gpu", 80 * GB, 2039.0,
        {"float32": 19.5e12, "float16": 312e12, "bfloat16": 312e12},
        {"memory_bytes": "NVIDIA A100 Tensor Core GPU datasheet: 80 GB HBM2e",
         "mem_bw_gbs": "NVIDIA A100 datasheet: 2039 GB/s (SXM; PCIe 1935 GB/s)",
         "peak_flops.float32": "NVIDIA A100 datasheet: 19.5 TFLOPS FP32 (PyTorch keeps TF32 off for matmul by default)",
         "peak_flops.float16": "NVIDIA A100 datasheet: 312 TFLOPS dense FP16 tensor",
         "peak_flops.bfloat16": "NVIDIA A100 datasheet: 312 TFLOPS dense BF16 tensor"}),
    Hardware(
        "raspberry-pi-5-8gb", "cpu", 8 * GB, 17.1,
        {"float32": 153.6e9, "float16": 307.2e9, "bfloat16": 153.6e9},
        {"memory_bytes": "Raspberry Pi 5 product brief: 8 GB LPDDR4X-4267",
         "mem_bw_gbs": "derived from product brief: LPDDR4X-4267 x 32-bit bus = 17.1 GB/s",
         "peak_flops.float32": "derived: 4 Cortex-A76 cores x 2.4 GHz x 16 FLOP/clk (2 x 128-bit NEON FMA)",
         "peak_flops.float16": "derived: 2x the fp32 rate (Armv8.2 FP16 NEON arithmetic)",
         "peak_flops.bfloat16": "derived: Cortex-A76 has no BF16 instructions; assume the fp32 rate"}),
]}


def _measure_this_machine(device: str = "cpu") -> Hardware:
    """Detect memory and measure bandwidth (large tensor copy) and matmul FLOP/s on this host (~1-2 s)."""
    import psutil
    import torch

    cuda = device.startswith("cuda")
    dev = torch.device(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def best_of(fn, n=5):
        ts = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    nbytes = 256 * 2**20  # well past any last-level cache
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    bw = 2 * nbytes / best_of(lambda: b.copy_(a)) / 1e9  # a copy reads and writes every byte
    peak = {}
    for dt in ("float32", "float16", "bfloat16"):
        n = 2048 if cuda else 512
        x = torch.randn(n, n, device=dev).to(getattr(torch, dt))
        y = torch.randn(n, n, device=dev).to(getattr(torch, dt))
        x @ y
        peak[dt] = 2 * n**3 / best_of(lambda: x @ y)
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        mem, what = props.total_memory, f"torch.cuda.get_device_properties: {props.name}"
    else:
        mem, what = psutil.virtual_memory().total, f"psutil.virtual_memory().total on {platform.node()}"
    threads = torch.get_num_threads()
    return Hardware(
        "this-machine", "gpu" if cuda else "cpu", int(mem), round(bw, 1), peak,
        {"memory_bytes": what,
         "mem_bw_gbs": f"measured at run time: best of 5 copies of a {nbytes >> 20} MiB float32 tensor on {device}",
         **{f"peak_flops.{dt}": f"measured at run time: best of 5 square matmuls on {device}"
            + ("" if cuda else f" with {threads} torch threads") for dt in peak}},
        note="achieved (not theoretical) figures: calibrated efficiencies near 1 are expected")


@functools.lru_cache(maxsize=4)
def _this_machine(device: str) -> Hardware:
    return _measure_this_machine(device)


def get_device(name: str | Hardware, device: str = "cpu") -> Hardware:
    """The catalog entry `name` ("this-machine" is measured once per process; `device` = torch device)."""
    if isinstance(name, Hardware):
        return name
    key = str(name).strip().lower()
    if key == "this-machine":
        return _this_machine(device)
    if key not in CATALOG:
        raise KitError(f"unknown device type {name!r}; known: {', '.join(known_devices())}")
    return CATALOG[key]


def known_devices() -> list[str]:
    return sorted(CATALOG) + ["this-machine"]


def devices_frame(include_this_machine: bool = False):
    """The catalog as a pandas DataFrame, one row per device, sources included."""
    import pandas as pd

    rows = []
    names = sorted(CATALOG) + (["this-machine"] if include_this_machine else [])
    for n in names:
        d = get_device(n)
        rows.append({"device_type": d.name, "kind": d.kind, "memory_gb": d.memory_bytes / GB,
                     "mem_bw_gbs": d.mem_bw_gbs,
                     **{f"tflops_{k}": v / 1e12 for k, v in d.peak_flops.items()},
                     **{f"source_{k}": v for k, v in d.sources.items()}})
    return pd.DataFrame(rows)

