"""Bad input, table-driven (issue 18): each case runs one ``quantmix`` command on a broken or wrong input and
must exit 2 with one line naming the file, option, tensor or line and what is wrong, with no traceback, and
leave nothing at (or hidden beside) the output path. The inputs are real files: the tiny llama's F32 GGUF and
its Hugging Face directory, damaged in the ways users damage them (truncated, overwritten, edited)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quantmix.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from quantmix.fixtures.damaged import build_damaged
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.job import resolve_model

    hf = get_tiny("tiny-llama", vocab=True)
    return build_damaged(resolve_model(hf).gguf, hf, tmp_path_factory.mktemp("bad"))


# (id, argv with {name} placeholders for the inputs and {out} for the output path, text the one line must hold)
CASES = [
    ("size-missing", "size {tmp}/nope.gguf --ftype Q4_K_M", "nope.gguf"),
    ("size-truncated", "size {truncated.gguf} --ftype Q4_K_M", "truncated.gguf"),
    ("size-empty", "size {empty.gguf} --ftype Q4_K_M", "empty.gguf"),
    ("size-garbage", "size {garbage.gguf} --ftype Q4_K_M", "garbage.gguf"),
    ("size-magic", "size {magic.gguf} --ftype Q4_K_M", "magic.gguf"),
    ("size-version", "size {version.gguf} --ftype Q4_K_M", "version"),
    ("size-header-only", "size {header-only.gguf} --ftype Q4_K_M", "header-only.gguf"),
    ("size-bad-ftype", "size {gguf} --ftype Q9_K_M", "Q9_K_M"),
    ("catalog-garbage", "catalog {garbage.gguf}", "garbage.gguf"),
    ("quantize-truncated", "quantize {truncated.gguf} -o {out} --ftype Q4_K_M", "truncated.gguf"),
    ("quantize-nan", "quantize {nan-weight.gguf} -o {out} --ftype Q4_K_M", "blk.1.ffn_up.weight"),
    ("quantize-inf", "quantize {inf-weight.gguf} -o {out} --ftype Q4_K_M", "blk.0.attn_q.weight"),
    ("quantize-nan-copied", "quantize {nan-norm.gguf} -o {out} --ftype Q4_K_M", "blk.0.attn_norm.weight"),
    ("quantize-overflow-q8", "quantize {huge-weight.gguf} -o {out} --ftype Q8_0", "blk.0.ffn_down.weight"),
    ("quantize-bad-imatrix", "quantize {gguf} -o {out} --ftype Q4_K_M --imatrix {garbage.imatrix}", "garbage.imatrix"),
    ("quantize-missing-imatrix", "quantize {gguf} -o {out} --ftype Q4_K_M --imatrix {tmp}/no.imatrix", "no.imatrix"),
    ("quantize-recipe-regex", "quantize {gguf} -o {out} --recipe {recipe-bad-regex.txt}", "recipe-bad-regex.txt:2"),
    ("quantize-recipe-type", "quantize {gguf} -o {out} --recipe {recipe-bad-type.txt}", "Q9_K"),
    ("quantize-recipe-syntax", "quantize {gguf} -o {out} --recipe {recipe-no-eq.txt}", "recipe-no-eq.txt:1"),
    ("quantize-recipe-missing", "quantize {gguf} -o {out} --recipe {tmp}/none.txt", "none.txt"),
    ("quantize-out-is-dir", "quantize {gguf} -o {tmp} --ftype Q4_K_M", "directory"),
    ("quantize-out-under-file", "quantize {gguf} -o {a-file}/m.gguf --ftype Q4_K_M", "a-file"),
    ("quantize-onto-source", "quantize {gguf} -o {gguf} --ftype Q4_K_M", "overwrite"),
    ("quantize-iq-no-imatrix", "quantize {gguf} -o {out} --ftype IQ2_XS", "importance matrix"),
    ("quantize-bad-split", "quantize {gguf} -o {out} --ftype Q4_K_M --split-max-size 12Q", "12Q"),
    ("optimize-bpw-inf", "optimize {gguf} --target-bpw inf -o {out}", "--target-bpw"),
    ("optimize-bpw-nan", "optimize {gguf} --target-bpw nan -o {out}", "--target-bpw"),
    ("optimize-bpw-zero", "optimize {gguf} --target-bpw 0 -o {out}", "--target-bpw"),
    ("optimize-bpw-negative", "optimize {gguf} --target-bpw -3 -o {out}", "--target-bpw"),
    ("optimize-size-unit", "optimize {gguf} --target-size 12XB -o {out}", "12XB"),
    ("optimize-budget-small", "optimize {gguf} --target-bpw 1.2 --types Q8_0 -o {out}", "budget is too small"),
    ("optimize-pin-nomatch", "optimize {gguf} --target-bpw 4.5 --pin nomatch=Q4_K -o {out}", "matches no"),
    ("optimize-pin-regex", "optimize {gguf} --target-bpw 4.5 --pin (=Q4_K -o {out}", "not a valid regex"),
    ("optimize-pin-type", "optimize {gguf} --target-bpw 4.5 --pin attn_q=Q9_K -o {out}", "Q9_K"),
    ("optimize-pin-syntax", "optimize {gguf} --target-bpw 4.5 --pin attn_q -o {out}", "--pin"),
    ("optimize-types-unknown", "optimize {gguf} --target-bpw 4.5 --types Q4_K,FOO -o {out}", "FOO"),
    ("optimize-nan-weight", "optimize {nan-weight.gguf} --target-bpw 4.5 --sensitivity none -o {out}",
     "blk.1.ffn_up.weight"),
    ("optimize-missing-imatrix", "optimize {gguf} --target-bpw 4.5 --imatrix {tmp}/x.imatrix -o {out}", "x.imatrix"),
    ("optimize-gguf-out-under-file", "optimize {gguf} --target-bpw 4.5 -o {out} --gguf-out {a-file}/q.gguf",
     "--gguf-out"),
    ("optimize-calib-missing", "optimize {gguf} --hf {hf} --target-bpw 4.5 -o {out} --calib {tmp}/none.txt",
     "none.txt"),
    ("optimize-calib-short", "optimize {gguf} --hf {hf} --target-bpw 4.5 -o {out} --calib {short.txt}", "short.txt"),
    ("imatrix-no-config", "imatrix {hf-noconfig} -o {out} --chunks 1", "config.json"),
    ("imatrix-bad-config", "imatrix {hf-badjson} -o {out} --chunks 1", "config.json"),
    ("imatrix-truncated-shard", "imatrix {hf-truncated} -o {out} --chunks 1 --device cpu", "safetensors"),
    ("imatrix-of-gguf", "imatrix {gguf} -o {out} --chunks 1", "Hugging Face"),
    ("imatrix-text-missing", "imatrix {hf} -o {out} --text {tmp}/none.txt", "none.txt"),
    ("optimize-truncated-hf", "optimize {hf-truncated} --target-bpw 4.5 --sensitivity none -o {out}", "safetensors"),
    ("optimize-hf-noconfig", "optimize {hf-noconfig} --target-bpw 4.5 -o {out}", "hf-noconfig"),
    ("eval-truncated-gguf", "eval {hf} --gguf {truncated.gguf} --chunks 1", "truncated.gguf"),
    ("eval-truncated-hf", "eval {hf-truncated} --ftype Q4_K_M --chunks 1 --device cpu", "safetensors"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case: tuple[str, str, str], inputs: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, template, want = case
    work = tmp_path / "work"
    work.mkdir()
    out = work / ("out.txt" if template.startswith("optimize") else "out.gguf")
    names = {**{k: str(v) for k, v in inputs.items()}, "out": str(out), "tmp": str(work)}
    argv = _split(template, names)
    monkeypatch.chdir(work)
    before = set(os.listdir(work))
    try:
        rc = main([*argv, "--quiet"] if argv[0] in ("quantize", "optimize", "imatrix", "eval") else argv)
    except SystemExit as e:  # argparse's own usage errors: exit 2 and one "error:" line, as every CLI does
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:") and "warning" not in ln]
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and want in errors[0], err[-2000:]
    assert set(os.listdir(work)) == before, sorted(set(os.listdir(work)) - before)  # nothing at or beside -o


def _split(template: str, names: dict[str, str]) -> list[str]:
    import re

    return [re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], part) for part in template.split()]


def test_cases_are_many_and_distinct() -> None:
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert len({c[1] for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "size", str(inputs["garbage.gguf"]), "--ftype", "Q4_K_M"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("quantmix size: error:")
    json.dumps(err)  # printable
