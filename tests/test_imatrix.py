"""Importance matrices: quantmix's (transformers, layer by layer) against llama-imatrix's on the same text,
the streaming against a whole-model run, the GGUF writer against llama-imatrix's own writer, and the legacy
.dat reader against files llama-imatrix writes."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch

from quantmix.calibration.activations import ActivationStats, collect_activations
from quantmix.calibration.imatrix import (
    calibration_tokens, compute_imatrix, compute_imatrix_tokens, coverage_report, expert_coverage,
    imatrix_from_stats,
)
from quantmix.calibration.imatrix_io import (
    Imatrix, ImatrixEntry, ImatrixError, imatrix_bytes, read_imatrix, write_imatrix,
)
from quantmix.fixtures.tiny import get_tiny

N_CTX = 512
N_CHUNKS = 8


def _tiny_chunks(n_chunk: int = 6, n_ctx: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n_chunk, n_ctx), generator=torch.Generator().manual_seed(seed))


def _assert_same_stats(a: Imatrix, b: Imatrix, rtol: float = 1e-5, skip: tuple[str, ...] = ()) -> None:
    names = set(a.entries) - set(skip)
    assert names == set(b.entries) - set(skip)
    for n in sorted(names):
        ea, eb = a.entries[n], b.entries[n]
        assert np.array_equal(ea.counts, eb.counts), n
        np.testing.assert_allclose(ea.sums, eb.sums, rtol=rtol, atol=1e-6, err_msg=n)
        np.testing.assert_allclose(ea.in_sum, eb.in_sum, rtol=rtol, atol=1e-4, err_msg=n)


# ------------------------------------------------------------------------------------ streaming, structure


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-mixtral", "tiny-llama"])
def test_streaming_equals_whole_model(name):
    """Layer-by-layer streaming (one layer resident) gives the statistics of hooking the whole loaded model;
    HF names map onto llama.cpp's GGUF names (Mixtral's renamed, fused experts included)."""
    from transformers import AutoModelForCausalLM

    d = get_tiny(name)
    chunks = _tiny_chunks()
    im = compute_imatrix_tokens(d, chunks, batch_tokens=256, progress=False, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    st = collect_activations(model, [chunks[i:i + 2] for i in range(0, 6, 2)])
    ref = imatrix_from_stats(st, model, d, 6, 128)
    _assert_same_stats(im, ref)
    assert all(n.startswith("blk.") for n in im.entries)  # no output.weight unless asked (llama-imatrix too)
    n_layer = model.config.num_hidden_layers
    per_layer = {"tiny-qwen2-moe": 12, "tiny-mixtral": 8, "tiny-llama": 7}[name]
    assert len(im.entries) == n_layer * per_layer
    assert (im.chunk_count, im.chunk_size) == (6, 128)
    for n, e in im.entries.items():
        if e.n_mat == 1:
            assert e.counts.tolist() == [6 * 128], n
        else:  # each token is routed to top_k experts
            assert int(e.counts.sum()) == 6 * 128 * model.config.num_experts_per_tok, n


def test_process_output_and_all_experts():
    """``process_output`` adds output.weight over every token; ``all_experts`` calibrates every expert on every
    token: the gate/up statistics equal the router input's, the down ones are a full pass through each expert."""
    d = get_tiny("tiny-qwen2-moe")
    chunks = _tiny_chunks()
    routed = compute_imatrix_tokens(d, chunks, batch_tokens=256, progress=False, device="cpu",
                                    process_output=True)
    assert routed.entries["output.weight"].counts.tolist() == [768]
    full = compute_imatrix_tokens(d, chunks, all_experts=True, batch_tokens=256, progress=False, device="cpu")
    for layer in (0, 1):
        router = full.entries[f"blk.{layer}.ffn_gate_inp.weight"]
        for kind in ("gate", "up", "down"):
            e = full.entries[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert e.counts.tolist() == [768] * 4
            if kind != "down":
                np.testing.assert_allclose(e.sums, np.repeat(router.sums, 4, axis=0), rtol=1e-6)
        # the hidden states passed on keep the real routing: every non-expert tensor is unchanged
        for n, e in routed.entries.items():
            if e.n_mat == 1 and n != "output.weight":
                np.testing.assert_array_equal(full.entries[n].sums, e.sums, err_msg=n)
        # routed experts saw a subset of the tokens: less in every channel than the full pass
        for kind in ("gate", "down"):
            n = f"blk.{layer}.ffn_{kind}_exps.weight"
            assert np.all(routed.entries[n].sums <= full.entries[n].sums * (1 + 1e-6)), n


def test_coverage_report_names_starved_experts():
    d = get_tiny("tiny-qwen2-moe")
    im = compute_imatrix_tokens(d, _tiny_chunks(), batch_tokens=256, progress=False, device="cpu")
    cov = expert_coverage(im)
    assert [c.layer for c in cov] == ["blk.0", "blk.1"]
    assert all(c.counts.sum() == 768 * 2 for c in cov)
    # a layer whose expert 3 was never routed to (as llama-imatrix would write it) is reported
    n = "blk.1.ffn_down_exps.weight"
    e = im.entries[n]
    starved = e.counts.copy()
    starved[3] = 0
    im.entries[n] = dataclasses.replace(e, counts=starved)
    for kind in ("gate", "up"):
        im.entries[f"blk.1.ffn_{kind}_exps.weight"] = dataclasses.replace(
            im.entries[f"blk.1.ffn_{kind}_exps.weight"], counts=starved)
    rep = coverage_report(im)
    assert "blk.1" in rep and "3 (0)" in rep and "never routed: 1" in rep
    assert coverage_report(im, threshold=10**9).count("below 1000000000") == 2


def test_calibration_tokens_follow_llama_imatrix():
    """Chunks of n_ctx over the joined token stream, tail dropped, capped by max_chunks; with a BOS-adding
    vocabulary, BOS leads the stream and replaces every chunk's first token (llama-imatrix's compute_imatrix)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(50)]
    vocab = {"<s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    text = " ".join(words[i % 50] for i in range(1000))
    ids = [vocab[words[i % 50]] for i in range(1000)]

    c = calibration_tokens(plain, [text], n_ctx=64)
    assert c.shape == (1000 // 64, 64) and c.flatten().tolist() == ids[: 15 * 64]
    assert calibration_tokens(plain, [text], n_ctx=64, max_chunks=3).flatten().tolist() == ids[:192]
    two = calibration_tokens(plain, [text, text], n_ctx=64)
    assert two.flatten().tolist() == (ids + ids)[: 31 * 64]

    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    bos = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", unk_token="<unk>")
    c = calibration_tokens(bos, [text], n_ctx=64)
    stream = [0] + ids
    assert c.shape[0] == len(stream) // 64
    assert c[:, 0].tolist() == [0] * c.shape[0]
    for i in range(c.shape[0]):
        assert c[i, 1:].tolist() == stream[i * 64 + 1:(i + 1) * 64]

    with pytest.raises(ImatrixError, match="less than one chunk"):
        calibration_tokens(plain, ["w1 w2"], n_ctx=64)


def test_bad_inputs_named(tmp_path):
    d = get_tiny("tiny-llama")
    with pytest.raises(ImatrixError, match="no such calibration text"):
        compute_imatrix(d, [tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ImatrixError, match="empty.txt: calibration text file is empty"):
        compute_imatrix(d, [tmp_path / "empty.txt"])
    (tmp_path / "text.txt").write_text("Some real words of text.\n" * 50)
    with pytest.raises(ImatrixError, match="no usable tokenizer"):  # the tiny models ship no tokenizer
        compute_imatrix(d, [tmp_path / "text.txt"])
    with pytest.raises(ImatrixError, match="no config.json"):
        compute_imatrix_tokens(tmp_path, _tiny_chunks())
    with pytest.raises(ImatrixError, match="outside the vocabulary"):
        compute_imatrix_tokens(d, _tiny_chunks() + 512)


# ------------------------------------------------------------------------------------ file format


def test_write_read_roundtrip_deterministic(tmp_path):
    d = get_tiny("tiny-qwen2-moe")
    chunks = _tiny_chunks()
    a = compute_imatrix_tokens(d, chunks, batch_tokens=256, progress=False, device="cpu", datasets=["x.txt"])
    b = compute_imatrix_tokens(d, chunks, batch_tokens=256, progress=False, device="cpu", datasets=["x.txt"])
    pa, pb = write_imatrix(a, tmp_path / "a.gguf"), write_imatrix(b, tmp_path / "b.gguf")
    assert pa.read_bytes() == pb.read_bytes()  # same input -> identical bytes
    back = read_imatrix(pa)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["x.txt"], 6, 128)
    _assert_same_stats(back, a, rtol=0)
    assert imatrix_bytes(back) == pa.read_bytes()
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away
    with pytest.raises(ImatrixError, match="non-finite"):
        e = next(iter(a.entries.values()))
        bad = dataclasses.replace(e, sums=np.full_like(e.sums, np.nan))
        write_imatrix(Imatrix(a.path, {"blk.0.x.weight": bad}, ["t"], 1, 1), tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.slow
def test_llama_imatrix_reads_and_rewrites_ours(tmp_path, llamacpp):
    """llama-imatrix loads our file (the extra in_sum tensors are ignored) and writes it back byte for byte
    equal to ours without in_sum; its legacy .dat export reads back to the same importance weights."""
    d = get_tiny("tiny-qwen2-moe")
    im = compute_imatrix_tokens(d, _tiny_chunks(), batch_tokens=256, progress=False, device="cpu",
                                datasets=["calib.txt"])
    ours = write_imatrix(im, tmp_path / "ours.gguf")
    plain = Imatrix(im.path, {k: dataclasses.replace(v, in_sum=None) for k, v in im.entries.items()},
                    im.datasets, im.chunk_count, im.chunk_size)
    ours_plain = write_imatrix(plain, tmp_path / "plain.gguf")
    # -m is required by the argument parser but no model is loaded when only combining files
    llamacpp.run("llama-imatrix", "-m", tmp_path / "unused.gguf", "-c", "128", "--in-file", ours,
                 "-o", tmp_path / "back.gguf")
    assert (tmp_path / "back.gguf").read_bytes() == ours_plain.read_bytes()
    llamacpp.run("llama-imatrix", "-m", tmp_path / "unused.gguf", "-c", "128", "--in-file", ours,
                 "-o", tmp_path / "legacy.dat", "--output-format", "dat")
    legacy = read_imatrix(tmp_path / "legacy.dat")
    assert legacy.is_legacy and legacy.chunk_count == 6 and set(legacy.entries) == set(im.entries)
    for n in im.entries:
        shape = (im.entries[n].n_per_row, 1, im.entries[n].n_mat)
        np.testing.assert_allclose(legacy.weights_for(n, shape), im.weights(n), rtol=1e-6, err_msg=n)


# ------------------------------------------------------------------------------------ against llama-imatrix


def _llama_imatrix_reference(llamacpp, fixture, text) -> Imatrix:
    """llama-imatrix's file for ``fixture`` on ``text`` (8 chunks of 512), cached by every input."""
    from quantmix.fixtures.store import fixture_key
    from quantmix.paths import cache_dir
    from quantmix.tools.llamacpp import SDIST_VERSION

    args = ["-c", str(N_CTX), "--chunks", str(N_CHUNKS), "--no-repack", "--no-ppl", "-t", "2"]
    h = hashlib.sha256()
    for part in (fixture.name, fixture_key(fixture.name), hashlib.sha256(text.read_bytes()).hexdigest(),
                 str(text), " ".join(args), SDIST_VERSION):
        h.update(part.encode() + b"\0")
    out = cache_dir() / "imatrix-ref" / f"{fixture.name}-{h.hexdigest()[:16]}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.gguf")
        proc = llamacpp.run("llama-imatrix", "-m", fixture.gguf_f32, "-f", text, *args, "-o", tmp, check=False)
        if proc.returncode != 0 or not tmp.exists():
            tmp.unlink(missing_ok=True)
            pytest.fail(f"llama-imatrix failed on {fixture.gguf_f32} (rc {proc.returncode}):\n"
                        f"{(proc.stdout + proc.stderr)[-1500:]}")
        tmp.replace(out)
    return read_imatrix(out)


