"""Perplexity as llama-perplexity computes it: chunking rules, and agreement with the real tool."""

from __future__ import annotations

import math
import os

import pytest
import torch

from quantmix.evaluation.perplexity import (
    iter_scored_logits,
    make_chunks,
    perplexity,
    run_llama_perplexity,
    token_nll,
    tokenize_like_llamacpp,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
N_CTX = 512
CHUNKS = 4


def test_chunks_follow_llama_perplexity() -> None:
    toks = list(range(10, 10 + 3 * 64 + 17))  # 3 full chunks of 64 plus a tail
    c = make_chunks(toks, 64)
    assert c.shape == (3, 64)
    assert c[1, 0] == 10 + 64 and c[2, 63] == 10 + 3 * 64 - 1  # tail dropped, order kept
    assert make_chunks(toks, 64, max_chunks=2).shape == (2, 64)
    b = make_chunks(toks, 64, bos_id=1)
    assert (b[:, 0] == 1).all() and torch.equal(b[:, 1:], c[:, 1:])  # BOS overwrites each chunk's first token
    with pytest.raises(ValueError, match="at least 128 tokens"):
        make_chunks(toks[:100], 64)
    with pytest.raises(ValueError, match="even"):
        make_chunks(toks, 63)


def test_token_nll_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g)
    tgt = torch.randint(0, 50, (7,), generator=g)
    ref = torch.nn.functional.cross_entropy(logits.double(), tgt, reduction="none")
    assert torch.allclose(token_nll(logits, tgt), ref)


@pytest.fixture(scope="module")
def dense():  # noqa: ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmix.fixtures.store import get_fixture

    torch.set_num_threads(2)
    fx = get_fixture("smollm2-768")
    tok = AutoTokenizer.from_pretrained(fx.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(fx.hf_dir, dtype=torch.float32).eval()
    return fx, tok, model


@pytest.mark.slow
def test_scored_logits_match_full_forward(dense) -> None:  # noqa: ANN001
    """logits_to_keep must give the same logits as a full forward, at exactly the scored positions."""
    from quantmix.fixtures.text import read_text

    _fx, tok, model = dense
    ids, _ = tokenize_like_llamacpp(tok, read_text("wiki-eval")[:4000])
    chunks = make_chunks(ids, 64, max_chunks=2)
    got = list(iter_scored_logits(model, chunks, batch_size=2))
    assert [s.index for s in got] == [0, 1]
    with torch.no_grad():
        full = model(input_ids=chunks).logits
    for s in got:
        assert s.logits.shape == (64 - 32 - 1, full.shape[-1])
        assert torch.equal(s.targets, chunks[s.index, 33:])
        assert torch.allclose(s.logits, full[s.index, 32:63], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_perplexity_matches_llama_perplexity(dense) -> None:  # noqa: ANN001
    from quantmix.fixtures.text import read_text, text_path

    fx, tok, model = dense
    ours = perplexity(model, tok, read_text("wiki-eval"), n_ctx=N_CTX, max_chunks=CHUNKS)
    ref = run_llama_perplexity(fx.gguf_f32, text_path("wiki-eval"), n_ctx=N_CTX, max_chunks=CHUNKS)
    print(f"smollm2-768 wiki-eval n_ctx={N_CTX} chunks={CHUNKS}: ours {ours.ppl:.4f}, llama-perplexity {ref.ppl:.4f}")
    assert ours.count == ref.count == CHUNKS * (N_CTX // 2 - 1)
    assert 5 < ours.ppl < 200 and math.isclose(ours.nll, math.log(ours.ppl))
    assert abs(ours.ppl / ref.ppl - 1) < 0.005
