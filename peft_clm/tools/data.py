"""Reading data files: training pairs in TRL's standard formats and prompt files, every bad row reported with its
file and line number; nothing is returned from a half-read file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

from ..alpha import check_alpha


FORMATS = {
    "dpo": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
}


class DataError(ValueError):
    """A data file with bad rows; the message lists each one with its line number."""


def _check_field(value: Any, key: str) -> str | None:
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


def _check_pair_alpha(value: Any) -> str | None:
    try:
        alpha = check_alpha(value, "alpha", rows=False)
    except ValueError as e:
        return f"field {e}"
    return (
        "field 'alpha' is 0: the reference itself, a pair there teaches nothing; use a nonzero alpha"
        if alpha == 0
        else None
    )


def _lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a UTF-8 text file (a byte-order mark is accepted)."""
    if not path.is_file():
        raise FileNotFoundError(f"No {what} file at {path}.")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{path} is not a UTF-8 text file (it holds NUL bytes: binary, or UTF-16/32).")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not a UTF-8 text file (byte {e.start} cannot be decoded).") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield lineno, line


def _report(path: Path, problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{path}: {len(problems)} bad row(s), nothing was {what}:\n  {shown}")


def _json_object(line: str, lineno: int, problems: list[str]) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        problems.append(f"line {lineno}: not JSON ({e.msg})")
        return None
    if not isinstance(row, dict):
        problems.append(f"line {lineno}: expected a JSON object, got {type(row).__name__}")
        return None
    return row


def read_jsonl(path: Union[str, Path], method: str) -> list[dict]:
    """Read and check a JSONL file for `method` ("dpo": prompt/chosen/rejected, and optionally the nonzero "alpha"
    its policy is scored at, see `tools.alpha_pairs`; "sft": prompt/completion or messages). Raises one `DataError`
    listing every bad row.

    Example:
        ```py
        >>> rows = read_jsonl("pairs.jsonl", "dpo")
        ```
    """
    if method not in FORMATS:
        raise ValueError(f"method={method!r} is not one of {sorted(FORMATS)}.")
    path = Path(path)
    rows, problems = [], []
    for lineno, line in _lines(path, "data"):
        row = _json_object(line, lineno, problems)
        if row is None:
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
        kept = {k: row[k] for k in keys}
        if method == "dpo" and "alpha" in row:  # the alpha the pair's policy is scored at (tools.alpha_pairs)
            bad = _check_pair_alpha(row["alpha"])
            if bad:
                problems.append(f"line {lineno}: {bad}")
                continue
            kept["alpha"] = row["alpha"]
        rows.append(kept)
    _report(path, problems, "trained")
    if not rows:
        raise DataError(f"{path} holds no rows.")
    return rows


def read_prompts(path: Union[str, Path], domain: Optional[str] = None) -> tuple[list, list[dict]]:
    """Prompts from a file: JSONL rows with a "prompt" (a string or chat messages), or plain text, one prompt a line.
    With `domain`, only the JSONL rows whose "domain" field is `domain` (as the domains data labels its questions).

    Returns (prompts, preference rows): rows that also carry chosen/rejected are kept for preference metrics. Raises
    one `DataError` listing every bad row.

    Example:
        ```py
        >>> prompts, pairs = read_prompts("data/concise/heldout.jsonl")
        ```
    """
    path = Path(path)
    if domain is not None and path.suffix != ".jsonl":
        raise DataError(f"{path}: only JSONL rows carry a 'domain'; give a .jsonl file to keep domain {domain!r}.")
    prompts, pairs, problems = [], [], []
    for lineno, line in _lines(path, "prompts"):
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        row = _json_object(line, lineno, problems)
        if row is None or (domain is not None and row.get("domain") != domain):
            continue
        if "prompt" not in row:
            problems.append(f"line {lineno}: no 'prompt' field")
            continue
        bad = _check_field(row["prompt"], "prompt")
        if bad:
            problems.append(f"line {lineno}: {bad}")
            continue
        prompts.append(row["prompt"])
        if "chosen" in row and "rejected" in row:
            bad = next((msg for k in ("chosen", "rejected") if (msg := _check_field(row[k], k))), None)
            if bad:
                problems.append(f"line {lineno}: {bad}")
                continue
            pairs.append(row)
    _report(path, problems, "read")
    if not prompts:
        raise DataError(f"{path} holds no prompts" + (f" of domain {domain!r}." if domain is not None else "."))
    return prompts, pairs


def read_labelled(path: Union[str, Path], label_field: str = "label") -> tuple[list, list[str]]:
    """Prompts and their labels from JSONL rows {"prompt": a string or chat messages, <label_field>: a string}, as
    `peft-clm router fit` reads them. Raises one `DataError` listing every bad row.

    Example:
        ```py
        >>> prompts, domains = read_labelled("data/domains_more/train.jsonl", "domain")
        ```
    """
    path = Path(path)
    prompts, labels, problems = [], [], []
    for lineno, line in _lines(path, "labelled prompts"):
        row = _json_object(line, lineno, problems)
        if row is None:
            continue
        missing = [k for k in ("prompt", label_field) if k not in row]
        if missing:
            bad = f"missing field(s) {missing}"
        elif not isinstance(row[label_field], str) or not row[label_field]:
            bad = f"field {label_field!r} must be a non-empty string, got {row[label_field]!r}"
        elif isinstance(row["prompt"], list) and not any(
            isinstance(m, dict) and m.get("role") == "user" for m in row["prompt"]
        ):
            bad = "field 'prompt' has no user message (a chat is routed on its last one)"
        else:
            bad = _check_field(row["prompt"], "prompt")
        if bad:
            problems.append(f"line {lineno}: {bad}")
            continue
        prompts.append(row["prompt"])
        labels.append(row[label_field])
    _report(path, problems, "read")
    if not prompts:
        raise DataError(f"{path} holds no rows.")
    return prompts, labels
