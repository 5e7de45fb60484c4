"""`edgeshard bench pipeline-latency / pipeline-throughput / wire`: the runtime against one process and plain TCP, as rows."""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.core.units import Stage, n_units
from edgeshard_kit.model.checkpoint import load_llama_config
from edgeshard_kit.model.generate import build_stages, sample_next
from edgeshard_kit.planning.build import build_problem
from edgeshard_kit.planning.plan import Plan, make_plan
from edgeshard_kit.planning.problem import without_fixed_costs
from edgeshard_kit.runtime import wire
from edgeshard_kit.runtime.calibrate import RuntimeCosts, calibrate_runtime
from edgeshard_kit.runtime.deployment import deploy
from edgeshard_kit.runtime.protocol import Kind
from edgeshard_kit.runtime.quickplan import quick_profiles, quick_workload
from edgeshard_kit.testbed.inventory import Testbed, testbed_from_dict


def local_testbed(n: int, pin: bool) -> Testbed:
    """`n` local workers w0..w{n-1} on this host (w0 the source), each pinned to one CPU when `pin`."""
    ncpu = os.cpu_count() or 1
    devs = [{"name": f"w{i}", "type": "cpu-local", "memory": "64GiB", "source": i == 0,
             **({"cpus": [i % ncpu]} if pin else {})} for i in range(n)]
    return testbed_from_dict({"name": "bench-local", "devices": devs})


def half_plan(checkpoint: str | Path, devices: list[str]) -> Plan:
    """The model cut in two halves of units, on devices[0] and devices[1]."""
    total = n_units(load_llama_config(checkpoint).num_hidden_layers)
    cut = total // 2
    return Plan("latency", (Stage(devices[0], 0, cut), Stage(devices[1], cut, total)), 0.0, 0.0, 0.0)


class OneProcess:
    """Greedy generation of batch 1 with every unit in this process, one decode step per call (the baseline of
    `bench_latency`): `start(ids)` runs the prefill, each `step()` the next decode step; `ms` the decode steps'
    times (ms), `tokens` every token so far."""

    def __init__(self, stages: list, max_len: int):
        self.stages, self.max_len = stages, max_len
        self.tokens: list[int] = []
        self.ms: list[float] = []

    def _forward(self, x: torch.Tensor) -> int:
        for stage, cache in zip(self.stages, self.caches):
            x = stage.forward(x, cache)
        return int(sample_next(x, 0.0, 1.0, None)[0])

    def start(self, ids: list[list[int]]) -> None:
        self.caches = [s.new_cache(max_len=self.max_len) for s in self.stages]
        self.tokens, self.ms = [self._forward(torch.tensor(ids))], []

    def step(self) -> None:
        t0 = time.perf_counter()
        tok = self._forward(torch.tensor([[self.tokens[-1]]]))
        self.ms.append((time.perf_counter() - t0) * 1e3)
        self.tokens.append(tok)


# A process of the floor (`TwoProcesses`): one half of the units behind plain loopback sockets, with none of
# the runtime (no frames, no authentication, no threads). Role "first": token ids in from the parent, raw float32
# activations out to the second; "second": activations in, the greedy token id back to the parent. A message is
# an int64 count t (0: a new request) and t ids or t x hidden float32 values.
_HALF = r"""
import socket, struct, sys
import torch
from edgeshard_kit.model.stage import StageModel
from edgeshard_kit.model.generate import sample_next
role, parent, ckpt, start, end, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6]
torch.set_num_threads(int(sys.argv[7]))
model = StageModel(ckpt, start, end, dtype=dtype)
hidden = model.config.hidden_size

def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def read(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            sys.exit(0)
        got += k
    return buf

up = connect(parent)
if role == "second":
    server = socket.create_server(("127.0.0.1", 0))
    up.sendall(b"S" + struct.pack("<q", server.getsockname()[1]))
    inbox, _ = server.accept()
    inbox.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
else:
    up.sendall(b"F")
    inbox, out = up, connect(struct.unpack("<q", read(up, 8))[0])
while True:
    t = struct.unpack("<q", read(inbox, 8))[0]
    if t == 0:
        cache = model.new_cache()
        if role == "first":
            out.sendall(struct.pack("<q", 0))
        continue
    if role == "first":
        ids = torch.frombuffer(read(inbox, 8 * t), dtype=torch.int64).view(1, t)
        h = model.forward(ids, cache).to(torch.float32).contiguous()
        out.sendall(struct.pack("<q", t) + memoryview(h.numpy()).cast("B").tobytes())
    else:
        x = torch.frombuffer(read(inbox, 4 * t * hidden), dtype=torch.float32).view(1, t, hidden)
        up.sendall(struct.pack("<q", int(sample_next(model.forward(x, cache), 0.0, 1.0, None)[0])))
"""


