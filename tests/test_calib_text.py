"""Your own text (issue 15, item 4): ``--calib`` for optimize and run (imatrix, sensitivity and refinement
probes), ``--eval-text`` for eval and run, on real text (pieces of the Jargon File, the built-in second domain):
the plan records the text it was measured on and its sensitivity follows the text, each text gets its own cache
entries, eval scores the given text, and a bad text is one line naming the file."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The few tensors the cheap optimize runs measure and choose for (every other tensor is pinned to Q8_0).
FREE = ["blk.26.attn_v.weight", "blk.28.ffn_down.weight", "blk.29.ffn_up.weight"]  # late: short replays


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Disjoint pieces of the Jargon File in files: two for calibration (>= one chunk of 512 tokens each), two
    small ones for evaluation, one too short for anything, one empty, one not UTF-8."""
    from quantmix.fixtures.text import text_path

    jargon = text_path("jargon").read_text(encoding="utf-8")
    d = tmp_path_factory.mktemp("texts")
    cuts = {"a": (20_000, 26_000), "b": (600_000, 606_000), "e1": (300_000, 302_500), "e2": (900_000, 902_000),
            "short": (50_000, 50_400)}
    out = {}
    for name, (lo, hi) in cuts.items():
        out[name] = d / f"{name}.txt"
        out[name].write_text(jargon[lo:hi], encoding="utf-8")
    out["empty"] = d / "empty.txt"
    out["empty"].write_text(" \n\n", encoding="utf-8")
    out["latin1"] = d / "latin1.txt"
    out["latin1"].write_bytes("caf\u00e9 na\u00efve ".encode("latin-1") * 200)
    return out


