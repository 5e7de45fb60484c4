"""The kit's file I/O: JSON read with a one-line error, JSON write, the one tidy-CSV writer, plain JSON data."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError


def read_json(path: str | Path, label: str = "") -> Any:
    """The parsed JSON file at `path`; KitError "<label><path>: not valid JSON (why at line N)" otherwise."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KitError(f"{label}{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise KitError(f"{label}{p}: not a UTF-8 text file (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise KitError(f"{label}{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise KitError(f"{label}{p}: JSON nested too deeply") from None


def write_json(data: Any, path: str | Path, indent: int = 1) -> Path:
    """Write `data` (made plain with `to_jsonable`) as JSON at `path`, parent folders made."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_jsonable(data), indent=indent))
    return p


def write_rows(rows: list[dict], out: str | Path, fields: list[str] | None = None) -> Path:
    """Write records as a tidy CSV at `out` (parent folders made); columns `fields`, else the first row's keys."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or (list(rows[0]) if rows else []), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def _is_frame(obj: Any) -> bool:
    return type(obj).__name__ == "DataFrame"


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data from kit objects: `.to_dict()`, dataclasses, paths, frames, numpy scalars."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "to_dict") and not isinstance(obj, type):
        try:
            return to_jsonable(obj.to_dict(orient="records")) if _is_frame(obj) else to_jsonable(obj.to_dict())
        except TypeError:
            pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalar
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return str(obj)
