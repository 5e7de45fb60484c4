"""File schemas with pydantic: the base model, checked number types, and one-line errors "FILE: field.path: message".

Every file format the kit reads (plan, problem, profile, config.json of a checkpoint, state.json of the
emulated testbed) has a pydantic model describing its shape: field types, ranges, required fields and, where
the kit writes every field, unknown fields. `validate(Model, data, where)` returns the model or raises
`KitError` with the first error in one line, e.g.

    plan.json: stages[1].start: -3 is negative
    prob.json: links.pairs: expected a list, got int

Cross-field rules (one source device, ranges that cover the model) stay in the loaders, after the schema.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from edgeshard_kit.core.errors import KitError

__all__ = ["FileModel", "OpenFileModel", "validate", "error_line", "Name", "Text", "Flag", "Count", "PosCount",
           "Bytes", "Ms", "PosNumber", "Mbps", "Number"]

M = TypeVar("M", bound=BaseModel)
_MAX_SHOWN = 60  # characters of a bad value quoted in a message


class FileModel(BaseModel):
    """A file's object whose every field the kit writes: unknown fields are refused (a typo names itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=False)


class OpenFileModel(BaseModel):
    """A file's object that may carry fields of newer versions or of other tools (ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{v!r} is not a finite number")
    return v


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):  # JSON true is not the number 1
        raise ValueError(f"{v!r} is not a number")
    return v


def _flag(v: Any) -> Any:
    if isinstance(v, bool) or getattr(getattr(v, "dtype", None), "kind", "") == "b":  # or numpy's, from Python
        return bool(v)
    raise ValueError(f"{_shown(v)} is not true/false")


def _unshaped(v: Any) -> Any:
    """mbps written as null, "inf", "unlimited", "unshaped", "none" = no limit."""
    if v is None or (isinstance(v, str) and v.strip().lower() in ("inf", "unlimited", "unshaped", "none")):
        return math.inf
    return _not_bool(v)


def _positive_or_inf(v: float) -> float:
    if math.isnan(v):
        raise ValueError("nan is not a number (null = unshaped)")
    if v <= 0:
        raise ValueError(f"{v:g} is negative" if v < 0 else "must be > 0 (null = unshaped)")
    return v


Name = Annotated[str, Field(min_length=1, max_length=256, strict=True)]       # a non-empty name
Text = Annotated[str, Field(max_length=100_000, strict=True)]                 # free text, may be empty
Flag = Annotated[bool, BeforeValidator(_flag)]                               # true / false only
Count = Annotated[int, Field(ge=0), BeforeValidator(_not_bool)]              # 0, 1, 2, ... (not 1.5, not true)
PosCount = Annotated[int, Field(ge=1), BeforeValidator(_not_bool)]           # 1, 2, ...
Number = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_finite)]
Bytes = Annotated[float, Field(ge=0), BeforeValidator(_not_bool), AfterValidator(_finite)]  # a byte count
Ms = Annotated[float, Field(ge=0), BeforeValidator(_not_bool), AfterValidator(_finite)]     # a time in ms
PosNumber = Annotated[float, Field(gt=0), BeforeValidator(_not_bool), AfterValidator(_finite)]
# Megabits/s of a link: > 0, or null / "inf" / "unlimited" for an unshaped link (math.inf).
Mbps = Annotated[float, Field(allow_inf_nan=True), BeforeValidator(_unshaped), AfterValidator(_positive_or_inf)]


def _loc(loc: tuple) -> str:
    """("stages", 1, "start") -> "stages[1].start" (pydantic's union/tag steps left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not any(c in part for c in "[]()'\" ") and part not in ("function-after",):
            out += f".{part}" if out else part
    return out


def _shown(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= _MAX_SHOWN else s[:_MAX_SHOWN - 3] + "..."


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _phrase(err: dict) -> str:
    """The kit's wording of one pydantic error (the value quoted, short)."""
    t, v, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if t == "missing":
        return "missing field"
    if t == "extra_forbidden":
        return "unknown field"
    if t in ("float_parsing", "float_type", "int_parsing", "int_type", "int_from_float", "finite_number"):
        want = "an integer" if t.startswith("int") else "a number"
        return f"{_shown(v)} is not {want}" if t != "finite_number" else f"{_shown(v)} is not a finite number"
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = ctx.get("ge", ctx.get("gt", ctx.get("le", ctx.get("lt"))))
        if t == "greater_than_equal" and bound == 0:
            return f"{_shown(v)} is negative"
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[t]
        return f"{_shown(v)} must be {op} {bound}"
    if t in ("bool_type", "bool_parsing"):
        return f"{_shown(v)} is not true/false"
    if t in ("string_type", "string_sub_type"):
        return f"expected a string, got {_kind(v)} {_shown(v)}"
    if t in ("list_type", "tuple_type"):
        return f"expected a list, got {_kind(v)} {_shown(v)}"
    if t in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected an object, got {_kind(v)} {_shown(v)}"
    if t == "string_too_short":
        return "must not be empty"
    if t == "string_too_long":
        return f"longer than {ctx.get('max_length')} characters"
    if t == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s), got {len(v) if hasattr(v, '__len__') else v}"
    if t == "too_long":
        return f"expected at most {ctx.get('max_length')} item(s)"
    if t == "literal_error":
        return f"{_shown(v)} is not {ctx.get('expected')}"
    if t in ("value_error", "assertion_error"):
        e = ctx.get("error")
        return str(e) if e is not None else err["msg"]
    if t == "recursion_loop":
        return "nested too deeply (or refers to itself)"
    return f"{err['msg'][:1].lower()}{err['msg'][1:]} (got {_shown(v)})"


def error_line(where: str, exc: ValidationError) -> str:
    """One line "WHERE: field.path: message" for the first error of a pydantic ValidationError."""
    err = exc.errors(include_url=False)[0]
    path = _loc(err["loc"])
    text = f"{where}: {path}: {_phrase(err)}" if path else f"{where}: {_phrase(err)}"
    more = len(exc.errors()) - 1
    text = text.replace("\n", " ")
    return text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def validate(model: type[M], data: Any, where: str) -> M:
    """`data` checked against `model`; KitError "WHERE: field.path: message" (one line) otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise KitError(error_line(where, e)) from None
    except RecursionError:
        raise KitError(f"{where}: nested too deeply") from None
