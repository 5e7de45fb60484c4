"""`edgeshard bench peer-llamacpp` without building llama.cpp: its options, the skip path (one line, a 'skipped' row,
exit 0), the sdist unpacking and RPC-target lookup on a hand-made sdist, the build-progress parser, the ratios;
and, only where a build is already cached, that an RPC server starts and listens."""

import csv
import io
import socket
import tarfile

import pytest

from edgeshard_kit.bench import llamacpp
from edgeshard_kit.bench.peer_llamacpp import summarize
from edgeshard_kit.cli.main import main


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_skips_without_a_build_when_building_is_off(tmp_path, capsys):
    out = tmp_path / "peer.csv"
    rc = main(["bench", "peer-llamacpp", "--no-build", "--cache-dir", str(tmp_path / "empty"), "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(printed) == 1 and "skipped" in printed[0] and "building is off" in printed[0], printed
    rows = _csv(out)
    assert len(rows) == 1 and rows[0]["status"] == "skipped" and "building is off" in rows[0]["reason"]
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())  # nothing built or fetched


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.CACHE_ENV, str(tmp_path / "c"))
    assert llamacpp.cache_root() == tmp_path / "c"
    assert llamacpp.cache_root(tmp_path / "flag") == tmp_path / "flag"  # the flag wins
    with pytest.raises(llamacpp.LlamaCppUnavailable, match=str(tmp_path / "c" / "1.2.3")):
        llamacpp.prepare("1.2.3", build=False)


def test_skip_reason_names_missing_tools(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    with pytest.raises(llamacpp.LlamaCppUnavailable, match="cmake and a C\\+\\+ compiler not found"):
        llamacpp.prepare("0.0.1", cache=tmp_path)
    assert not (tmp_path / "0.0.1").exists()  # it gave up before downloading anything


@pytest.mark.parametrize("argv, field", [(["--tokens", "1"], "--tokens"), (["--repeats", "0"], "--repeats"),
                                         (["--threads", "0"], "--threads"), (["--jobs", "0"], "--jobs"),
                                         (["--impls", "kit-1proc,nope", "--no-build"], "--impls")])
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, argv, field):
    rc = main(["bench", "peer-llamacpp", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "x.csv"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and field in err[0], err
    assert not (tmp_path / "x.csv").exists()


def _sdist(path, rpc_dir="tools/rpc", target="ggml-rpc-server"):
    """A tiny stand-in for llama-cpp-python's sdist: vendor/llama.cpp with a CMakeLists and an RPC tool."""
    files = {"llama_cpp_python-9.9.9/pyproject.toml": "[project]\n",
             "llama_cpp_python-9.9.9/vendor/llama.cpp/CMakeLists.txt": "project(llama.cpp)\n",
             f"llama_cpp_python-9.9.9/vendor/llama.cpp/{rpc_dir}/CMakeLists.txt":
                 f"set(TARGET {target})\nadd_executable(${{TARGET}} rpc-server.cpp)\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("rpc_dir, target", [("tools/rpc", "ggml-rpc-server"), ("examples/rpc", "rpc-server")])
def test_unpacks_the_vendored_source_and_finds_the_rpc_target(tmp_path, rpc_dir, target):
    root = tmp_path / "9.9.9"
    root.mkdir()
    _sdist(root / "llama_cpp_python-9.9.9.tar.gz", rpc_dir, target)
    src = llamacpp._source(root, "9.9.9", lambda m: None)
    assert src == root / "src" and (src / "CMakeLists.txt").read_text() == "project(llama.cpp)\n"
    assert not (src / "pyproject.toml").exists()  # only vendor/llama.cpp, its prefix stripped
    assert llamacpp._rpc_target(src) == target


def test_a_source_without_rpc_is_unavailable(tmp_path):
    (tmp_path / "tools").mkdir()
    with pytest.raises(llamacpp.LlamaCppUnavailable, match="no RPC server"):
        llamacpp._rpc_target(tmp_path)


def test_finds_a_finished_build_only(tmp_path):
    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "llama-bench").write_text("#!/bin/sh\n")
    (bin_dir / "llama-bench").chmod(0o755)
    assert llamacpp.find_built(tmp_path, "v") is None  # no RPC server yet
    (bin_dir / "rpc-server").write_text("#!/bin/sh\n")
    (bin_dir / "rpc-server").chmod(0o755)
    got = llamacpp.find_built(tmp_path, "v")
    assert got.bench == bin_dir / "llama-bench" and got.rpc_server == bin_dir / "rpc-server"


def test_build_progress_lines():
    assert llamacpp._progress("[25/100] Building CXX object x.o") == 0.25
    assert llamacpp._progress("[ 40%] Building C object y.o") == 0.40
    assert llamacpp._progress("/src/a.cpp:3:1: warning: [-Wunused]") is None


def test_ratios_are_taken_within_a_repeat():
    ms = {0: {"kit-1proc": 100.0, "llamacpp-1proc": 50.0, "kit-2workers": 110.0, "llamacpp-2rpc": 60.0},
          1: {"kit-1proc": 200.0, "llamacpp-1proc": 80.0, "kit-2workers": 180.0, "llamacpp-2rpc": 100.0}}
    rows = [{"impl": i, "repeat": r, "status": "ok", "ms_per_token": v} for r, d in ms.items() for i, v in d.items()]
    rows.append({"impl": "skipped", "status": "skipped"})
    per_impl, ratios = summarize(rows)
    kit = next(r for r in per_impl if r["impl"] == "kit-1proc")
    assert (kit["ms_min"], kit["ms_median"], kit["ms_max"], kit["runs"]) == (100.0, 150.0, 200.0, 2)
    by = {r["ratio"]: r for r in ratios}
    first = by["kit 1 process / llama.cpp 1 process"]
    assert (first["min"], first["max"], first["median"]) == (2.0, 2.5, 2.25)  # 100/50 and 200/80, not 150/65
    assert by["kit 2 workers / kit 1 process"]["min"] == 0.9
    assert "llama.cpp 1 RPC server / llama.cpp 1 process" not in by  # not measured: no ratio


def test_a_cached_build_serves_rpc():
    """Where a build is cached (after `edgeshard bench peer-llamacpp` once), its RPC server starts and listens."""
    llama = llamacpp.find_built(llamacpp.cache_root() / llamacpp.VERSION, llamacpp.VERSION)
    if llama is None:
        pytest.skip(f"no llama.cpp build cached in {llamacpp.cache_root() / llamacpp.VERSION}")
    with llamacpp.rpc_servers(llama, 2) as ends:
        assert len(ends) == 2
        for end in ends:
            host, port = end.split(":")
            socket.create_connection((host, int(port)), timeout=5).close()
