"""``quantmix cache``: the report counts what the cache really holds; pruning removes entries (only old ones
with --older-than) and what was pruned is measured again, never half-reused."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from quantmix.cli import main


def test_report_and_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.measurement.error_table import error_table

    hf = get_tiny("tiny-llama")  # built in the default cache before the cache is redirected
    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path / "cache"))
    names = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    t = error_table(hf, None, candidates=["Q4_0", "Q8_0"], device="cpu", progress=False, tensors=names)
    assert t.computed == 4 and len(t.rows) == 4
    assert error_table(hf, None, candidates=["Q4_0", "Q8_0"], device="cpu", progress=False, tensors=names).computed == 0
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("errors "))
    assert row.split()[3] == "4"  # four entries, one file each

    old = next((tmp_path / "cache" / "errors").rglob("*.json"))
    past = time.time() - 3 * 86400
    os.utime(old, (past, past))
    assert main(["cache", "--prune", "errors", "--older-than", "2"]) == 0
    assert "removed 1 files" in capsys.readouterr().err
    again = error_table(hf, None, candidates=["Q4_0", "Q8_0"], device="cpu", progress=False, tensors=names)
    assert again.computed == 1 and [r.rel_err for r in again.rows] == [r.rel_err for r in t.rows]
    assert main(["cache", "--prune", "derived"]) == 0
    assert not (tmp_path / "cache" / "errors").exists()
    assert main(["cache", "--prune", "nonsense"]) == 2
    assert "not a cache folder" in capsys.readouterr().err