def _record(p: Path) -> dict:
    data = p.read_bytes()
    return {"name": str(p), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_text_sources_record_and_key_each_file(texts: dict[str, Path]) -> None:
    """Files joined in order; each recorded as (name, bytes, sha256); the cache key of one file is its sha256
    (so wiki-calib keeps its old imatrix key) and depends on the order of several."""
    from quantmix.evaluation.evaluate import TextSourceError, load_texts
    from quantmix.fixtures.text import text_path

    ab = load_texts([texts["a"], texts["b"]], "wiki-calib")
    assert ab.records() == [_record(texts["a"]), _record(texts["b"])]
    assert ab.content == texts["a"].read_text() + texts["b"].read_text() and ab.label == f"{texts['a']} + {texts['b']}"
    ba = load_texts([texts["b"], texts["a"]], "wiki-calib")
    assert ba.key != ab.key and load_texts([texts["a"]], "x").key == _record(texts["a"])["sha256"]
    default = load_texts(None, "wiki-calib")
    assert default.names == ("wiki-calib",)
    assert default.key == hashlib.sha256(text_path("wiki-calib").read_bytes()).hexdigest()
    for bad, why in (("missing", "no such text file"), ("empty", "empty"), ("latin1", "not UTF-8"),
                     ("", "a directory")):
        p = texts.get(bad, texts["a"].parent / bad)
        with pytest.raises(TextSourceError, match=re.escape(str(p)) + ".*" + why):
            load_texts([texts["a"], p], "wiki-calib")


def test_model_card_records_the_texts(texts: dict[str, Path]) -> None:
    """``run``'s README names each text with its bytes and full sha256 (what ``sha256sum`` prints), per role."""
    from quantmix.evaluation.evaluate import load_texts
    from quantmix.reports.model_card import render_model_card

    rows = [{"quant": "quantmix-4.5bpw", "family": "quantmix", "size_bytes": 1 << 20, "bpw": 4.5, "kld": 0.01},
            {"quant": "Q4_K_M", "family": "stock", "size_bytes": 1 << 21, "bpw": 5.1, "kld": 0.02}]
    used = {"calibration (imatrix, sensitivity)": load_texts([texts["a"], texts["b"]], "wiki-calib").records(),
            "evaluation (held out)": load_texts(None, "wiki-eval").records()}
    card = render_model_card("m", rows, {"quantmix-4.5bpw": "r.txt"}, [], "quantmix run m", texts=used)
    section = card.split("## Texts\n\n")[1].split("\n\n")[0].splitlines()
    a, b = _record(texts["a"]), _record(texts["b"])
    assert section[0] == (f"- calibration (imatrix, sensitivity): `{a['name']}` ({a['bytes']:,} bytes, sha256 "
                          f"`{a['sha256']}`) + `{b['name']}` ({b['bytes']:,} bytes, sha256 `{b['sha256']}`)")
    assert section[1].startswith("- evaluation (held out): `wiki-eval` (") and len(section) == 2
    assert "## Texts" not in render_model_card("m", rows, {}, [], "quantmix run m")


def test_plan_records_calib_text_and_its_sensitivity_follows_it(texts: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``quantmix optimize --calib`` on two texts: each plan JSON (and sensitivity.json) names its text with bytes
    and sha256, the fitted coefficients differ, and each text has its own sensitivity cache entry. Kept cheap:
    three free tensors in the last layers, one chunk of 128 tokens, no checks, no refinement."""
    from quantmix.cli import main
    from quantmix.fixtures.store import get_fixture
    from quantmix.formats.registry import get_type
    from quantmix.measurement import error_table as et
    from quantmix.measurement import sensitivity
    from quantmix.model.catalog import catalog_from_gguf

    fx = get_fixture("smollm2-768")
    cat = catalog_from_gguf(fx.gguf_f32)
    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path / "cache"))  # fresh error / sensitivity caches
    monkeypatch.setitem(sensitivity.PROFILES, "quick", {"chunks": 1, "checks": 0})
    fit = sensitivity.fit_sensitivity
    monkeypatch.setattr(sensitivity, "fit_sensitivity", lambda *a, **k: fit(*a, **{**k, "n_ctx": 128}))
    real = et.error_table
    monkeypatch.setattr(et, "error_table", lambda *a, **k: real(*a, **{**k, "tensors": FREE}))
    size = sum(get_type(("Q4_K" if t.name in FREE else "Q8_0") if t.quantizable else t.source_type or "F32")
               .tensor_bytes(t.shape) for t in cat)
    pin = "^(?!" + "|".join(re.escape(n) for n in FREE) + ")=Q8_0"
    plans, sens = {}, {}
    for name in ("a", "b"):
        out = tmp_path / name / "recipe.txt"
        argv = ["optimize", str(fx.gguf_f32), "--hf", str(fx.hf_dir), "--target-size", str(size), "-o", str(out),
                "--sensitivity", "quick", "--refine-time", "0", "--calib", str(texts[name]), "--pin", pin,
                "--types", "Q3_K,Q4_K,Q6_K,Q8_0", "--device", "cpu", "--quiet"]
        assert main(argv) == 0
        plans[name] = json.loads(out.with_suffix(".plan.json").read_text())
        sens[name] = json.loads((out.parent / "sensitivity.json").read_text())
    for name in ("a", "b"):
        assert plans[name]["calibration_text"] == [_record(texts[name])] == sens[name]["text"]
        assert "notes" in plans[name] and plans[name]["bytes"] <= size
        assert sens[name]["n_tokens"] == 127 and set(sens[name]["coefficients"]) == set(FREE)
    ca, cb = sens["a"]["coefficients"], sens["b"]["coefficients"]
    assert all(ca[n] > 0 and cb[n] > 0 for n in FREE)
    assert max(abs(ca[n] / cb[n] - 1) for n in FREE) > 0.02  # another text, other measured KLDs
    assert len(list((tmp_path / "cache" / "sensitivity").iterdir())) == 2  # nothing reused across texts


def test_imatrix_cache_is_per_text(texts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run``'s imatrix: another text gives another cached file, with other statistics; the same text reuses
    its own. On the tiny Llama with SmolLM2's real tokenizer (the imatrix step does not read the GGUF)."""
    import numpy as np

    from quantmix.calibration.imatrix_io import read_imatrix
    from quantmix.evaluation.evaluate import load_texts
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.job import ModelInputs, ensure_imatrix

    model = get_tiny("tiny-llama", vocab=True)
    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path / "cache"))
    inputs = ModelInputs("tiny-llama", tmp_path / "unused.gguf", model)
    a = ensure_imatrix(inputs, chunks=1, progress=False, text=load_texts([texts["a"]], "wiki-calib"))
    b = ensure_imatrix(inputs, chunks=1, progress=False, text=load_texts([texts["b"]], "wiki-calib"))
    assert a != b and a.is_file() and b.is_file()
    assert ensure_imatrix(inputs, chunks=1, progress=False, text=load_texts([texts["a"]], "x")) == a
    ia, ib = read_imatrix(a), read_imatrix(b)
    name = "blk.1.ffn_down.weight"
    assert ia.datasets == [str(texts["a"])] and ia.chunk_count == 1
    assert not np.allclose(ia.entries[name].sums, ib.entries[name].sums)


