"""Evaluation rows that accumulate across runs: one JSON object per line, and the same rows as CSV beside it.

A row's ``key`` hashes what was compared (model files, the quantization's exact types or GGUF bytes, the
tokens, the scoring, the reference precision, the activation emulation): evaluating the same thing again
replaces its row instead of adding a duplicate, and rows keep the order they were first added in. Both files
are rewritten whole through a temporary file and a rename, so a crash never leaves half a row.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path

from quantmix.planning.recipe import atomic_write_text

__all__ = ["RunsError", "load_runs", "append_run", "csv_path_for", "write_csv", "comparable_runs"]


class RunsError(ValueError):
    """A runs file is malformed; the message names the file and line."""


def csv_path_for(path: str | Path) -> Path:
    """``runs.jsonl`` -> ``runs.csv`` (the CSV copy kept beside the JSONL)."""
    p = Path(path)
    return p.with_suffix(".csv") if p.suffix != ".csv" else p.with_name(p.name + ".csv")


def load_runs(path: str | Path) -> list[dict]:
    """Every row of a runs.jsonl file (none when it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunsError(f"{p}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise RunsError(f"{p}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _clean(v: object) -> object:
    """JSON has no NaN: write it as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def append_run(path: str | Path, row: dict, write_csv_copy: bool = True) -> list[dict]:
    """Add ``row`` to ``path`` (replacing an earlier row with the same ``key``); returns all rows. Also
    rewrites the CSV copy (:func:`csv_path_for`) unless told not to."""
    p = Path(path)
    rows = load_runs(p)
    row = {k: _clean(v) for k, v in row.items()}
    key = row.get("key")
    for i, old in enumerate(rows):
        if key is not None and old.get("key") == key:
            rows[i] = row
            break
    else:
        rows.append(row)
    atomic_write_text(p, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))
    if write_csv_copy:
        write_csv(csv_path_for(p), rows)
    return rows


def write_csv(path: str | Path, rows: Iterable[dict]) -> Path:
    """Rows as CSV; the columns are every field in first-seen order (missing ones left empty)."""
    rows = list(rows)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    p = Path(path)
    atomic_write_text(p, buf.getvalue())
    return p


_SAME_SETUP = ("model_sha256", "text_sha256", "n_ctx", "n_chunks", "scoring", "act_quant")


def comparable_runs(rows: Iterable[dict], like: dict) -> list[dict]:
    """Rows measured on the same model, text, chunking, scoring and activation emulation as ``like`` (the
    rows one table can hold)."""
    return [r for r in rows if all(r.get(k) == like.get(k) for k in _SAME_SETUP)]
