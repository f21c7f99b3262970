"""Simulated quantization: the HF model's weights become exactly what llama.cpp loads from the quantized GGUF.

Checked two ways: weight for weight against gguf-py's own dequantization of quantmix's GGUF (which the writer
tests prove identical to llama-quantize's), through the converter's q/k permutation (llama) and fused
experts (Qwen2-MoE, with a per-expert imatrix); and end to end, transformers perplexity of the simulated
model against llama-perplexity on the GGUF.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantmix.export.gguf_writer import quantize_gguf
from quantmix.export.simulate import SimulationError, permute_rows, simulate_quantization, unpermute_rows
from quantmix.formats.api import supported_types
from quantmix.model.catalog import catalog_from_gguf
from quantmix.paths import cache_dir, file_lock
from quantmix.planning.recipe import RecipeSpec, Rule, resolve

SUPPORT = Path(__file__).parent / "support" / "convert_no_vocab.py"


@pytest.fixture(scope="module")
def lc():
    from quantmix.tools.llamacpp import ensure_llamacpp

    return ensure_llamacpp()


def _converted_tiny(lc, name: str) -> Path:
    """llama.cpp's converter on a tiny random model (vocabulary skipped), cached as test_catalog caches it."""
    from quantmix.fixtures.tiny import get_tiny

    out = cache_dir() / "fixtures" / "tiny" / f"{name}.gguf"
    with file_lock(f"tiny-gguf-{name}"):
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            subprocess.run([sys.executable, str(SUPPORT), str(lc.root), str(get_tiny(name)), str(tmp)],
                           check=True, capture_output=True)
            tmp.replace(out)
    return out