def test_eval_scores_the_given_text(texts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """``quantmix eval --eval-text`` scores that text: its label, bytes and hash in the row and the chunk count
    its own tokenization gives; ``--text`` is the same option; files are joined in order; default wiki-eval.
    On the tiny Llama with SmolLM2's real tokenizer (what is scored is the point here, not the model)."""
    from transformers import AutoTokenizer

    from quantmix.cli import main
    from quantmix.evaluation.perplexity import tokenize_like_llamacpp
    from quantmix.fixtures.tiny import get_tiny

    model = get_tiny("tiny-llama", vocab=True)
    tok = AutoTokenizer.from_pretrained(model)
    common = ["eval", str(model), "--ftype", "Q8_0", "--ctx", "128", "--json", "--quiet", "--device", "cpu"]

    def row(*extra: str) -> dict:
        assert main([*common, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    def chunks_of(*files: Path) -> int:
        return len(tokenize_like_llamacpp(tok, "".join(f.read_text() for f in files))[0]) // 128

    e1, e2 = texts["e1"], texts["e2"]
    one = row("--eval-text", str(e1), "--chunks", "0")
    assert one["text"] == str(e1) and one["text_bytes"] == e1.stat().st_size
    assert one["text_sha256"] == _record(e1)["sha256"][:16]
    assert one["n_chunks"] == chunks_of(e1) >= 3 and one["n_tokens"] == one["n_chunks"] * 63
    both = row("--text", str(e1), str(e2), "--chunks", "0")  # the old spelling, now with several files
    assert both["text"] == f"{e1} + {e2}" and both["text_bytes"] == e1.stat().st_size + e2.stat().st_size
    assert both["n_chunks"] == chunks_of(e1, e2) > one["n_chunks"] and both["key"] != one["key"]
    default = row("--chunks", "1")
    assert default["text"] == "wiki-eval" and default["n_tokens"] == 63 != one["n_tokens"]
    assert default["text_sha256"] not in (one["text_sha256"], both["text_sha256"])


def test_bad_text_is_one_line_naming_the_file(texts: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Missing, unreadable (a directory), empty, undecodable and too-short texts fail before any long work, in one
    line naming the file."""
    from quantmix.cli import main

    missing = tmp_path / "missing.txt"
    opt = ["optimize", "smollm2-768", "--target-bpw", "4.5", "-o", str(tmp_path / "r.txt"), "--quiet"]
    run = ["run", "smollm2-768", "--targets", "4.5", "-o", str(tmp_path / "out"), "--quiet"]
    ev = ["eval", "smollm2-768", "--ftype", "Q8_0", "--quiet", "--ctx", "512"]
    cases = [
        (opt + ["--calib", str(missing)], missing, "no such text file"),
        (opt + ["--calib", str(texts["a"]), str(texts["empty"])], texts["empty"], "empty"),
        (opt + ["--calib", str(texts["latin1"])], texts["latin1"], "not UTF-8"),
        (opt + ["--calib", str(tmp_path)], tmp_path, "a directory"),
        (opt + ["--calib", str(texts["short"])], texts["short"], "fewer than the 512"),
        (run + ["--calib", str(missing)], missing, "no such text file"),
        (run + ["--eval-text", str(texts["short"])], texts["short"], "fewer than the 1024"),
        (ev + ["--eval-text", str(missing)], missing, "no such text file"),
        (ev + ["--text", str(texts["short"])], texts["short"], "need at least 1024 tokens"),
    ]
    for argv, path, why in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and why in err, (argv, err)
    assert not (tmp_path / "r.txt").exists() and not (tmp_path / "out" / "runs.jsonl").exists()