class TwoProcesses(OneProcess):
    """The floor of a two-process split on this host, in the pipeline's own topology: this process sends token
    ids to a first process (units [0, cut)), which sends raw activations to a second ([cut, total)), which sends
    the greedy token back; plain loopback sockets, nothing of the runtime (`_HALF`). Batch 1; `start`/`step`/
    `ms`/`tokens` as OneProcess; `close()` ends both processes (KitError when they cannot start)."""

    def __init__(self, checkpoint: str | Path, cut: int, total: int, max_len: int, dtype: str = "float32",
                 threads: int = 1):
        super().__init__([], max_len)
        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(1.0)
        port = str(server.getsockname()[1])
        self.procs = [subprocess.Popen([sys.executable, "-c", _HALF, role, port, str(checkpoint), str(a), str(b),
                                        dtype, str(threads)]) for role, a, b in (("second", cut, total),
                                                                                  ("first", 0, cut))]
        try:
            conns, deadline = {}, time.monotonic() + 300
            while len(conns) < 2:
                try:
                    sock, _ = server.accept()
                except socket.timeout:
                    dead = [p.returncode for p in self.procs if p.poll() is not None]
                    if dead or time.monotonic() > deadline:
                        raise OSError(f"exit codes {dead}" if dead else "not connected within 300 s") from None
                    continue
                sock.settimeout(300)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[sock.recv(1)] = sock
            self.back, self.feed = conns[b"S"], conns[b"F"]
            self.feed.sendall(self._read(self.back, 8))  # the second's port, for the first to connect to
        except (KeyError, OSError) as e:
            self.close()
            raise KitError(f"the floor's processes did not start ({e})") from None
        finally:
            server.close()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = sock.recv(n - len(buf))
            if not got:
                raise KitError("a process of the floor ended")
            buf += got
        return buf

    def _forward(self, x: torch.Tensor) -> int:
        self.feed.sendall(struct.pack("<q", x.shape[1]) + x.to(torch.int64).numpy().tobytes())
        return struct.unpack("<q", self._read(self.back, 8))[0]

    def start(self, ids: list[list[int]]) -> None:
        self.feed.sendall(struct.pack("<q", 0))  # new caches over there
        super().start(ids)

    def close(self) -> None:
        for sock in (getattr(self, "feed", None), getattr(self, "back", None)):
            if sock is not None:
                sock.close()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _check_tokens(tokens: int) -> None:
    if tokens < 2:
        raise KitError(f"pipeline-latency compares decode steps: tokens must be at least 2, got {tokens}")


def bench_latency(checkpoint: str | Path, tokens: int = 32, prompt_len: int = 16, repeats: int = 3,
                  dtype: str = "float32", floor: bool = True) -> list[dict]:
    """Per-token decode latency: 2 local workers (units cut in half) vs one process, interleaved step by step.

    Each decode step of the one-process generation runs in the pipeline's `on_token` hook, between two of the
    pipeline's steps (the workers wait meanwhile), so the two compared steps are tens of milliseconds apart and
    see the same state of a shared host. Alternating whole generations instead put seconds of host drift
    between them: on a 2-core VM the same comparison then read 1.02-1.19 even with both halves in one process.
    With `floor`, a third decode runs in the same hook: the pipeline's topology with nothing of the runtime (the
    same two halves in two processes joined by plain sockets, `TwoProcesses`): what two processes cost this host.
    A row per repeat: `one_process_ms`, `pipeline_ms` (and `floor_ms`): medians over the decode steps, ms/token;
    `ratio` (pipeline / one process), `paired_ratio` (median of the per-step ratios), `excess_ms`,
    `floor_ratio` (floor / one process), `runtime_ratio` (pipeline / floor), `same_tokens` (all decodes equal).
    """
    _check_tokens(tokens)  # before any worker starts
    tb = local_testbed(2, pin=False)
    plan = half_plan(checkpoint, tb.names)
    ids = [[(7 * i) % 200 + 3 for i in range(prompt_len)]]
    threads = max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(threads)  # the one-process baseline gets the threads one worker gets
    total = n_units(load_llama_config(checkpoint).num_hidden_layers)
    one = OneProcess(build_stages(checkpoint, [(0, total)], dtype=dtype), prompt_len + tokens)
    two = TwoProcesses(checkpoint, plan.stages[0].end, total, prompt_len + tokens, dtype, threads) if floor else None
    try:
        with deploy(plan, tb, checkpoint, dtype=dtype, threads=threads) as dep:
            return interleaved_latency(dep, one, ids, tokens, repeats, floor=two)
    finally:
        if two is not None:
            two.close()


