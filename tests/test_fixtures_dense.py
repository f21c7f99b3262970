"""Real test text and the dense SmolLM2 fixtures: split hygiene, determinism, exact function preservation
(transformers logits and llama.cpp perplexity), and the store's caching rules."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from quantmix.fixtures import text as qtext
from quantmix.fixtures.store import (
    GGUF_NAME, HF_SUBDIR, STAMP_NAME, FixtureError, fixture_key, get_fixture, register_fixture,
)

# ---------------------------------------------------------------- text


def test_wiki_split_by_article_70_30():
    arts = qtext.wiki_articles()
    man = qtext.manifest()
    calib, evl = man["wiki-calib"], man["wiki-eval"]
    assert not set(calib) & set(evl), "an article is in both splits"
    assert set(calib) | set(evl) == {t for t, _ in arts}
    assert len(arts) >= 90  # ~105 real articles after dropping redirects and stubs
    n_cal = len(qtext.read_text("wiki-calib"))
    n_eval = len(qtext.read_text("wiki-eval"))
    assert 0.67 < n_cal / (n_cal + n_eval) < 0.73
    assert 0.55 < len(calib) / len(arts) < 0.85
    # the files hold exactly their own articles: every article body lies in its own split only
    body = dict(arts)
    cal_text, eval_text = qtext.read_text("wiki-calib"), qtext.read_text("wiki-eval")
    for t in calib:
        assert body[t] in cal_text and body[t] not in eval_text, t
    for t in evl:
        assert body[t] in eval_text and body[t] not in cal_text, t


def test_wiki_text_is_clean():
    s = qtext.read_text("wiki-eval") + qtext.read_text("wiki-calib")
    for bad in ("{{", "}}", "[[", "]]", "'''", "<ref", "#REDIRECT", "  "):
        assert bad not in s, bad
    assert "\n\n\n" not in s
    assert re.search(r"\bthe\b", s)


def test_jargon_text():
    s = qtext.read_text("jargon")
    assert len(s) > 1_000_000
    assert "00-database" not in s and "hacker" in s and "/dev/null" in s
    assert "\n\n\n" not in s


def test_unknown_text_name():
    with pytest.raises(qtext.TextError, match="unknown text"):
        qtext.text_path("wiki-train")


def test_text_build_is_deterministic(tmp_path, monkeypatch):
    digests = []
    for sub in ("a", "b"):
        monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path / sub))
        digests.append({n: hashlib.sha256(qtext.text_path(n).read_bytes()).hexdigest() for n in qtext.NAMES})
        assert qtext.text_path("wiki-calib").is_relative_to(tmp_path / sub)
    assert digests[0] == digests[1]


# ---------------------------------------------------------------- store


def test_store_caches_rebuilds_and_cleans_up(tmp_path, monkeypatch):
    """A real (small) builder: built once, reused, rebuilt on a version change, nothing left by a failure."""
    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path))
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / HF_SUBDIR).mkdir()
        (out / HF_SUBDIR / "config.json").write_text(json.dumps({"n": len(calls)}))
        (out / GGUF_NAME).write_bytes(b"GGUF")

    register_fixture("test-store-dummy", build, version="1")
    f1 = get_fixture("test-store-dummy")
    f2 = get_fixture("test-store-dummy")
    assert len(calls) == 1 and f1 == f2 and f1.gguf_f32.read_bytes() == b"GGUF"
    assert (f1.hf_dir.parent / STAMP_NAME).read_text().strip() == fixture_key("test-store-dummy")
    register_fixture("test-store-dummy", build, version="2")
    get_fixture("test-store-dummy")
    assert len(calls) == 2 and json.loads((f1.hf_dir / "config.json").read_text()) == {"n": 2}
    get_fixture("test-store-dummy", rebuild=True)
    assert len(calls) == 3

    def broken(out: Path) -> None:
        raise ValueError("boom")

    register_fixture("test-store-broken", broken, version="1")
    with pytest.raises(ValueError, match="boom"):
        get_fixture("test-store-broken")
    assert not any(p.name.startswith(".test-store-broken") for p in (tmp_path / "fixtures").iterdir())
    assert not (tmp_path / "fixtures" / "test-store-broken").exists()
    with pytest.raises(FixtureError, match="unknown fixture"):
        get_fixture("no-such-fixture")


# ---------------------------------------------------------------- models (slow: built once, cached)


def _load(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    return tok, model


@pytest.mark.slow
def test_fixtures_load_offline_with_expected_shapes():
    from safetensors import safe_open

    small, wide = get_fixture("smollm2-135m"), get_fixture("smollm2-768")
    for fx in (small, wide):
        assert fx.gguf_f32.exists() and (fx.hf_dir / "tokenizer.json").exists()
    tok, model = _load(small.hf_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert tok("Hello world").input_ids == [19556, 905]
    with safe_open(small.hf_dir / "model.safetensors", "np") as f:
        assert "lm_head.weight" not in f.keys()
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == np.float32 and emb.shape == (49152, 576)
    assert len(np.unique(emb[:64])) > 0.99 * emb[:64].size  # continuous, not the Q8_0 grid
    cfg = json.loads((wide.hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["hidden_size"] == 768
    assert cfg["head_dim"] == 64 and cfg["num_attention_heads"] == 9 and not cfg["tie_word_embeddings"]
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5 * 576 / 768, rel=1e-6)
    with safe_open(wide.hf_dir / "model.safetensors", "np") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert f.get_tensor("lm_head.weight").shape == (49152, 768)
    assert q.shape == (576, 768)
    assert (np.abs(q).max(axis=0) > 0).all(), "a dead input column in the widened model"


@pytest.mark.slow
def test_135m_matches_original_gguf_through_llamacpp_converter():
    """llama.cpp's converter round trip of our weights lands within half a block scale of the Q4_1 original:
    q/k permutation, names and values all consistent with llama.cpp (noise is U(-d/2, d/2))."""
    import gguf

    from quantmix.fixtures.smollm2 import block_scales, smollm2_gguf

    orig = gguf.GGUFReader(smollm2_gguf())
    ours = {t.name: t for t in gguf.GGUFReader(get_fixture("smollm2-135m").gguf_f32).tensors}
    assert set(ours) == {t.name for t in orig.tensors}
    for t in orig.tensors:
        x = np.asarray(ours[t.name].data).reshape(-1, int(t.shape[0]))
        raw = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert np.array_equal(x.ravel(), raw.ravel()), t.name
            continue
        deq = gguf.quants.dequantize(raw, t.tensor_type)
        half = np.repeat(np.abs(block_scales(raw, t.tensor_type)), 32, axis=1) / 2
        err = np.abs(x - deq)
        assert (err <= half * (1 + 1e-6) + 1e-7).all(), t.name
        assert err.mean() > 0.2 * half.mean(), f"{t.name}: no noise added"


@pytest.mark.slow
def test_768_logits_equal_135m_on_real_text():
    import torch

    tok, small = _load(get_fixture("smollm2-135m").hf_dir)
    _, wide = _load(get_fixture("smollm2-768").hf_dir)
    ids = torch.tensor([tok(qtext.read_text("wiki-eval")[:8000]).input_ids[:384]])
    with torch.no_grad():
        a, b = small(ids).logits, wide(ids).logits
    rel = (a - b).abs().max().item() / a.abs().max().item()
    assert rel < 1e-4, rel
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def _llama_ppl(lc, model: Path, text: Path, chunks: int) -> tuple[float, list[float]]:
    proc = lc.run_until("llama-perplexity", "-m", model, "-f", text, "-c", "512", "--chunks", str(chunks),
                        "--no-repack", "-t", "2", done="Final estimate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    assert m, out[-2000:]
    running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+)", out)]
    return float(m.group(1)), running


@pytest.mark.slow
def test_llama_perplexity_equal_and_matches_transformers(llamacpp):
    import torch

    text = qtext.text_path("wiki-eval")
    small, wide = get_fixture("smollm2-135m"), get_fixture("smollm2-768")
    p_small, run_small = _llama_ppl(llamacpp, small.gguf_f32, text, 2)
    p_wide, _ = _llama_ppl(llamacpp, wide.gguf_f32, text, 2)
    assert abs(p_wide / p_small - 1) < 1e-3, (p_small, p_wide)
    # transformers scores the same tokens as llama-perplexity (second half of each 512-token chunk, no BOS)
    tok, model = _load(small.hf_dir)
    ids = tok(text.read_text()).input_ids
    nll, n = 0.0, 0
    with torch.no_grad():
        for c in range(2):
            x = torch.tensor([ids[c * 512:(c + 1) * 512]])
            lp = torch.log_softmax(model(x).logits[0].double(), -1)
            nll -= lp[256:511].gather(1, x[0, 257:, None]).sum().item()
            n += 255
    assert abs(math.exp(nll / n) / run_small[1] - 1) < 5e-3, (math.exp(nll / n), run_small[1])


@pytest.mark.slow
def test_builders_are_deterministic(tmp_path):
    from quantmix.fixtures.smollm2 import build_135m, build_768, safetensors_sha256

    build_768(tmp_path / "w")
    assert safetensors_sha256(tmp_path / "w" / HF_SUBDIR) == safetensors_sha256(get_fixture("smollm2-768").hf_dir)
    build_135m(tmp_path / "s")
    assert safetensors_sha256(tmp_path / "s" / HF_SUBDIR) == safetensors_sha256(get_fixture("smollm2-135m").hf_dir)
