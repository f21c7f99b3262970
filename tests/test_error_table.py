"""The per-tensor error table: equals a direct float64 quantize/dequantize computation, weighs experts by their
counts, caches and resumes exactly, recomputes on changed inputs, and feeds the planner."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantmix.calibration.imatrix_io import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from quantmix.export.gguf_writer import open_source
from quantmix.formats import dequantize, quantize
from quantmix.measurement.error_table import ErrorTable, error_table, load_costs
from quantmix.model.catalog import catalog_from_gguf
from quantmix.planning.budget import Budget
from quantmix.planning.solver import optimize
from quantmix.fixtures.tiny import get_tiny
from quantmix.paths import cache_dir

CANDS = ["Q4_0", "Q8_0", "Q4_K"]
MOE = "tiny-qwen2-moe"


SUPPORT = Path(__file__).parent / "support" / "convert_no_vocab.py"


@pytest.fixture(scope="module")
def gguf(llamacpp) -> Path:
    """llama.cpp's converter run on the tiny MoE (cached; the same file test_catalog.py makes)."""
    out = cache_dir() / "fixtures" / "tiny" / f"{MOE}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(SUPPORT), str(llamacpp.root), str(get_tiny(MOE)), str(tmp)],
                       check=True, capture_output=True)
        tmp.replace(out)
    return out


def _imatrix(gguf: Path, path: Path, seed: int = 0, in_sum: bool = True) -> Path:
    """Seeded synthetic statistics for every quantizable tensor; expert 1 of each expert tensor never routed."""
    rng = np.random.default_rng(seed)
    im = Imatrix(path, datasets=["synthetic"], chunk_count=4, chunk_size=64)
    for t in catalog_from_gguf(gguf):
        if not t.quantizable or t.name == "token_embd.weight":
            continue
        n_mat = t.shape[2] if len(t.shape) > 2 else 1
        counts = rng.integers(5, 200, size=n_mat).astype(np.int64)
        if n_mat > 1:
            counts[1] = 0
        sums = (rng.gamma(2.0, 1.0, size=(n_mat, t.shape[0])) * counts[:, None]).astype(np.float32)
        ins = (rng.normal(0.3, 1.0, size=(n_mat, t.shape[0])) * counts[:, None]).astype(np.float32) if in_sum else None
        im.entries[t.name] = ImatrixEntry(sums, counts, ins)
    write_imatrix(im, path)
    return path


def _rows(tab: ErrorTable) -> dict[tuple[str, str], object]:
    return {(r.tensor, r.type): r for r in tab.rows}


def _direct(x: np.ndarray, qtype: str, w: np.ndarray | None, a: np.ndarray | None) -> tuple[float, float]:
    """rel_err and bias_term in float64 through the bytes (quantize then dequantize)."""
    xt = torch.from_numpy(x)
    q = quantize(xt, qtype, None if w is None else torch.from_numpy(w))
    e = dequantize(q, qtype, x.shape[1]).double().numpy() - x.astype(np.float64)
    wd = np.ones(x.shape[1]) if w is None else w.astype(np.float64)
    ref = float((x.astype(np.float64) ** 2 @ wd).sum())
    rel = float((e ** 2 @ wd).sum()) / ref
    if a is None:
        return rel, 0.0
    ad = a.astype(np.float64)
    bias = float(((e @ (wd * ad)) ** 2).sum()) / float((wd * ad * ad).sum())
    return rel, bias / ref


def _weights(gguf: Path, name: str) -> np.ndarray:
    s = {t.name: t for t in open_source(gguf).tensors}[name]
    return s.data.view("<f4").reshape(tuple(reversed(s.shape))).astype(np.float32)


