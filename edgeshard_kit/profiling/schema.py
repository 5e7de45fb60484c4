"""The schema of a profile JSON file (pydantic): every field's type and range (times in ms, sizes in bytes).

`Profile.from_dict` applies it after its own checks, so a profile with `param_bytes: -100`, `batch: 0` or a
time of NaN is refused in one line naming the file and the field. Fields of newer versions are ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from edgeshard_kit.core.schema import Ms, Name, Number, OpenFileModel, validate

__all__ = ["ProfileIn", "UnitIn", "check_profile"]


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    return v


def _format(v: str) -> str:
    if not re.fullmatch(r"edgeshard-profile/[0-9]+", v):
        raise ValueError(f"{v!r} is not a profile format (edgeshard-profile/N)")
    return v


# A count written by the kit as an int (100.0 is accepted as 100, 100.5 and true are not).
Int0 = Annotated[int, Field(ge=0), BeforeValidator(_not_bool)]
Int1 = Annotated[int, Field(ge=1), BeforeValidator(_not_bool)]
KvLen = Annotated[int, Field(ge=0, le=10**9)]


class UnitIn(OpenFileModel):
    """units[i]: one unit's times (ms) and sizes (bytes)."""

    unit: Int0
    name: Name
    prefill_ms: Ms
    decode_ms: Ms
    decode_ms_by_kv: dict[KvLen, Ms] = {}
    prefill_min_ms: Ms | None = None
    prefill_max_ms: Ms | None = None
    decode_min_ms_by_kv: dict[KvLen, Ms] = {}
    decode_max_ms_by_kv: dict[KvLen, Ms] = {}
    param_bytes: Int0 = 0
    kv_bytes_per_token: Int0 = 0
    out_bytes_per_token: Int0 = 0
    peak_mem_bytes: Int0 = 0
    tied_bytes: Int0 = 0


class OverheadIn(OpenFileModel):
    """overhead: ms outside the units, once per token (decode_step_ms) and once per prompt (prefill_ms);
    measured as a difference, so it may be slightly negative."""

    decode_step_ms: Number | None = None
    prefill_ms: Number | None = None


class ProfileIn(OpenFileModel):
    """A profile JSON file (what `Profile.to_dict` writes)."""

    format: Annotated[str, Field(strict=True), AfterValidator(_format)] | None = None
    model: Name
    n_layers: Int1
    device_type: Name
    dtype: Name
    batch: Int1
    prompt_len: Int0 = 0
    kv_lens: list[KvLen] = Field(default=[], max_length=10_000)
    ref_kv_len: KvLen | None = None
    units: list[UnitIn] = Field(min_length=3, max_length=100_000)
    config: dict[str, Any] = {}
    overhead: OverheadIn = OverheadIn()
    meta: dict[str, Any] = {}


def check_profile(data: Any, where: str) -> ProfileIn:
    """`data` checked against the profile schema; KitError "WHERE: field.path: why" (one line) otherwise."""
    return validate(ProfileIn, data, where)
