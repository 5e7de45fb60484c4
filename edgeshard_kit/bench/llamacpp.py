"""llama.cpp as a peer for `edgeshard bench peer-llamacpp`: its source, its build, a GGUF of a checkpoint, its runs.

The source is the llama.cpp that the `llama-cpp-python` sdist (PyPI) vendors; `llama-bench` and the RPC server are
built from it with cmake and a C++ compiler (Debian: cmake g++), CPU only, `GGML_RPC=ON`, into a cache folder
outside the repository: `$EDGESHARD_LLAMACPP_CACHE/<version>/`, default `<kit cache>/llama.cpp/<version>/`
(`src/`, `build/`, `build.log`, `gguf/`). A checkpoint is converted to an F32 GGUF by llama.cpp's own
`convert_hf_to_gguf.py` (with the vendored `gguf-py`), once per checkpoint.

Everything that makes llama.cpp unusable here (no cmake, no compiler, no sdist, a failed build or conversion)
raises `LlamaCppUnavailable` with one line saying why: the bench is optional and skips on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from edgeshard_kit.model import hub

VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp has tools/rpc, tools/llama-bench, convert_hf_to_gguf.py
CACHE_ENV = "EDGESHARD_LLAMACPP_CACHE"
RPC_NAMES = ("ggml-rpc-server", "rpc-server")  # the server's binary was renamed in 2026
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"]


class LlamaCppUnavailable(Exception):
    """llama.cpp cannot be had here; str() is the one-line reason."""


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: the folder of a version, its `llama-bench` and RPC server binaries, its source."""
    version: str
    root: Path
    bench: Path
    rpc_server: Path

    @property
    def src(self) -> Path:
        return self.root / "src"


def cache_root(cache: str | Path | None = None) -> Path:
    """Where llama.cpp builds live: `cache`, else $EDGESHARD_LLAMACPP_CACHE, else <kit cache>/llama.cpp."""
    if cache:
        return Path(cache).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else hub.cache_dir() / "llama.cpp"


def find_built(root: Path, version: str) -> LlamaCpp | None:
    """The finished build in `root` (a version's folder), or None when either binary is missing."""
    bin_dir = root / "build" / "bin"
    bench = bin_dir / "llama-bench"
    rpc = next((bin_dir / n for n in RPC_NAMES if (bin_dir / n).is_file()), None)
    if bench.is_file() and os.access(bench, os.X_OK) and rpc is not None and os.access(rpc, os.X_OK):
        return LlamaCpp(version, root, bench, rpc)
    return None


def prepare(version: str = VERSION, cache: str | Path | None = None, build: bool = True, jobs: int = 2,
            log: Callable[[str], Any] | None = None) -> LlamaCpp:
    """The llama.cpp of `llama-cpp-python==version`, built once into <cache root>/<version>/.

    With `build` False only an existing build is used. Raises LlamaCppUnavailable (why, one line) when there is
    none and it cannot be made: no cmake or C++ compiler, no sdist (pip download failed), a failed build.
    """
    say = log or (lambda msg: None)
    root = cache_root(cache) / version
    done = find_built(root, version)
    if done is not None:
        return done
    if not build:
        raise LlamaCppUnavailable(f"no llama.cpp build in {root} and building is off (drop --no-build to build it)")
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    if missing:
        raise LlamaCppUnavailable(f"{' and '.join(missing)} not found, needed to build llama.cpp "
                                  "(Debian: apt-get install cmake g++)")
    src = _source(root, version, say)
    targets = ["llama-bench", _rpc_target(src)]
    _cmake(root, src, targets, jobs, say)
    done = find_built(root, version)
    if done is None:
        raise LlamaCppUnavailable(f"the llama.cpp build in {root / 'build'} finished without llama-bench and the "
                                  f"RPC server (see {root / 'build.log'})")
    return done