@pytest.mark.slow
@pytest.mark.parametrize("fixture_name", ["smollm2-768", "smollm2-moe"])
def test_matches_llama_imatrix(fixture_name, llamacpp):
    """Same text, same chunking: the same tensors, per-tensor correlation of in_sum2/counts >= 0.99, dense
    counts identical, expert token counts within routing near-ties."""
    from quantmix.fixtures.store import get_fixture
    from quantmix.fixtures.text import text_path

    torch.set_num_threads(2)
    fx = get_fixture(fixture_name)
    text = text_path("wiki-calib")
    ref = _llama_imatrix_reference(llamacpp, fx, text)
    ours = compute_imatrix(fx.hf_dir, [text], n_ctx=N_CTX, max_chunks=N_CHUNKS, device="cpu", progress=False)
    assert set(ours.entries) == set(ref.entries)
    assert (ours.datasets, ours.chunk_count, ours.chunk_size) == (ref.datasets, ref.chunk_count, ref.chunk_size)
    worst = (1.0, "")
    for n, r in ref.entries.items():
        o = ours.entries[n]
        assert o.sums.shape == r.sums.shape, n
        if o.n_mat == 1:
            assert o.counts.tolist() == r.counts.tolist() == [N_CTX * N_CHUNKS], n
        else:
            assert o.counts.sum() == r.counts.sum(), n
            assert np.abs(o.counts - r.counts).max() <= 0.01 * r.counts.max(), (n, o.counts, r.counts)
        c = float(np.corrcoef(ours.weights(n).ravel().astype(np.float64),
                              ref.weights(n).ravel().astype(np.float64))[0, 1])
        assert math.isfinite(c), n
        worst = min(worst, (c, n))
    assert worst[0] >= 0.99, f"lowest correlation {worst[0]:.5f} for {worst[1]}"