def _synthetic_imatrix(cat, path: Path) -> Path:
    """An imatrix in llama-imatrix's GGUF format with seeded values; expert 1 never routed (count 0)."""
    import gguf

    rng = np.random.default_rng(11)
    w = gguf.GGUFWriter(str(path), arch="")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", 2)
    w.add_uint32("imatrix.chunk_size", 128)
    for t in cat:
        if t.quantizable and t.name not in ("token_embd.weight", "output.weight"):
            n_mat = t.shape[2] if len(t.shape) == 3 else 1
            counts = np.full((n_mat, 1), 256.0, dtype=np.float32)
            if n_mat > 1:
                counts[1, 0] = 0.0
            w.add_tensor(t.name + ".in_sum2", (rng.random((n_mat, t.shape[0]), dtype=np.float32) * 40.0))
            w.add_tensor(t.name + ".counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _plan(rules: list[tuple[str, str]]) -> list[Rule]:
    have = set(supported_types())
    return [Rule(p, t) for p, t in rules if t in have] + [Rule(".*", "F32")]


def test_permutation_round_trip() -> None:
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    p = permute_rows(w, 2)
    assert not torch.equal(p, w) and torch.equal(unpermute_rows(p, 2), w)
    # head 0 rows [0,1,2,3] (halves [0,1] and [2,3]) interleave to [0,2,1,3]
    assert p[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2-moe"])
def test_simulated_weights_equal_the_gguf(lc, tmp_path: Path, name: str) -> None:
    """Every simulated weight equals gguf-py's dequantization of quantmix's GGUF tensor, exactly."""
    import gguf
    from transformers import AutoModelForCausalLM

    from quantmix.fixtures.tiny import get_tiny

    src = _converted_tiny(lc, name)
    cat = catalog_from_gguf(src)
    rules = _plan([(r"attn_q\.", "Q4_K"), (r"attn_k\.", "Q5_K"), (r"attn_v\.", "Q6_K"), (r"attn_output", "Q3_K"),
                   (r"ffn_up_exps", "Q4_0"), (r"ffn_gate_exps", "IQ4_NL"), (r"ffn_down_exps", "Q2_K"),
                   (r"shexp", "IQ4_XS"), (r"ffn_up", "Q5_1"), (r"ffn_gate", "Q8_0"), (r"ffn_down", "Q4_1"),
                   (r"token_embd", "Q5_0"), (r"output\.", "F16")])
    imat = _synthetic_imatrix(cat, tmp_path / "imat.gguf") if "moe" in name else None
    res = resolve(cat, RecipeSpec(ftype=None, rules=rules), imatrix_present=imat is not None)
    out = quantize_gguf(src, res, tmp_path / "q.gguf", imatrix=imat, progress=False)

    model = AutoModelForCausalLM.from_pretrained(get_tiny(name), dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = simulate_quantization(model, res, imatrix=imat, device="cpu")
    params = dict(model.named_parameters())
    done = report.by_name()
    reader = gguf.GGUFReader(str(out))
    checked = set()
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert t.name in report.unchanged or t.name in report.not_in_model
            continue
        st = done[t.name]
        ref = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32))
        p = params[st.param].detach()
        if st.part is not None:
            p = p[:, st.part[0]:st.part[1]]
        if st.permuted_heads:
            p = permute_rows(p, st.permuted_heads)
        assert torch.equal(p.reshape(ref.shape), ref), t.name
        checked.add(st.param)
    assert len(report.tensors) == len(done) and report.n_weights > 0
    if name == "tiny-llama":
        assert {t.gguf_name for t in report.tensors if t.permuted_heads} == {
            f"blk.{i}.{k}.weight" for i in range(2) for k in ("attn_q", "attn_k")}
    else:
        assert any(t.part is not None and t.part[0] > 0 for t in report.tensors)  # up half of gate_up_proj
    for n, p in params.items():  # parameters without a quantized tensor are untouched
        if n not in checked:
            assert torch.equal(p.detach(), before[n]), n


def test_simulate_refuses_low_precision_models() -> None:
    from transformers import AutoModelForCausalLM

    from quantmix.fixtures.tiny import get_tiny
    from quantmix.model.catalog import catalog_from_config

    d = get_tiny("tiny-llama")
    cat = catalog_from_config(d)
    res = resolve(cat, RecipeSpec(ftype=None, rules=[Rule(".*", "Q8_0")]))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    with pytest.raises(SimulationError, match="float32"):
        simulate_quantization(model, res, device="cpu")


@pytest.mark.slow
def test_simulated_perplexity_matches_llama_perplexity(tmp_path: Path) -> None:
    """transformers perplexity of the simulated model vs llama-perplexity on quantmix's GGUF (same text,
    context, chunks). They cannot agree exactly: llama.cpp's CPU kernels quantize activations to 8 bits for
    quantized dot products. The gap must be a small part of the quantization's own effect."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmix.evaluation.perplexity import perplexity, run_llama_perplexity
    from quantmix.fixtures.store import get_fixture
    from quantmix.fixtures.text import text_path

    torch.set_num_threads(2)
    fx = get_fixture("smollm2-135m")
    rules = _plan([(r"attn_v", "Q4_0"), (r"blk\.[01]\.ffn_down", "Q3_K")])
    res = resolve(catalog_from_gguf(fx.gguf_f32), RecipeSpec(ftype=None, rules=rules))
    out = quantize_gguf(fx.gguf_f32, res, tmp_path / "q.gguf", progress=False)
    ctx, chunks = 256, 2
    raw = text_path("wiki-eval").read_text(encoding="utf-8")[:20_000]  # ~5k tokens, plenty for 2 chunks
    text = tmp_path / "eval.txt"
    text.write_text(raw, encoding="utf-8")
    llama_q = run_llama_perplexity(out, text, n_ctx=ctx, max_chunks=chunks)

    tok = AutoTokenizer.from_pretrained(fx.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(fx.hf_dir, dtype=torch.float32)
    hf_f32 = perplexity(model, tok, raw, n_ctx=ctx, max_chunks=chunks)
    simulate_quantization(model, res, device="cpu")
    hf_q = perplexity(model, tok, raw, n_ctx=ctx, max_chunks=chunks)

    assert hf_q.count == llama_q.count
    effect = abs(llama_q.nll - hf_f32.nll)
    print(f"ln PPL: f32 {hf_f32.nll:.5f}, simulated {hf_q.nll:.5f}, llama.cpp {llama_q.nll:.5f}")
    assert effect > 0.01, "the recipe should change perplexity measurably"
    assert abs(hf_q.nll - llama_q.nll) < 0.1 * effect