def test_matches_direct_and_expert_weighting(gguf: Path, tmp_path: Path) -> None:
    imp = _imatrix(gguf, tmp_path / "im.gguf")
    tab = error_table(gguf, imp, CANDS, device="cpu", cache=False, progress=False)
    assert tab.bias and "on" in tab.bias_note
    rows = _rows(tab)
    im = read_imatrix(imp)
    # (1) a 2-D tensor, with imatrix weights and mean activations
    name = "blk.0.ffn_down_shexp.weight"
    x = _weights(gguf, name)
    e = im.entries[name]
    for q in CANDS:
        rel, bias = _direct(x, q, im.weights(name)[0], e.in_sum[0] / np.float32(e.counts[0]))
        r = rows[(name, q)]
        assert r.rel_err == pytest.approx(rel, rel=1e-9) and r.bias_term == pytest.approx(bias, rel=1e-9)
        assert 0 < r.bias_term <= r.rel_err
    # token_embd has no imatrix entry: unweighted
    x = _weights(gguf, "token_embd.weight")
    assert rows[("token_embd.weight", "Q4_K")].rel_err == pytest.approx(_direct(x, "Q4_K", None, None)[0], rel=1e-9)
    # (2) routed experts: per expert with its own row, combined by counts; expert 1 (count 0) weighs nothing
    name = "blk.1.ffn_gate_exps.weight"
    x3 = _weights(gguf, name)  # [n_expert, rows, ne0]
    e = im.entries[name]
    w = im.weights(name)
    per = [_direct(x3[k], "Q4_0", w[k], e.in_sum[k] / np.float32(e.counts[k])) if e.counts[k] else (0.0, 0.0)
           for k in range(x3.shape[0])]
    c = e.counts.astype(np.float64)
    r = rows[(name, "Q4_0")]
    assert r.rel_err == pytest.approx(sum(c * [p[0] for p in per]) / c.sum(), rel=1e-9)
    assert r.bias_term == pytest.approx(sum(c * [p[1] for p in per]) / c.sum(), rel=1e-9)
    assert [x[0] for x in r.experts] == list(e.counts) and r.experts[1][1] == 0.0
    # the weighting matters: the plain mean of the routed experts differs
    assert r.rel_err != pytest.approx(np.mean([per[k][0] for k in (0, 2, 3)]), rel=1e-6)


def test_cache_resume_and_invalidation(gguf: Path, tmp_path: Path) -> None:
    imp = _imatrix(gguf, tmp_path / "im.gguf")
    cache = tmp_path / "cache"
    calls: list[tuple[str, str]] = []
    first = error_table(gguf, imp, CANDS, "cpu", cache_root=cache, progress=False, on_compute=lambda n, q: calls.append((n, q)))
    n_all = len(calls)
    assert n_all == len(first.rows) > 0
    # (3) second run recomputes nothing, identical table
    calls.clear()
    again = error_table(gguf, imp, CANDS, "cpu", cache_root=cache, progress=False, on_compute=lambda n, q: calls.append((n, q)))
    assert calls == [] and again.to_json() == first.to_json()
    # (4) interrupted mid-way, rerun: only the rest is computed, identical result
    cache2 = tmp_path / "cache2"

    class Stop(Exception):
        pass

    def stop_at_half(n: str, q: str) -> None:
        calls.append((n, q))
        if len(calls) > n_all // 2:
            raise Stop

    with pytest.raises(Stop):
        error_table(gguf, imp, CANDS, "cpu", cache_root=cache2, progress=False, on_compute=stop_at_half)
    calls.clear()
    resumed = error_table(gguf, imp, CANDS, "cpu", cache_root=cache2, progress=False,
                          on_compute=lambda n, q: calls.append((n, q)))
    assert len(calls) == n_all - n_all // 2 and resumed.to_json() == first.to_json()
    # (5a) a changed imatrix: every tensor with an entry is recomputed, token_embd (no entry) is not
    imp2 = _imatrix(gguf, tmp_path / "im2.gguf", seed=1)
    calls.clear()
    other = error_table(gguf, imp2, CANDS, "cpu", cache_root=cache, progress=False, on_compute=lambda n, q: calls.append((n, q)))
    names = {n for n, _ in calls}
    assert "token_embd.weight" not in names and "blk.0.attn_q.weight" in names
    assert len(calls) == n_all - sum(1 for r in first.rows if r.tensor == "token_embd.weight")
    assert other.to_json() != first.to_json()
    # (5b) changed tensor bytes (one value of one tensor): that tensor alone is recomputed
    g2 = tmp_path / "edited.gguf"
    shutil.copy(gguf, g2)
    s = {t.name: t for t in open_source(g2).tensors}["blk.1.attn_v.weight"]
    with open(g2, "r+b") as fh:
        fh.seek(s.file_offset + 40)
        fh.write(np.float32(0.123).tobytes())
    calls.clear()
    edited = error_table(g2, imp, CANDS, "cpu", cache_root=cache, progress=False, on_compute=lambda n, q: calls.append((n, q)))
    assert {n for n, _ in calls} == {"blk.1.attn_v.weight"} and len(calls) == len(CANDS)
    assert _rows(edited)[("blk.1.attn_v.weight", "Q4_0")].rel_err != _rows(first)[("blk.1.attn_v.weight", "Q4_0")].rel_err
    # (6) tensor hashes are remembered per file version: a warm run hashes no tensor; an edit in place (new
    # mtime / ctime) forgets them, and only the edited tensor's entries are measured again
    import quantmix.measurement.error_table as et

    hashed: list[int] = []
    real = et._hash_bytes
    monkey = pytest.MonkeyPatch()
    monkey.setattr(et, "_hash_bytes", lambda data, threads=None: hashed.append(data.size) or real(data, threads))
    monkey.setenv("QUANTMIX_CACHE", str(tmp_path / "qcache"))
    try:
        error_table(g2, imp, CANDS, "cpu", cache_root=cache, progress=False)
        n_tensors = len(hashed)
        assert n_tensors == len({r.tensor for r in first.rows})
        hashed.clear()
        calls.clear()
        warm = error_table(g2, imp, CANDS, "cpu", cache_root=cache, progress=False,
                           on_compute=lambda n, q: calls.append((n, q)))
        assert hashed == [] and calls == [] and warm.to_json() == edited.to_json()
        with open(g2, "r+b") as fh:
            fh.seek(s.file_offset + 44)
            fh.write(np.float32(0.5).tobytes())
        again2 = error_table(g2, imp, CANDS, "cpu", cache_root=cache, progress=False,
                             on_compute=lambda n, q: calls.append((n, q)))
        assert len(hashed) == n_tensors and {n for n, _ in calls} == {"blk.1.attn_v.weight"}
        assert again2.to_json() != edited.to_json()
    finally:
        monkey.undo()


