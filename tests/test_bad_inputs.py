"""Broken input files through the real command line: exit 2, one line on stderr naming the file and the field.

Every format the kit reads is here (issue 17, item 7): testbed YAML (`testbed check`), problem JSON
(`plan --problem`), plan JSON (`plan --evaluate`), profile JSON (`profile-show`), split strings and
checkpoints (`generate`), and the emulated testbed's state.json (`probe`, which needs the testbed's SSH
options). Each row breaks one field in one way; the right answer (exit 2, the file and field named, no
traceback) is the kit's documented contract, not something the kit computes. Hypothesis then feeds random
values into random fields of the problem and inventory formats: only KitError may come out.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard_kit.cli.main import main
from edgeshard_kit.core.errors import KitError
from edgeshard_kit.planning.problem import problem_from_dict
from edgeshard_kit.testbed.inventory import testbed_from_dict

DELETE = object()

TESTBED = {
    "name": "bad",
    "devices": [
        {"name": "edge", "type": "cpu", "memory": "1GiB", "source": True},
        {"name": "cloud", "type": "gpu", "memory": "4GiB", "cloud": True, "launch": "ssh", "host": "10.0.0.2"},
    ],
    "links": {"default": {"mbps": 100, "latency_ms": 1.0},
              "pairs": [{"src": "edge", "dst": "cloud", "mbps": 10, "latency_ms": 5.0}]},
    "emulation": {"mode": "app"},
}
PROBLEM = {
    "units": [{"name": f"u{i}", "mem_bytes": 1, "out_bytes": 1000} for i in range(4)],
    "devices": [{"name": "edge", "memory_bytes": 10, "source": True, "unit_ms": [10, 10, 10, 10]},
                {"name": "cloud", "memory_bytes": 10, "cloud": True, "unit_ms": [1, 1, 1, 1]}],
    "links": {"default": {"mbps": 8, "latency_ms": 0.5}, "pairs": [{"src": "edge", "dst": "cloud", "mbps": 4}]},
    "return_bytes": 8, "micro_batch_size": 1,
}
PLAN = {"objective": "latency", "method": "edgeshard", "relay": False, "micro_batch_size": 1,
        "stages": [{"device": "edge", "start": 0, "end": 2}, {"device": "cloud", "start": 2, "end": 4}]}
PROFILE = {
    "format": "edgeshard-profile/1", "model": "m", "n_layers": 2, "device_type": "dev", "dtype": "float32",
    "batch": 1, "prompt_len": 8, "kv_lens": [16, 48], "ref_kv_len": 16,
    "units": [{"unit": u, "name": f"u{u}", "prefill_ms": 2.0, "decode_ms": 1.0, "decode_ms_by_kv": {"16": 1.0},
               "param_bytes": 100, "kv_bytes_per_token": 8, "out_bytes_per_token": 64, "peak_mem_bytes": 1000}
              for u in range(4)],
    "config": {"num_hidden_layers": 2, "hidden_size": 64}, "overhead": {"decode_step_ms": 0.5, "prefill_ms": 1.0},
    "meta": {"host": "h"},
}
STATE = {"name": "bad", "state_dir": "/x", "bridge": "esbr0", "bridge_address": "10.78.50.1", "subnet": "10.78.50.0/24",
         "namespaces": {"edge": "es-bad-edge"}, "addresses": {"edge": "10.78.50.10"}, "veths": {"edge": "esv0"},
         "sshd_pids": {"edge": 1}, "cgroups": [], "key": "/x/k", "known_hosts": "/x/kh", "ssh_config": "/x/c"}


def _set(data, path: str, value):
    """A copy of `data` with the field at "a.0.b" set to `value` (or deleted, with DELETE)."""
    d = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return d


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def _big_int() -> str:
    return "9" * 5000


# (id, base, change, field the message must name). change: (path, value) -> a changed copy of the base; or
# bytes / str -> the whole file; field None: the problem is the whole file (its name is still required).
YAML_CASES = [
    ("pair-src-list", ("links.pairs.0.src", ["edge"]), "links.pairs[0].src"),
    ("pair-dst-dict", ("links.pairs.0.dst", {"a": 1}), "links.pairs[0].dst"),
    ("nested-3000", "devices: " + _nested(3000), None),
    ("not-utf8", b"name: \xff\xfe\n", None),
    ("empty-file", "", "top level"),
    ("top-list", "- 1\n- 2\n", "top level"),
    ("devices-int", ("devices", 5), "devices"),
    ("memory-negative", ("devices.0.memory", -1), "devices[0].memory"),
    ("memory-garbage", ("devices.1.memory", "4 GB?"), "devices[1].memory"),
    ("port-string", ("devices.1.port", "x"), "devices[1].port"),
    ("port-huge", ("devices.1.port", 70000), "devices[1].port"),
    ("cpus-bool", ("devices.0.cpus", [True]), "devices[0].cpus[0]"),
    ("cpu-quota-nan", ("devices.0.cpu_quota", float("nan")), "devices[0].cpu_quota"),
    ("mbps-word", ("links.default.mbps", "fast"), "links.default.mbps"),
    ("latency-negative", ("links.pairs.0.latency_ms", -1), "links.pairs[0].latency_ms"),
    ("emulation-list", ("emulation", [1]), "emulation"),
    ("subnet-bad", ("emulation.subnet", "10.0.0.0/33"), "emulation.subnet"),
    ("name-space", ("name", "a b"), "name"),
    ("source-yes", ("devices.0.source", "yes"), "devices[0].source"),
    ("address-bad", ("devices.0.address", "300.1.1.1"), "devices[0].address"),
    ("key-list", ("devices.1.key", []), "devices[1].key"),
    ("mem-limit-dict", ("devices.0.mem_limit", {}), "devices[0].mem_limit"),
    ("description-list", ("description", [1]), "description"),
    ("via-in-app-mode", ("devices.1.via", "edge"), "devices[1].via"),
    ("gateways-int", ("emulation.gateways", 5), "emulation.gateways"),
    ("unknown-int-key", "name: bad\n1: 2\ndevices: []\n", "top level"),
    ("huge-int", f"name: bad\ndevices:\n- {{name: e, type: c, memory: {_big_int()}}}\n", None),
    ("alias-bomb", "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh")), None),
]
PROBLEM_CASES = [
    ("pairs-int", ("links.pairs", 5), "links.pairs"),
    ("units-int", ("units", 5), "units"),
    ("units-empty", ("units", []), "units"),
    ("mem-negative", ("units.0.mem_bytes", -1), "units[0].mem_bytes"),
    ("out-bytes-word", ("units.1.out_bytes", "x"), "units[1].out_bytes"),
    ("unit-ms-string", ("devices.0.unit_ms", "x"), "devices[0].unit_ms"),
    ("unit-ms-null", ("devices.0.unit_ms.2", None), "devices[0].unit_ms[2]"),
    ("unit-ms-short", ("devices.1.unit_ms", [1, 1]), "devices[1].unit_ms"),
    ("source-string", ("devices.1.source", "true"), "devices[1].source"),
    ("memory-nan", ("devices.0.memory_bytes", float("nan")), "devices[0].memory_bytes"),
    ("device-name-dict", ("devices.0.name", {}), "devices[0].name"),
    ("device-name-twice", ("devices.1.name", "edge"), "devices[1].name"),
    ("mbps-zero", ("links.default.mbps", 0), "links.default.mbps"),
    ("pair-src-list", ("links.pairs.0.src", ["edge"]), "links.pairs[0].src"),
    ("pair-unknown-device", ("links.pairs.0.dst", "nope"), "links.pairs[0].dst"),
    ("micro-batch-zero", ("micro_batch_size", 0), "micro_batch_size"),
    ("micro-batch-fraction", ("micro_batch_size", 1.5), "micro_batch_size"),
    ("return-bytes-negative", ("return_bytes", -1), "return_bytes"),
    ("step-ms-inf", ("step_ms", float("inf")), "step_ms"),
    ("meta-list", ("meta", [1]), "meta"),
    ("unknown-field", ("unitz", 1), "unitz"),
    ("two-sources", ("devices.1.source", True), "devices"),
    ("tied-too-big", ("tied_bytes", 5), "tied_bytes"),
    ("empty-file", "", None),
    ("not-utf8", b'{"units": "\xff"}', None),
    ("nested-100000", _nested(100_000), None),
    ("huge-int", '{"units": ' + _big_int() + "}", None),
]
PLAN_CASES = [
    ("stages-int", ("stages", 5), "stages"),
    ("stages-empty", ("stages", []), "stages"),
    ("start-negative", ("stages.0.start", -1), "stages[0].start"),
    ("start-word", ("stages.0.start", "x"), "stages[0].start"),
    ("end-fraction", ("stages.1.end", 3.5), "stages[1].end"),
    ("device-list", ("stages.0.device", []), "stages[0].device"),
    ("end-missing", ("stages.1.end", DELETE), "stages[1].end"),
    ("reversed", ("stages.0.end", 0), "stages[0]"),
    ("relay-word", ("relay", "yes"), "relay"),
    ("micro-batch-zero", ("micro_batch_size", 0), "micro_batch_size"),
    ("latency-negative", ("latency_ms", -5), "latency_ms"),
    ("memory-list", ("memory_bytes", [1]), "memory_bytes"),
    ("top-list", "[1, 2]", None),
    ("truncated", '{"stages": [{"device": "ed', None),
    ("not-utf8", b"\xff\xfe{}", None),
    ("nested-100000", '{"stages": ' + _nested(100_000) + "}", None),
]
PROFILE_CASES = [
    ("param-bytes-negative", ("units.1.param_bytes", -100), "units[1].param_bytes"),
    ("batch-zero", ("batch", 0), "batch"),
    ("n-layers-word", ("n_layers", "x"), "n_layers"),
    ("n-layers-inf", ("n_layers", float("inf")), "n_layers"),
    ("decode-nan", ("units.0.decode_ms", float("nan")), "units[0].decode_ms"),
    ("prefill-negative", ("units.2.prefill_ms", -1), "units[2].prefill_ms"),
    ("units-empty", ("units", []), "units"),
    ("unit-index-wrong", ("units.2.unit", 7), "units[2]"),
    ("kv-len-negative", ("kv_lens", [-1]), "kv_lens[0]"),
    ("kv-key-word", ("units.0.decode_ms_by_kv", {"x": 1}), "units[0].decode_ms_by_kv"),
    ("config-list", ("config", []), "config"),
    ("overhead-word", ("overhead.decode_step_ms", "x"), "overhead.decode_step_ms"),
    ("device-type-missing", ("device_type", DELETE), "device_type"),
    ("dtype-int", ("dtype", 5), "dtype"),
    ("format-other", ("format", "other/2"), "format"),
    ("unit-name-list", ("units.1.name", []), "units[1].name"),
    ("tied-negative", ("units.3.tied_bytes", -1), "units[3].tied_bytes"),
    ("empty-file", "", None),
    ("not-utf8", b"\xff", None),
]
STATE_CASES = [
    ("empty", "", None),
    ("garbage", "{not json", None),
    ("not-utf8", b"\xff\xfe", None),
    ("a-list", "[]", None),
    ("pid-negative", ("sshd_pids.edge", -1), "sshd_pids.edge"),
    ("key-missing", ("key", DELETE), "key"),
    ("namespaces-list", ("namespaces", ["es-bad-edge"]), "namespaces"),
]


def _write(path: Path, base, change, dump) -> Path:
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, str):
        path.write_text(change)
    else:
        path.write_text(dump(_set(base, *change)))
    return path


def _refused(argv: list, capsys, file: Path | None, field: str | None) -> str:
    """Run the command in this process: exit 2, exactly one line on stderr naming `file` and `field`."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("edgeshard: error: "), err
    assert "Traceback" not in err
    if file is not None:
        assert str(file) in lines[0], lines[0]
    if field is not None:
        assert field in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("change,field", [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES])