def interleaved_latency(dep, one: OneProcess, ids: list[list[int]], tokens: int, repeats: int,
                        floor: OneProcess | None = None) -> list[dict]:
    """`bench_latency`'s measurement on a running deployment `dep` and a one-process baseline `one` of the same
    checkpoint (and a `floor`, `TwoProcesses`): a warm-up, then `repeats` generations of `tokens` with every
    decode step of the baselines run in `dep`'s on_token hook, their order swapped every step (rows as
    bench_latency describes). KitError when `tokens` < 2 (no decode step)."""
    _check_tokens(tokens)
    base = [one] + ([floor] if floor is not None else [])

    def interleave(rec: dict, toks: list[int]) -> None:
        for b in (base if rec["step"] % 2 else base[::-1]):
            if rec["step"] == 0:
                b.start(ids)  # the prefill: not compared
            else:
                b.step()

    rows = []
    dep.generate(ids, min(4, tokens), on_token=interleave)  # warm-up
    for r in tqdm(range(repeats), desc="pipeline-latency", unit="repeat"):
        dist = dep.generate(ids, tokens, on_token=interleave)
        pipe = {x["step"]: x["latency_ms"] for x in dist.per_token if x["step"] > 0}
        paired = [pipe[s] / ms for s, ms in enumerate(one.ms, start=1) if s in pipe]
        one_ms, pipe_ms = statistics.median(one.ms), dist.summary["per_token_ms"]
        row = {"repeat": r, "tokens": tokens, "one_process_ms": one_ms, "pipeline_ms": pipe_ms,
               "ratio": pipe_ms / one_ms, "paired_ratio": statistics.median(paired), "excess_ms": pipe_ms - one_ms,
               "same_tokens": all(dist.tokens[0] == b.tokens for b in base)}
        if floor is not None:
            floor_ms = statistics.median(floor.ms)
            row.update(floor_ms=floor_ms, floor_ratio=floor_ms / one_ms, runtime_ratio=pipe_ms / floor_ms)
        rows.append(row)
    return rows


def stage_cost(checkpoint: str | Path, tokens: int = 32, prompt_len: int = 16, repeats: int = 6,
               dtype: str = "float32", log: Callable[[str], Any] | None = None) -> RuntimeCosts:
    """The runtime's fixed cost per stage and per token on 2 local workers (one thread each), calibrated in
    `repeats` interleaved windows (runtime.calibrate: one stage vs two stages on the same host, the compute of
    each scaled by the runtime's own measured compute): `stage_ms["cpu-local"]` is the cost of one more stage."""
    tb = local_testbed(2, pin=False)
    workload = quick_workload(1, 1, prompt_len, tokens)
    profiles = quick_profiles(checkpoint, tb, workload, dtype, threads=1)
    return calibrate_runtime(checkpoint, tb, profiles, prompt_len=prompt_len, tokens=tokens, repeats=repeats,
                             log=log)


