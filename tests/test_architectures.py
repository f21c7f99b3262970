"""Every architecture our users quantize, end to end from a Hugging Face directory and an EMPTY cache.

For each tiny model (built in code, seeded, a real transformers config class, a tokenizer that llama.cpp's
converter accepts for the architecture), from a cache that holds nothing but llama.cpp's source and build:
the directory is converted by llama.cpp's own converter; the catalog made from config.json alone equals the
converter's output tensor for tensor; imatrix, the error table, the sensitivity fit and the exact knapsack
run; quantmix's GGUF is byte-identical to what llama-quantize writes for the same recipe and imatrix, and its
size is the bytes llama-quantize writes; eval of the unquantized float GGUF gives KLD ~0, and eval of the
quantized one agrees with llama-perplexity --kl-divergence on the same file and text.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantmix.fixtures.tiny import TINY_CONFIGS, get_tiny

pytestmark = pytest.mark.slow

N_CTX = 128
EVAL_CHUNKS = 6
IMATRIX_CHUNKS = 4
CANDIDATES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K")
# refinement (measured-KLD moves) on one model of each attention family; the others stop at the knapsack
REFINE = {"tiny-llama": 4, "tiny-deepseek-v3": 4, "tiny-gemma2": 4, "tiny-gpt-oss": 4}  # refinement moves


class _Steps:
    """Wall time of each step; with ``QUANTMIX_ARCH_REPORT=FILE`` (bench/architectures.py) one JSON line per
    architecture is appended there: step times, which step failed, the KLD parity figures."""

    def __init__(self, name: str) -> None:
        self.row: dict = {"arch": name, "steps": {}, "failed": None}

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        except BaseException:
            self.row["failed"] = label
            raise
        finally:
            self.row["steps"][label] = round(time.time() - t0, 1)

    def write(self) -> None:
        out = os.environ.get("QUANTMIX_ARCH_REPORT")
        if out:
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(self.row) + "\n")


@pytest.fixture(scope="module")
def empty_cache(tmp_path_factory: pytest.TempPathFactory, llamacpp) -> Path:  # noqa: ANN001
    """A QUANTMIX_CACHE with nothing in it but llama.cpp (linked: its 6-minute build is not a model's cache)."""
    root = tmp_path_factory.mktemp("empty-cache")
    (root / "src").symlink_to(llamacpp.root.parents[2], target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("QUANTMIX_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def eval_text(empty_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantmix.fixtures.text import read_text

    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(read_text("wiki-eval")[:40_000], encoding="utf-8")
    return p


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_architecture_end_to_end(empty_cache: Path, eval_text: Path, llamacpp, tmp_path: Path,  # noqa: ANN001
                                 name: str) -> None:
    st = _Steps(name)
    try:
        _pipeline(st, name, empty_cache, eval_text, llamacpp, tmp_path)
    finally:
        st.write()


def _pipeline(st: _Steps, name: str, empty_cache: Path, eval_text: Path, llamacpp, tmp_path: Path) -> None:  # noqa: ANN001
    from quantmix.calibration.imatrix import compute_imatrix
    from quantmix.calibration.imatrix_io import write_imatrix
    from quantmix.evaluation.evaluate import evaluate, gguf_source
    from quantmix.evaluation.kld import run_llama_kld
    from quantmix.export.gguf_writer import quantize_gguf
    from quantmix.fixtures.text import text_path
    from quantmix.job import measure, plan_recipe, resolve_model
    from quantmix.model.catalog import catalog_from_config, catalog_from_gguf
    from quantmix.model.gguf_header import read_gguf_header
    from quantmix.planning.budget import Budget
    from quantmix.planning.constraints import Constraints
    from quantmix.planning.recipe import write_recipe
    from quantmix.planning.size import size_report

    with st.step("build"):
        hf = get_tiny(name, vocab=True)
    with st.step("convert"):
        inputs = resolve_model(hf)  # llama.cpp's converter, into the empty cache
        assert inputs.gguf.parent == empty_cache / "converted" and inputs.hf_dir == hf

    with st.step("catalog"):
        cfg_only = tmp_path / "config-only"
        cfg_only.mkdir()
        shutil.copy(hf / "config.json", cfg_only / "config.json")
        cat, conv = catalog_from_config(cfg_only / "config.json"), catalog_from_gguf(inputs.gguf)
        assert {t.name: t.shape for t in cat} == {t.name: t.shape for t in conv}
        assert (cat.hparams.arch, cat.hparams.n_layer) == (conv.hparams.arch, conv.hparams.n_layer)

    with st.step("imatrix"):
        im_path = tmp_path / "imatrix.gguf"
        im = compute_imatrix(hf, [text_path("wiki-calib")], n_ctx=N_CTX, max_chunks=IMATRIX_CHUNKS, device="cpu",
                             progress=False)
        write_imatrix(im, im_path)
        assert im.entries
    with st.step("llama-imatrix"):
        st.row["imatrix_corr"] = _imatrix_parity(name, im, inputs.gguf, text_path("wiki-calib"), llamacpp, tmp_path)

    with st.step("optimize"):
        m = measure(inputs, im_path, CANDIDATES, profile="quick", device="cpu", progress=False,
                    sensitivity_chunks=1)  # one chunk of 512 tokens: the probes' cost is the 49k-token head
        assert m.sensitivity is not None and all(v >= 0 for v in m.sensitivity.probe_kld.values())
        oc = plan_recipe(m, Budget.of_bpw(m.catalog, 5.0), Constraints(imatrix=True),
                         refine_time=60.0 if name in REFINE else 0.0, refine_moves=REFINE.get(name),
                         device="cpu", progress=False)
        res = oc.plan.resolution()
        assert len({a.qtype for a in res.assignments if a.tensor.quantizable}) > 1  # a mix, not one type

    with st.step("quantize"):
        ours = quantize_gguf(inputs.gguf, res, tmp_path / "ours.gguf", imatrix=im_path, device="cpu",
                             progress=False)
    with st.step("llama-quantize"):
        recipe = write_recipe(res, tmp_path / "recipe.txt")
        theirs = tmp_path / "theirs.gguf"
        llamacpp.run("llama-quantize", "--imatrix", im_path, "--tensor-type-file", recipe, inputs.gguf, theirs,
                     "Q8_0", "2", stdin=subprocess.DEVNULL)
        assert read_gguf_header(theirs).tensor_bytes == size_report(res).n_bytes == oc.plan.n_bytes
        assert filecmp.cmp(ours, theirs, shallow=False), f"{name}: quantmix's GGUF differs from llama-quantize's"

    with st.step("eval"):
        f32 = evaluate(hf, gguf_source(inputs.gguf, label="f32"), eval_text, N_CTX, EVAL_CHUNKS, device="cpu")
        assert f32.stats.kld < 1e-5 and f32.stats.same_top_p > 0.999, f"{name}: the float GGUF does not load exactly"
        q = evaluate(hf, gguf_source(ours, label="quantmix"), eval_text, N_CTX, EVAL_CHUNKS, device="cpu")
    with st.step("llama-perplexity"):
        (ll,) = run_llama_kld(inputs.gguf, [ours], eval_text, N_CTX, EVAL_CHUNKS, extra_args=("-fa", "off"))
    st.row.update(kld=q.stats.kld, kld_llama=ll.kld, ppl_base=q.stats.ppl_base, ppl_base_llama=ll.ppl_base,
                  f32_kld=f32.stats.kld, predicted=oc.plan.objective, bpw=oc.plan.bpw)
    print(f"{name}: KLD quantmix eval {q.stats.kld:.5f}, llama-perplexity {ll.kld:.5f} "
          f"({q.stats.kld / ll.kld - 1:+.2%}); predicted {oc.plan.objective:.5f}; PPL(base) {q.stats.ppl_base:.4g} vs "
          f"{ll.ppl_base:.4g}, same top p {q.stats.same_top_p:.3f} vs {ll.same_top_p:.3f}")
    with st.step("kld-parity"):
        assert q.stats.kld > 1e-4
        assert abs(q.stats.kld / ll.kld - 1) < 0.05, f"{name}: quantmix eval {q.stats.kld} vs llama {ll.kld}"


def _imatrix_parity(name: str, ours, gguf: Path, text: Path, llamacpp, tmp_path: Path) -> float:  # noqa: ANN001
    """llama-imatrix on the converter's GGUF, same text and chunks: the same entries (MLA's absorbed attn_k_b /
    attn_v_b and gpt-oss's experts included), dense counts equal, expert counts within routing near-ties, and the
    importance weights of every entry correlated >= 0.99. Returns the lowest correlation."""
    import numpy as np

    from quantmix.calibration.imatrix_io import read_imatrix

    ref_path = tmp_path / "llama-imatrix.gguf"
    llamacpp.run("llama-imatrix", "-m", gguf, "-f", text, "-c", str(N_CTX), "--chunks", str(IMATRIX_CHUNKS),
                 "--no-ppl", "-t", "2", "-o", ref_path, stdin=subprocess.DEVNULL)
    ref = read_imatrix(ref_path)
    assert set(ours.entries) == set(ref.entries), (name, set(ours.entries) ^ set(ref.entries))
    worst = (1.0, "")
    for n, r in ref.entries.items():
        o = ours.entries[n]
        assert o.sums.shape == r.sums.shape, (name, n, o.sums.shape, r.sums.shape)
        if "_exps." in n:
            assert o.counts.sum() == r.counts.sum(), (name, n)
            # tokens whose top-k experts are a near tie on a random model go either way: 1% of the routings
            assert np.abs(o.counts - r.counts).max() <= 0.01 * r.counts.sum(), (name, n, o.counts, r.counts)
        else:
            assert o.counts.tolist() == r.counts.tolist() == [N_CTX * IMATRIX_CHUNKS], (name, n)
        c = float(np.corrcoef(ours.weights(n).ravel().astype(np.float64), ref.weights(n).ravel().astype(np.float64))[0, 1])
        worst = min(worst, (c, n))
    assert worst[0] >= 0.99, f"{name}: lowest imatrix correlation with llama-imatrix {worst[0]:.5f} for {worst[1]}"
    return worst[0]


def test_cli_from_a_fresh_cache(llamacpp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                capsys: pytest.CaptureFixture) -> None:
    """What a new user types first, on a machine whose cache holds nothing but llama.cpp: optimize a Hugging
    Face directory without an imatrix (the types that need one are left out, and the plan says so)."""
    from quantmix.cli import main

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "src").symlink_to(llamacpp.root.parents[2], target_is_directory=True)
    monkeypatch.setenv("QUANTMIX_CACHE", str(cache))
    hf = get_tiny("tiny-qwen3", vocab=True)
    out = tmp_path / "out" / "recipe.txt"
    assert main(["optimize", str(hf), "--target-bpw", "6", "--types", "Q4_0,Q8_0,Q4_K,Q6_K,IQ2_XS", "--sensitivity",
                 "none", "-o", str(out), "--quiet"]) == 0
    plan = json.loads(out.with_suffix(".plan.json").read_text())
    assert any("no --imatrix" in n for n in plan["notes"])
    types = {t["name"]: t["type"] for t in plan["tensors"]}
    exempt = ("token_embd.weight", "output.weight")  # llama-quantize quantizes these without an imatrix
    assert not [n for n, q in types.items() if q == "IQ2_XS" and n not in exempt]
    assert len(set(types.values()) & {"Q4_0", "Q8_0", "Q4_K", "Q6_K"}) > 1
    assert list((cache / "converted").glob(f"{hf.name}-*-f32.gguf"))