@pytest.mark.slow
def test_streaming_memory_stays_bounded(monkeypatch):
    """Only one layer's weights are resident: the process's anonymous memory does not grow as layers stream
    through (each of smollm2-768's layers holds ~18 MB of float32 weights; 30 layers would add ~550 MB)."""
    import re

    import quantmix.model.engine as qe
    from quantmix.fixtures.store import get_fixture

    def anon_mb() -> float:
        status = open("/proc/self/status").read()
        return int(re.search(r"RssAnon:\s+(\d+)", status).group(1)) / 1024

    seen: list[float] = []
    release = qe.release

    def observed_release(module):
        release(module)
        seen.append(anon_mb())

    monkeypatch.setattr(qe, "release", observed_release)
    fx = get_fixture("smollm2-768")
    compute_imatrix_tokens(fx.hf_dir, torch.randint(0, 49152, (2, 128)), device="cpu", progress=False)
    assert len(seen) == 30  # every layer in turn
    growth = max(seen[4:]) - seen[4]
    assert growth < 40, f"resident memory grew by {growth:.0f} MB over 25 layers: {[round(x) for x in seen]}"


def test_imatrix_in_bfloat16_is_close_to_float32(tmp_path) -> None:  # noqa: ANN001
    """``quantmix imatrix --dtype bfloat16``: the same statistics to bfloat16's precision (a layer in half the
    device memory), a different file from float32's (the dtype is part of the job's identity)."""
    import subprocess
    import sys

    from quantmix.calibration.imatrix_io import read_imatrix

    out = {}
    for dt in ("float32", "bfloat16"):
        f = tmp_path / f"{dt}.imatrix.gguf"
        p = subprocess.run([sys.executable, "-m", "quantmix.cli", "imatrix", "tiny-qwen3-moe", "--chunks", "2",
                            "--ctx", "128", "--device", "cpu", "--dtype", dt, "-o", str(f), "--quiet"],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        out[dt] = read_imatrix(f)
    a, b = out["float32"], out["bfloat16"]
    assert sorted(a.entries) == sorted(b.entries)
    rels = []
    for n in a.entries:
        x, y = a.weights(n), b.weights(n)
        rels.append(float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)))
    # bfloat16 keeps 8 bits of mantissa: most entries agree to ~1%; an expert's entry moves more when a
    # token's routing flips between the two dtypes
    assert 0 < float(np.median(rels)) < 0.02 and max(rels) < 0.2, rels