def test_testbed_yaml(tmp_path, capsys, change, field):
    f = _write(tmp_path / "tb.yaml", TESTBED, change, yaml.safe_dump)
    _refused(["testbed", "check", f], capsys, f, field)


@pytest.mark.parametrize("change,field", [c[1:] for c in PROBLEM_CASES], ids=[c[0] for c in PROBLEM_CASES])
def test_problem_json(tmp_path, capsys, change, field):
    f = _write(tmp_path / "problem.json", PROBLEM, change, json.dumps)
    _refused(["plan", "--problem", f], capsys, f, field)


@pytest.mark.parametrize("change,field", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_plan_json(tmp_path, capsys, change, field):
    problem = tmp_path / "problem.json"
    problem.write_text(json.dumps(PROBLEM))
    f = _write(tmp_path / "plan.json", PLAN, change, json.dumps)
    _refused(["plan", "--problem", problem, "--evaluate", f], capsys, f, field)


@pytest.mark.parametrize("change,field", [c[1:] for c in PROFILE_CASES], ids=[c[0] for c in PROFILE_CASES])
def test_profile_json(tmp_path, capsys, change, field):
    f = _write(tmp_path / "prof.json", PROFILE, change, json.dumps)
    _refused(["profile-show", f], capsys, f, field)


@pytest.mark.parametrize("change,field", [c[1:] for c in STATE_CASES], ids=[c[0] for c in STATE_CASES])
def test_state_json_of_the_emulated_testbed(tmp_path, capsys, monkeypatch, change, field):
    """`probe` on an emulated testbed reads its state.json for the SSH options (no root needed to get there)."""
    monkeypatch.setenv("EDGESHARD_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state" / "bad").mkdir(parents=True)
    f = _write(tmp_path / "state" / "bad" / "state.json", STATE, change, json.dumps)
    tb = tmp_path / "tb.yaml"
    tb.write_text(yaml.safe_dump({**TESTBED, "devices": [{**d, "launch": "ssh"} for d in TESTBED["devices"]],
                                  "emulation": {"mode": "netns", "subnet": "10.78.50.0/24"}}))
    line = _refused(["probe", "--testbed", tb], capsys, f, field)
    assert "testbed down" in line  # and what to do about it


SPLITS = [("0:a", "split"), ("0:2,,2:4", "split"), ("0:2:4", "split"), ("2:0,0:4", "split"), ("0:3,2:4", "split"),
          ("0:2", "split"), ("0:2,2:9", "split"), (f"0:{_big_int()}", "split")]


@pytest.mark.parametrize("text,field", SPLITS, ids=[s[0][:12] for s in SPLITS])
def test_split_strings(tiny_checkpoint, capsys, text, field):
    _refused(["generate", "--model", tiny_checkpoint, "--split", text, "--prompt-ids", "1,2"], capsys, None, field)


# ---- checkpoints --------------------------------------------------------------------------------------------
def _config(**kw):
    def change(d: Path) -> Path:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(kw)
        for k in [k for k, v in kw.items() if v is DELETE]:
            del cfg[k]
        (d / "config.json").write_text(json.dumps(cfg))
        return d / "config.json"
    return change


def _raw(name: str, data: bytes):
    def change(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return change


def _safetensors(edit):
    """model.safetensors rewritten by `edit(header, data) -> bytes`."""
    def change(d: Path) -> Path:
        f = d / "model.safetensors"
        blob = f.read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        f.write_bytes(edit(json.loads(blob[8:8 + n]), blob[8 + n:]))
        return f
    return change


def _with_header(h: dict, data: bytes) -> bytes:
    b = json.dumps(h).encode()
    return struct.pack("<Q", len(b)) + b + data


def _bad_dtype(h, data):
    name = next(k for k in h if k != "__metadata__")
    return _with_header({**h, name: {**h[name], "dtype": "Q9"}}, data)


def _index_escaping(d: Path) -> Path:
    (d / "model.safetensors").rename(d / "shard.safetensors")
    idx = d / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}))
    return idx