def test_no_in_sum_and_planner(gguf: Path, tmp_path: Path) -> None:
    # (6) a mainline imatrix (no in_sum): bias off and said so
    imp = _imatrix(gguf, tmp_path / "im.gguf", in_sum=False)
    tab = error_table(gguf, imp, CANDS, "cpu", cache=False, progress=False)
    assert not tab.bias and "no in_sum" in tab.bias_note and all(r.bias_term == 0.0 for r in tab.rows)
    # save / load / load_costs round trip
    p = tab.save(tmp_path / "t.json")
    assert ErrorTable.load(p).to_json() == tab.to_json()
    costs = load_costs(p)
    assert costs == tab.to_costs()
    # more bits, less error, for every tensor
    for row in costs.values():
        assert row["Q8_0"] < row["Q4_0"]
    # (7) the planner runs on it and stays within budget
    cat = catalog_from_gguf(gguf)
    budget = Budget.of_bpw(cat, "6.0")
    plan = optimize(cat, costs, budget)
    assert plan.n_bytes <= budget.pools[0].capacity
    assert set(plan.types().values()) & {"Q4_0", "Q4_K"} and "Q8_0" in set(plan.types().values())


def test_codebook_types_on_cpu_use_ggml_with_equal_results(gguf: Path, tmp_path: Path) -> None:
    """On a CPU with llama.cpp built, the codebook types and the k-quants are measured by ggml's C (faster than
    the torch numerics there), IQ4_XS by torch (faster there): same bytes, so the same errors as the direct
    torch computation."""
    imp = _imatrix(gguf, tmp_path / "im.gguf")
    name = "blk.0.ffn_down_shexp.weight"
    tab = error_table(gguf, imp, ["IQ2_S", "IQ3_XXS", "Q4_K", "IQ4_XS"], device="cpu", cache=False, progress=False)
    rows = _rows(tab)
    im = read_imatrix(imp)
    e = im.entries[name]
    x = _weights(gguf, name)
    for q, backend in (("IQ2_S", "ggml"), ("IQ3_XXS", "ggml"), ("Q4_K", "ggml"), ("IQ4_XS", "torch")):
        r = rows[(name, q)]
        assert r.backend == backend
        rel, bias = _direct(x, q, im.weights(name)[0], e.in_sum[0] / np.float32(e.counts[0]))
        assert r.rel_err == pytest.approx(rel, rel=1e-9) and r.bias_term == pytest.approx(bias, rel=1e-9)