def bench_throughput(checkpoint: str | Path, micro_batches: int = 4, micro_batch_size: int = 1, tokens: int = 32,
                     prompt_len: int = 16, repeats: int = 3, dtype: str = "float32", calibrate: bool = True,
                     log: Callable[[str], Any] | None = None) -> tuple[list[dict], RuntimeCosts | None]:
    """Throughput: 2 pinned workers, K micro-batches no-bubbles vs the same micro-batches one after another.

    (rows, fixed costs): a row per repeat; the costs calibrated on these two workers (None without `calibrate`).
    """
    k = micro_batches
    tb = local_testbed(2, pin=True)
    batch = k * micro_batch_size
    workload = quick_workload(batch, k, prompt_len, tokens)
    profiles = quick_profiles(checkpoint, tb, workload, dtype, threads=1)
    costs = calibrate_runtime(checkpoint, tb, profiles, prompt_len=prompt_len, log=log) if calibrate else None
    problem = build_problem(profiles, tb, workload, runtime=costs)
    paper = without_fixed_costs(problem)
    stages = list(half_plan(checkpoint, tb.names).stages)
    plan = make_plan(problem, stages, "throughput")
    pred_paper = make_plan(paper, stages, "throughput").throughput_per_s
    ids = [[(7 * i + j) % 200 + 3 for i in range(prompt_len)] for j in range(batch)]
    rows = []
    with deploy(plan, tb, checkpoint, dtype=dtype, problem=problem, threads=1) as dep:
        dep.generate(ids, 2, mode="pipelined", micro_batches=k)  # warm-up
        for r in range(repeats):
            # Decode throughput (tokens after the first, over the time after the prefill), as the planner predicts.
            t0, dec_tokens, dec_s = time.perf_counter(), 0, 0.0
            for j in range(k):
                one = dep.generate(ids[j * micro_batch_size:(j + 1) * micro_batch_size], tokens)
                dec_tokens += micro_batch_size * (tokens - 1)
                dec_s += one.summary["wall_s"] - one.summary["prefill_ms"] / 1e3
            seq_all = batch * tokens / (time.perf_counter() - t0)
            seq = dec_tokens / dec_s
            res = dep.generate(ids, tokens, mode="pipelined", micro_batches=k, schedule="no-bubbles")
            pipe, pipe_all = res.summary["decode_tokens_per_s"], res.summary["tokens_per_s"]
            pred = res.prediction.get("throughput_no_bubbles_per_s") or res.prediction.get("throughput_per_s")
            # The same cost model fed with the compute the workers measured during this run (ms per step):
            # separates the runtime's overhead from the profile's accuracy under a shared CPU.
            comp = [statistics.median(x["compute_ms"] for x in res.per_stage if x["stage"] == i and x["step"] > 0)
                    for i in range(len(plan.stages))]
            ideal = micro_batch_size * 1000.0 / max(comp)
            rows.append({"repeat": r, "sequential_tokens_per_s": seq, "pipelined_tokens_per_s": pipe,
                         "predicted_tokens_per_s": pred, "speedup": pipe / seq, "vs_prediction": pipe / pred,
                         "predicted_paper_model_tokens_per_s": pred_paper, "vs_paper_model": pipe / pred_paper,
                         "stage_compute_ms": "/".join(f"{c:.2f}" for c in comp),
                         "predicted_from_measured_compute": ideal, "vs_measured_compute": pipe / ideal,
                         "sequential_incl_prefill_tokens_per_s": seq_all, "pipelined_incl_prefill_tokens_per_s": pipe_all})
    return rows, costs


# The receiving end of `bench wire`, in its own process: the kit's wire, or plain TCP into one buffer.
_WIRE_RECEIVER = r"""
import socket, sys
from edgeshard_kit.runtime import wire
port, impl, nbytes, frames = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sock = socket.create_connection(("127.0.0.1", port))
if impl == "wire":
    conn = wire.Connection(sock)
    for _ in range(frames):
        conn.recv()
        conn.send("ack")
else:  # plain TCP into one preallocated buffer: what the host's loopback gives without the kit
    buf = memoryview(bytearray(nbytes))
    for _ in range(frames):
        got = 0
        while got < nbytes:
            got += sock.recv_into(buf[got:])
        sock.sendall(b"k")
sock.close()
"""


def bench_loopback(nbytes: int = 64 << 20, repeats: int = 5) -> list[dict]:
    """Frames of `nbytes` over TCP on 127.0.0.1 to a receiver process, the kit's wire (float32 tensor frames)
    and plain sockets alternating; one record (GB/s, send until the receiver has every byte) per frame."""
    nbytes = nbytes // 4 * 4
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    peers: dict[str, Any] = {}
    procs = []
    try:
        for impl in ("wire", "socket"):
            procs.append(subprocess.Popen([sys.executable, "-c", _WIRE_RECEIVER, str(port), impl, str(nbytes),
                                           str(repeats + 1)]))
            server.settimeout(60)
            sock, _ = server.accept()
            peers[impl] = wire.Connection(sock) if impl == "wire" else sock
        t = torch.ones(nbytes // 4, dtype=torch.float32)
        raw = memoryview(t.numpy()).cast("B")

        def send(impl: str) -> float:
            t0 = time.perf_counter()
            if impl == "wire":
                peers[impl].send(Kind.ACT, t, step=0)
                peers[impl].recv()
            else:
                peers[impl].sendall(raw)
                peers[impl].recv(1)
            return time.perf_counter() - t0

        rows = []
        for i in range(repeats + 1):  # the first frame of each is a warm-up
            for impl in (("wire", "socket") if i % 2 == 0 else ("socket", "wire")):
                dt = send(impl)
                if i:
                    rows.append({"impl": impl, "repeat": i - 1, "bytes": nbytes, "seconds": dt,
                                 "gb_per_s": nbytes / dt / 1e9})
        return rows
    finally:
        for peer in peers.values():
            peer.close()
        for proc in procs:
            proc.wait(30)
        server.close()