def _source(root: Path, version: str, say: Callable[[str], Any]) -> Path:
    """<root>/src: llama.cpp as llama-cpp-python's sdist vendors it (the sdist downloaded by pip when absent)."""
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = next(iter(sorted(root.glob("llama_cpp_python-*.tar.gz"))), None)
    if sdist is None:
        say(f"downloading the llama-cpp-python=={version} sdist (pip)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", f"llama-cpp-python=={version}", "-d", str(root)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        sdist = next(iter(sorted(root.glob("llama_cpp_python-*.tar.gz"))), None)
        if res.returncode != 0 or sdist is None:
            why = (res.stderr.strip().splitlines() or ["no sdist saved"])[-1]
            raise LlamaCppUnavailable(f"could not download the llama-cpp-python=={version} sdist: {why}")
    say(f"unpacking llama.cpp from {sdist.name}")
    tmp = root / "src.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and ".." not in parts:
                    m.name = str(Path(*parts[3:]))
                    members.append(m)
            if not members:
                raise LlamaCppUnavailable(f"{sdist}: no vendor/llama.cpp in the sdist")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
            tar.extractall(tmp, members=members, **safe)
    except (tarfile.TarError, OSError) as e:
        raise LlamaCppUnavailable(f"{sdist}: cannot be unpacked ({e})") from None
    tmp.rename(src)
    return src


def _rpc_target(src: Path) -> str:
    """The RPC server's cmake target in this source (tools/rpc or, in older trees, examples/rpc)."""
    for d in (src / "tools" / "rpc", src / "examples" / "rpc"):
        lists = d / "CMakeLists.txt"
        if lists.is_file():
            m = re.search(r"set\(\s*TARGET\s+([\w-]+)\s*\)", lists.read_text())
            return m.group(1) if m else "rpc-server"
    raise LlamaCppUnavailable(f"{src}: this llama.cpp has no RPC server (tools/rpc or examples/rpc)")


def _cmake(root: Path, src: Path, targets: list[str], jobs: int, say: Callable[[str], Any]) -> None:
    """Configure (once) and build `targets` into <root>/build; output in <root>/build.log; a progress bar."""
    build, logfile = root / "build", root / "build.log"
    with logfile.open("a") as out:
        if not (build / "CMakeCache.txt").is_file():
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            say(f"configuring llama.cpp in {build} (log: {logfile})")
            res = subprocess.run(["cmake", "-S", str(src), "-B", str(build), *gen, *CMAKE_FLAGS], stdout=out,
                                 stderr=subprocess.STDOUT)
            if res.returncode != 0:
                raise LlamaCppUnavailable(f"cmake could not configure llama.cpp (see {logfile}: "
                                          f"{_last_line(logfile)})")
        say(f"building {', '.join(targets)} with {jobs} jobs (minutes; log: {logfile})")
        cmd = ["cmake", "--build", str(build), "-j", str(jobs), "--target", *targets]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        with tqdm(total=100, desc="build llama.cpp", unit="%", file=sys.stderr, delay=2.0) as bar:
            for line in proc.stdout:
                out.write(line)
                frac = _progress(line)
                if frac is not None:
                    bar.update(max(0, round(100 * frac) - bar.n))
        if proc.wait() != 0:
            out.flush()
            raise LlamaCppUnavailable(f"building llama.cpp failed (see {logfile}: {_last_line(logfile)})")


def _progress(line: str) -> float | None:
    """The fraction done in a build output line: ninja's "[k/n]" or make's "[ p%]"."""
    m = re.match(r"\s*\[(\d+)/(\d+)\]", line)
    if m and int(m.group(2)):
        return int(m.group(1)) / int(m.group(2))
    m = re.match(r"\s*\[\s*(\d+)%\]", line)
    return int(m.group(1)) / 100 if m else None


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["empty log"])[-1][:300]


def convert(llama: LlamaCpp, checkpoint: str | Path, log: Callable[[str], Any] | None = None) -> Path:
    """An F32 GGUF of the Hugging Face checkpoint folder, made by llama.cpp's convert_hf_to_gguf.py once and kept
    in <version>/gguf/ (named after the folder and a hash of its path, sizes and times). LlamaCppUnavailable when
    the converter fails (the log's last line; a missing Python package shows there)."""
    ckpt = Path(checkpoint).resolve()
    key = hashlib.sha1(str(ckpt).encode())
    for f in sorted(ckpt.iterdir()):
        if f.is_file():
            st = f.stat()
            key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = llama.root / "gguf" / f"{ckpt.name}-{key.hexdigest()[:10]}-f32.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    logfile, tmp = out.with_suffix(".log"), out.with_suffix(".partial")
    (log or (lambda msg: None))(f"converting {ckpt} to an F32 GGUF with llama.cpp's converter (log: {logfile})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(llama.src / "gguf-py"),
                                                                   os.environ.get("PYTHONPATH", "")]))}
    with logfile.open("w") as f:
        res = subprocess.run([sys.executable, str(llama.src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f32",
                              "--outfile", str(tmp)], stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise LlamaCppUnavailable(f"llama.cpp's converter failed on {ckpt} (see {logfile}: {_last_line(logfile)})")
    tmp.rename(out)
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rpc_servers(llama: LlamaCpp, n: int, threads: int = 1, timeout_s: float = 60.0) -> Iterator[list[str]]:
    """`n` RPC servers on 127.0.0.1 (one CPU device, `threads` threads each): their "host:port" endpoints; they
    are stopped on exit. LlamaCppUnavailable when one exits or does not listen within `timeout_s`."""
    procs: list[subprocess.Popen] = []
    try:
        ends = []
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen([str(llama.rpc_server), "-H", "127.0.0.1", "-p", str(port), "-t",
                                           str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            ends.append(("127.0.0.1", port))
        for proc, (host, port) in zip(procs, ends):
            _wait_listening(proc, host, port, timeout_s)
        yield [f"{h}:{p}" for h, p in ends]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def _wait_listening(proc: subprocess.Popen, host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
            raise LlamaCppUnavailable(f"the RPC server on port {port} exited ({(err or ['no output'])[-1]})")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.2)
    raise LlamaCppUnavailable(f"the RPC server on port {port} did not listen within {timeout_s:.0f} s")


def bench_decode(llama: LlamaCpp, gguf: Path, tokens: int, threads: int = 1, rpc: list[str] | None = None,
                 timeout_s: float = 600.0) -> dict:
    """One `llama-bench -p 0 -n tokens -r 1` run (its own warm-up first; its F16 KV cache: llama-bench offers no
    F32 one) on the CPU, or with every layer on the `rpc` servers: {"ms_per_token": decode ms/token of the run,
    "build": llama.cpp's commit, "backends": ...}.
    RuntimeError with llama-bench's last output line when it fails."""
    cmd = [str(llama.bench), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "1",
           "-o", "json", "-ngl", "99" if rpc else "0"]
    if rpc:
        cmd += ["--rpc", ",".join(rpc)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    try:
        tests = json.loads(res.stdout) if res.returncode == 0 else None
    except json.JSONDecodeError:
        tests = None
    if not tests:
        err = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"llama-bench failed (exit {res.returncode}): {err}")
    t = tests[-1]
    ns = t["samples_ns"]
    return {"ms_per_token": sum(ns) / len(ns) / t["n_gen"] / 1e6, "build": t.get("build_commit", ""),
            "backends": t.get("backends", ""), "threads": t.get("n_threads", threads)}