CHECKPOINT_CASES = [
    ("layers-negative", _config(num_hidden_layers=-1), "num_hidden_layers"),
    ("layers-word", _config(num_hidden_layers="x"), "num_hidden_layers"),
    ("layers-fraction", _config(num_hidden_layers=2.5), "num_hidden_layers"),
    ("hidden-zero", _config(hidden_size=0), "hidden_size"),
    ("vocab-negative", _config(vocab_size=-1), "vocab_size"),
    ("heads-zero", _config(num_attention_heads=0), "num_attention_heads"),
    ("kv-heads-not-dividing", _config(num_key_value_heads=3), "num_key_value_heads"),
    ("eps-negative", _config(rms_norm_eps=-1), "rms_norm_eps"),
    ("tie-word", _config(tie_word_embeddings="yes"), "tie_word_embeddings"),
    ("dtype-unknown", _config(torch_dtype="float77", dtype="float77"), "dtype"),
    ("model-type-missing", _config(model_type=DELETE), "model_type"),
    ("weights-of-another-size", lambda d: _config(vocab_size=400)(d).with_name("model.safetensors"), "lm_head.weight"),
    ("config-list", _raw("config.json", b"[1, 2]"), None),
    ("config-not-utf8", _raw("config.json", b"\xff\xfe{}"), None),
    ("config-truncated", _raw("config.json", b'{"model_type": "lla'), None),
    ("safetensors-empty", _raw("model.safetensors", b""), None),
    ("safetensors-garbage", _raw("model.safetensors", b"\x00garbage" * 100), None),
    ("safetensors-truncated", _safetensors(lambda h, data: _with_header(h, data[: len(data) // 2])), None),
    ("safetensors-header-length", _safetensors(lambda h, data: struct.pack("<Q", 2**60) + data), None),
    ("safetensors-dtype", _safetensors(_bad_dtype), None),
    ("index-escapes-the-folder", _index_escaping, "weight_map"),
    ("tokenizer-not-utf8", _raw("tokenizer.json", b"\x00\xff garbage"), None),
    ("tokenizer-truncated", _raw("tokenizer.json", b'{"version": "1.0", "trunc'), None),
    ("tokenizer-config-list", _raw("tokenizer_config.json", b"[]"), None),
    ("generation-config-list", _raw("generation_config.json", b"[1]"), None),
    ("generation-eos-word", _raw("generation_config.json", b'{"eos_token_id": "x"}'), "eos_token_id"),
]


@pytest.mark.parametrize("change,field", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint(tiny_checkpoint, tmp_path, capsys, change, field):
    d = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    f = change(d)
    _refused(["generate", "--model", d, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--stop-at-eos"],
             capsys, f, field)


def test_the_installed_command_too(tmp_path):
    """The same contract through `python -m edgeshard_kit` (a fresh interpreter, the real entry point)."""
    f = _write(tmp_path / "tb.yaml", TESTBED, ("links.pairs.0.src", ["edge"]), yaml.safe_dump)
    res = subprocess.run([sys.executable, "-m", "edgeshard_kit", "testbed", "check", str(f)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"{f}: links.pairs[0].src" in res.stderr


# ---- fuzzing: random values in random fields ----------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


def _paths(d, pre=()):
    yield pre
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield from _paths(v, pre + (k,))


def _fuzz(base, load, data):
    paths = list(_paths(base))
    d = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        value = data.draw(JSON_VALUES)
        if not path:
            d = value
            break
        node = d
        try:
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed this field
    try:
        load(d)
    except KitError as e:
        assert "\n" not in str(e) and str(e).startswith("f.json"), str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_problem_fields(data):
    _fuzz(PROBLEM, lambda d: problem_from_dict(d, "f.json"), data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_testbed_fields(data):
    base = {**TESTBED, "emulation": {"mode": "netns", "subnet": "10.77.0.0/24", "gateways": {"edge": "10.77.1.0/24"}},
            "devices": TESTBED["devices"] + [{"name": "far", "type": "cpu", "memory": "1GiB", "launch": "ssh",
                                              "via": "edge", "cpus": [0], "cpu_quota": 0.5, "mem_limit": "1GiB"}]}
    testbed_from_dict(base, "f.json")
    _fuzz(base, lambda d: testbed_from_dict(d, "f.json"), data)
