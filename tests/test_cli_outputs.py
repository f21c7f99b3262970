"""Outputs that cannot be written are refused in one line before any work, and nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantmix.cli import main


def test_unwritable_outputs_are_refused_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    cases = (
        (["quantize", "nope.gguf", "--ftype", "Q8_0", "-o", str(tmp_path)], "is a directory; give a file name"),
        (["imatrix", "nope", "-o", str(f / "x.gguf")], f"{f} is a file, not a folder"),
        (["optimize", "nope", "--target-bpw", "4", "-o", str(tmp_path)], "is a directory"),
        (["optimize", "nope", "--target-bpw", "4", "-o", str(tmp_path / "r.txt"), "--gguf-out", str(f / "q.gguf")],
         "--gguf-out"),
        (["run", "nope", "-o", str(f)], "is a file; give a folder"),
    )
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
