"""Notebook parameters, checked before a notebook runs: names, types and ranges against its `parameters` cell.

The parameters cell (flat `name = literal` lines) is the reference: every name it assigns is a parameter and the
literal's type is the parameter's type (an int stays an int: 4.5 is refused, not cut to 4). RULES adds what a
type cannot say: ranges (micro-batches >= 1), choices (the objective), comma lists (bandwidths, models, methods),
paths that must exist. Relative paths given by the user resolve against the directory the command was run from,
and are passed on absolute (the notebooks run with notebooks/ as their working directory). Each check is a pydantic
model made from the cell; a value that does not fit is a KitError of one line that names the parameter.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, \
    ValidationError, ValidationInfo, create_model

from edgeshard_kit.core.errors import KitError
from edgeshard_kit.experiments import paper
from edgeshard_kit.model import hub
from edgeshard_kit.planning.objectives import BASELINE_NAMES, METHOD_NAMES, OBJECTIVES

RUN_LOCATION = {"out_dir": "--out", "results_root": "--root"}  # set by run-notebooks itself, not by --params
TINY = "tiny"  # model_path of a tiny random checkpoint (experiments.steps.TINY)
# notebook 04's method names as benchmark.pick_methods reads them (this module loads no torch: `results list` and
# `run-notebooks` stay light)
METHOD_KEYS = tuple(m.lower() for m in (METHOD_NAMES["latency"], METHOD_NAMES["throughput"], *BASELINE_NAMES)) + (
    "mem-proportional",)


def cell_parameters(nb_path: str | Path) -> dict[str, Any]:
    """{name: default} of the notebook's `parameters` cell (a non-literal default reads as None: any type)."""
    import nbformat
    nb = nbformat.read(str(nb_path), as_version=4)
    cell = next((c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None)
    out: dict[str, Any] = {}
    for stmt in ast.parse(cell.source).body if cell is not None else []:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                out[stmt.targets[0].id] = None
    return out


# ---- value checks (each raises ValueError with a message that reads after "name: ") ----------------------------
def _comma_text(v: Any) -> Any:
    """A list, a number or text -> "a,b,c" (a comma-list parameter may be given as a YAML list or one number)."""
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _positive_numbers(v: str) -> str:
    items = [x.strip() for x in v.split(",") if x.strip()]
    try:
        nums = [float(x) for x in items]
    except ValueError:
        raise ValueError(f"{v!r} is not a comma-separated list of numbers (Mbps)") from None
    if not nums or min(nums) <= 0:
        raise ValueError(f"{v!r}: give one or more bandwidths > 0 (Mbps)")
    return ",".join(items)


def _choices(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def check(v: str) -> str:
        items = [x.strip() for x in v.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise ValueError(f"{v!r}: choose from {', '.join(allowed)}")
        return ",".join(items)
    return check


def _objective(v: str) -> str:
    if v not in OBJECTIVES:
        raise ValueError(f"{v!r} is not one of {', '.join(OBJECTIVES)}")
    return v


def _method_names(v: str) -> str:
    bad = [x for x in v.split(",") if x.strip() and x.strip().lower().replace("_", "-") not in METHOD_KEYS]
    if bad:
        raise ValueError(f"method {bad[0].strip()!r}: choose from {', '.join(METHOD_KEYS[:-1])}")
    return v


def _positive_ints(v: str) -> str:
    items = [x.strip() for x in v.split(",") if x.strip()]
    if not items or not all(x.isdigit() and int(x) > 0 for x in items):
        raise ValueError(f"{v!r}: give one or more positive integers, e.g. 32,64,128")
    return ",".join(items)


def _resolve(v: str, info: ValidationInfo) -> Path:
    p = Path(v).expanduser()
    return p if p.is_absolute() else Path((info.context or {}).get("cwd") or Path.cwd()) / p


def _existing_file(v: str, info: ValidationInfo) -> str:
    if not v:
        return v
    p = _resolve(v, info).resolve()
    if not p.is_file():
        raise ValueError(f"{p} does not exist (relative paths are taken from {(info.context or {}).get('cwd')})")
    return str(p)


def _model_path(v: str, info: ValidationInfo) -> str:
    hub_names = {n.lower() for m in hub.MODELS.values() for n in (m.name, *m.aliases)}
    if not v or v.strip().lower() == TINY or v.strip().lower() in hub_names:
        return v
    p = _resolve(v, info).resolve()
    if not p.is_dir():
        raise ValueError(f"{p} is not a checkpoint folder (nor \"\" for the default model, \"tiny\" for a tiny one)")
    return str(p)


def _multiple_of_16(v: int) -> int:
    if v % 16:
        raise ValueError(f"{v} is not a multiple of 16 (8 heads of an even size)")
    return v


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("is empty")
    return v


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    return v


COMMA = BeforeValidator(_comma_text)
COUNT = Field(ge=1, le=100_000)
# name -> the parameter's type and checks, beyond what its default's type says
RULES: dict[str, Any] = {
    "micro_batches": Annotated[StrictInt, Field(ge=1, le=256)],
    "repeats": Annotated[StrictInt, COUNT], "profile_repeats": Annotated[StrictInt, COUNT],
    "calibrate_repeats": Annotated[StrictInt, COUNT], "prompt_len": Annotated[StrictInt, COUNT],
    "max_new_tokens": Annotated[StrictInt, COUNT], "probe_bytes": Annotated[StrictInt, Field(ge=1, le=2**30)],
    "tiny_layers": Annotated[StrictInt, Field(ge=1, le=256)],
    "tiny_hidden": Annotated[StrictInt, Field(ge=16, le=8192), AfterValidator(_multiple_of_16)],
    "memory_share": Annotated[float, BeforeValidator(_no_bool), Field(ge=0.0, le=1.0)],
    "objective": Annotated[StrictStr, AfterValidator(_objective)],
    "models": Annotated[StrictStr, COMMA, AfterValidator(_choices(paper.MODELS))],
    "methods": Annotated[StrictStr, COMMA, AfterValidator(_method_names)],
    "kv_lens": Annotated[StrictStr, COMMA, AfterValidator(_positive_ints)],
    "testbed_file": Annotated[StrictStr, AfterValidator(_existing_file)],
    "problem_file": Annotated[StrictStr, AfterValidator(_existing_file)],
    "model_path": Annotated[StrictStr, AfterValidator(_model_path)],
    "prompt": Annotated[StrictStr, AfterValidator(_not_blank)],
}
RULES_BY_TYPE: dict[tuple[str, type], Any] = {  # a name whose type differs between notebooks
    ("cloud_mbps", str): Annotated[StrictStr, COMMA, AfterValidator(_positive_numbers)],
    ("cloud_mbps", float): Annotated[float, BeforeValidator(_no_bool), Field(gt=0.0)],
}


def _type_of(name: str, default: Any) -> Any:
    if (name, type(default)) in RULES_BY_TYPE:
        return RULES_BY_TYPE[(name, type(default))]
    if name in RULES:
        return RULES[name]
    return {bool: StrictBool, int: StrictInt, str: StrictStr,
            float: Annotated[float, BeforeValidator(_no_bool)]}.get(type(default), Any)


def check_parameters(nb_path: str | Path, given: dict[str, Any], cwd: str | Path | None = None,
                     where: str = "--params") -> dict[str, Any]:
    """`given` checked against the notebook's parameters cell: the values to pass (normalised; paths absolute).

    KitError "<where>: <notebook>: <name>: <why>" for an unknown name, a value of the wrong type or out of
    range, a missing path (shown resolved against `cwd`, default the current directory), or a run-location name.
    """
    nb_path = Path(nb_path)
    declared = cell_parameters(nb_path)
    for name in given:
        if name in RUN_LOCATION:
            raise KitError(f"{where}: {nb_path.name}: {name} is set by run-notebooks (use {RUN_LOCATION[name]})")
        if name not in declared:
            raise KitError(f"{where}: {nb_path.name}: no parameter {name!r}; it declares "
                           f"{', '.join(n for n in declared if n not in RUN_LOCATION)}")
    fields = {n: (_type_of(n, declared[n]), ...) for n in given}
    model = create_model(f"Params_{nb_path.stem}", __config__=ConfigDict(extra="forbid"), **fields)
    try:
        checked = model.model_validate(given, context={"cwd": str(Path(cwd or Path.cwd()).resolve())})
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "value_error" else f" (got {err['input']!r})"
        raise KitError(f"{where}: {nb_path.name}: {name}: {msg}{got}") from None
    return checked.model_dump()
