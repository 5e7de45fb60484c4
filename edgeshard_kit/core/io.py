"""The kit's file I/O: text and JSON read with one-line errors, atomic writes, the tidy-CSV writer, plain data."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from edgeshard_kit.core.errors import KitError


MAX_FILE_BYTES = 256 * 2**20  # a JSON/YAML file of the kit larger than this is refused, not parsed
MAX_NODES = 2_000_000         # values in a parsed JSON/YAML document (YAML aliases can multiply them)


def read_text(path: str | Path, label: str = "", max_bytes: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of the file at `path`; KitError "<label><path>: why" (missing, a folder, not UTF-8, too big)."""
    p = Path(path)
    try:
        if p.stat().st_size > max_bytes:
            raise KitError(f"{label}{p}: {p.stat().st_size} bytes, larger than the {max_bytes} a kit file may have")
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KitError(f"{label}{p}: no such file") from None
    except IsADirectoryError:
        raise KitError(f"{label}{p}: is a folder, not a file") from None
    except PermissionError:
        raise KitError(f"{label}{p}: permission denied") from None
    except UnicodeDecodeError as e:
        raise KitError(f"{label}{p}: not a UTF-8 text file (byte {e.start})") from None
    except OSError as e:
        raise KitError(f"{label}{p}: cannot be read ({e.strerror or e})") from None


def check_size(data: Any, where: str, limit: int = MAX_NODES) -> Any:
    """`data` unless it holds more than `limit` values (counted as a walk would meet them: aliases count each time)."""
    stack, seen = [data], 0
    while stack:
        x = stack.pop()
        seen += 1
        if seen > limit:
            raise KitError(f"{where}: more than {limit} values (YAML aliases expanding, or a document that refers "
                           "to itself)")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return data


def read_json(path: str | Path, label: str = "") -> Any:
    """The parsed JSON file at `path`; KitError "<label><path>: not valid JSON (why at line N)" otherwise."""
    p = Path(path)
    text = read_text(p, label)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KitError(f"{label}{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise KitError(f"{label}{p}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise KitError(f"{label}{p}: not valid JSON ({str(e).split(':')[0][:120]})") from None


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write `text` at `path` atomically (a temporary file beside it, flushed, then renamed over it): a reader
    sees the old file or the new one, never a part; parent folders made."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def write_json(data: Any, path: str | Path, indent: int = 1) -> Path:
    """Write `data` (made plain with `to_jsonable`) as JSON at `path` (atomically), parent folders made."""
    return write_text_atomic(json.dumps(to_jsonable(data), indent=indent), path)


def write_rows(rows: list[dict], out: str | Path, fields: list[str] | None = None) -> Path:
    """Write records as a tidy CSV at `out` (parent folders made); columns `fields`, else every row's keys in the
    order they first appear (rows of different kinds leave the others' columns empty)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
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
