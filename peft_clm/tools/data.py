"""Reading training data in TRL's standard formats, with every bad row reported by line number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union


FORMATS = {
    "dpo": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
}


class DataError(ValueError):
    """A data file with bad rows; the message lists each one with its line number."""


def _check_field(value, key: str) -> str | None:
    if isinstance(value, str):
        return None if value.strip() else f"field {key!r} is an empty string"
    if isinstance(value, list):  # conversational: a list of {"role", "content"} messages
        if not value:
            return f"field {key!r} is an empty list"
        for m in value:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"field {key!r} must be a string or a list of {{'role', 'content'}} messages"
            if not m["content"].strip():
                return f"field {key!r} has a message with empty content"
        return None
    return f"field {key!r} must be a string or a list of messages, got {type(value).__name__}"


def read_jsonl(path: Union[str, Path], method: str) -> list[dict]:
    """Read and check a JSONL file for `method` ("dpo": prompt/chosen/rejected, "sft": prompt/completion or
    messages). Raises one `DataError` listing every bad row; nothing is returned from a half-read file.

    Example:
        ```py
        >>> rows = read_jsonl("pairs.jsonl", "dpo")
        ```
    """
    if method not in FORMATS:
        raise ValueError(f"method={method!r} is not one of {sorted(FORMATS)}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {path}.")
    rows, problems = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {lineno}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"line {lineno}: expected a JSON object, got {type(row).__name__}")
                continue
            keys = ("messages",) if method == "sft" and "messages" in row else FORMATS[method]
            missing = [k for k in keys if k not in row]
            if missing:
                problems.append(f"line {lineno}: missing field(s) {missing} (a {method} row needs {list(keys)})")
                continue
            bad = next((msg for k in keys if (msg := _check_field(row[k], k))), None)
            if bad:
                problems.append(f"line {lineno}: {bad}")
                continue
            rows.append({k: row[k] for k in keys})
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{path}: {len(problems)} bad row(s), nothing was trained:\n  {shown}")
    if not rows:
        raise DataError(f"{path} holds no rows.")
    return rows
