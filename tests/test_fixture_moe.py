"""The smollm2-moe fixture and the activation hooks it is built with.

Fast tests check the clustering and the hooks' arithmetic; slow ones build the fixture (a few minutes,
cached) and check it against transformers and llama.cpp: conversion, loading, perplexity near the dense
model's, the two runtimes agreeing, expert usage that is uneven and depends on the text.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from quantmix.calibration.activations import ActivationStats, collect_activations, token_chunks
from quantmix.fixtures.smollm2_moe import LayerPlan, MoESpec, assemble, balanced_kmeans, plan_layer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
N_CTX = 512
CHUNKS = 4
MAX_PPL_RATIO = 1.5


# ---------------------------------------------------------------- fast

def test_balanced_kmeans_sizes_copies_and_seed() -> None:
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(4, 40, generator=g)
    f = centers.repeat_interleave(30, 0) + 0.3 * torch.randn(120, 40, generator=g)
    f = f / f.norm(dim=1, keepdim=True)
    m1 = balanced_kmeans(f, 4, 30, 1, 20, torch.Generator().manual_seed(0))
    assert m1.sum(1).tolist() == [30.0] * 4 and m1.sum(0).eq(1).all()
    # well separated groups are recovered: each cluster holds one true group
    assert sorted(int(m1[c].nonzero().min()) // 30 for c in range(4)) == [0, 1, 2, 3]
    for c in range(4):
        assert len({int(i) // 30 for i in m1[c].nonzero().flatten()}) == 1
    m2 = balanced_kmeans(f, 6, 40, 2, 20, torch.Generator().manual_seed(0))
    assert m2.sum(1).tolist() == [40.0] * 6 and m2.sum(0).eq(2).all()  # two copies, in distinct clusters
    assert torch.equal(m2, balanced_kmeans(f, 6, 40, 2, 20, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="cannot fill"):
        balanced_kmeans(f, 5, 30, 1, 5, torch.Generator().manual_seed(0))


def test_spec_rejects_bad_shapes() -> None:
    from quantmix.fixtures.store import FixtureError

    MoESpec().check(1536)
    with pytest.raises(FixtureError, match="intermediate size 1024"):
        MoESpec().check(1024)
    with pytest.raises(FixtureError, match="multiples of 256"):
        MoESpec(shared=128, expert=128, n_experts=22, copies=2).check(1536)


# ---------------------------------------------------------------- on the dense model

@pytest.fixture(scope="module")
def dense():  # noqa: ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmix.fixtures.store import get_fixture

    torch.set_num_threads(2)
    fx = get_fixture("smollm2-768")
    tok = AutoTokenizer.from_pretrained(fx.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(fx.hf_dir, dtype=torch.float32).eval()
    return fx, tok, model


def _ids(tok, name: str, n: int) -> list[int]:  # noqa: ANN001
    from quantmix.fixtures.text import read_text

    return tok(read_text(name)[: n * 8], add_special_tokens=False)["input_ids"][:n]


@pytest.mark.slow
def test_activation_stats_on_real_model(dense) -> None:  # noqa: ANN001
    _fx, tok, model = dense
    batches = token_chunks(_ids(tok, "wiki-eval", 256), 64, batch_size=2)
    st = collect_activations(model, batches, modules=["model.layers.1.*", "model.layers.2.mlp.*"],
                             keep_inputs=["model.layers.1.mlp.down_proj"])
    assert st.n_tokens == 256
    assert sorted(k for k in st.stats if k.startswith("model.layers.2.")) == [
        "model.layers.2.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    assert not any(k.startswith("model.layers.3.") for k in st.stats)
    q, k = st["model.layers.1.self_attn.q_proj.weight"], st["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(q.in_sum2, k.in_sum2) and torch.equal(q.in_sum, k.in_sum)  # same input
    down = st["model.layers.1.mlp.down_proj.weight"]
    assert down.counts.tolist() == [256.0] and down.in_sum2.shape == (1, 1536)
    kept = st.kept("model.layers.1.mlp.down_proj").double()
    assert kept.shape == (256, 1536)
    assert torch.allclose(down.in_sum2[0], (kept ** 2).sum(0), rtol=1e-10)
    assert torch.allclose(down.in_sum[0], kept.sum(0), rtol=1e-9, atol=1e-9)
    assert (down.mean_sq() > 0).all()
    # accumulating in two halves gives the same sums
    half = collect_activations(model, batches[:1], modules=["model.layers.1.mlp.down_proj"])
    collect_activations(model, batches[1:], modules=["model.layers.1.mlp.down_proj"], stats=half)
    assert torch.allclose(half["model.layers.1.mlp.down_proj.weight"].in_sum2, down.in_sum2, rtol=1e-12)
    merged = ActivationStats()
    merged.merge(half)
    assert merged.n_tokens == 256


@pytest.mark.slow
def test_assembly_is_function_preserving_with_all_experts(dense) -> None:  # noqa: ANN001
    """With every expert active and uniform weights the MoE must equal the dense model: this checks the
    padded attention heads, the shared-expert gate, the fused expert layout and the neuron copies."""
    _fx, tok, model = dense
    spec = MoESpec(top_k=10)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    plans = []
    for _ in range(model.config.num_hidden_layers):
        perm = torch.randperm(1536, generator=g)
        shared, rest = perm[:256], perm[256:]
        copies = torch.cat([rest, rest.roll(640)]).view(10, 256)  # each routed neuron in two experts
        plans.append(LayerPlan(shared, copies, torch.zeros(10, hidden, dtype=torch.float64), 10 / 2,
                               torch.zeros(1, hidden, dtype=torch.float64)))
    moe = assemble(model, plans, spec)
    ids = torch.tensor([_ids(tok, "wiki-eval", 48)])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = moe(input_ids=ids).logits
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()


@pytest.mark.slow
def test_layer_plan_is_seeded(dense) -> None:  # noqa: ANN001
    _fx, tok, model = dense
    st = collect_activations(model, token_chunks(_ids(tok, "wiki-calib", 512), 256), modules=[],
                             keep_inputs=["model.layers.4.mlp.gate_proj", "model.layers.4.mlp.down_proj"])
    x, a = st.kept("model.layers.4.mlp.gate_proj"), st.kept("model.layers.4.mlp.down_proj")
    w = model.model.layers[4].mlp.down_proj.weight
    p1 = plan_layer(x, a, w, MoESpec(), torch.Generator().manual_seed(7))
    p2 = plan_layer(x, a, w, MoESpec(), torch.Generator().manual_seed(7))
    assert torch.equal(p1.expert_idx, p2.expert_idx) and torch.equal(p1.router, p2.router)
    used = torch.cat([p1.shared_idx, p1.expert_idx.flatten()]).bincount(minlength=1536)
    assert used[p1.shared_idx].eq(1).all() and used.sum() == 256 + 10 * 256 and (used >= 1).all()


# ---------------------------------------------------------------- the built fixture

@pytest.fixture(scope="module")
def moe():  # noqa: ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmix.fixtures.store import get_fixture

    torch.set_num_threads(2)
    fx = get_fixture("smollm2-moe")
    tok = AutoTokenizer.from_pretrained(fx.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(fx.hf_dir, dtype=torch.float32).eval()
    return fx, tok, model


@pytest.mark.slow
def test_fixture_loads_offline_with_the_right_shape(moe) -> None:  # noqa: ANN001
    fx, _tok, model = moe
    cfg = model.config
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (10, 8, 256)
    assert cfg.shared_expert_intermediate_size % 256 == 0 and cfg.moe_intermediate_size % 256 == 0
    assert cfg.norm_topk_prob is False and cfg.tie_word_embeddings is False and cfg.mlp_only_layers == []
    assert cfg.decoder_sparse_step == 1 and cfg.num_attention_heads * 64 == cfg.hidden_size == 768
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert model.model.layers[3].mlp.experts.gate_up_proj.shape == (10, 512, 768)
    report = json.loads((fx.hf_dir / "moefication.json").read_text())
    assert len(report["layers"]) == 30


@pytest.mark.slow
def test_gguf_has_qwen2moe_expert_tensors(moe) -> None:  # noqa: ANN001
    import gguf

    fx, _tok, _model = moe
    r = gguf.GGUFReader(fx.gguf_f32)
    assert r.fields["general.architecture"].contents() == "qwen2moe"
    assert r.fields["qwen2moe.expert_count"].contents() == 10
    assert r.fields["qwen2moe.expert_used_count"].contents() == 8
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == [768, 256, 10]
    assert shapes["blk.0.ffn_up_exps.weight"] == [768, 256, 10]
    assert shapes["blk.0.ffn_down_exps.weight"] == [256, 768, 10]
    assert shapes["blk.0.ffn_gate_inp.weight"] == [768, 10]
    assert shapes["blk.29.ffn_down_shexp.weight"] == [256, 768]
    assert "blk.0.ffn_gate_inp_shexp.weight" in shapes and "output.weight" in shapes


@pytest.mark.slow
def test_perplexity_near_dense_and_llama_cpp_agrees(moe) -> None:  # noqa: ANN001
    from quantmix.evaluation.perplexity import perplexity, run_llama_perplexity
    from quantmix.fixtures.store import get_fixture
    from quantmix.fixtures.text import read_text, text_path

    fx, tok, model = moe
    wiki = text_path("wiki-eval")
    ours = perplexity(model, tok, read_text("wiki-eval"), n_ctx=N_CTX, max_chunks=CHUNKS)
    lcpp = run_llama_perplexity(fx.gguf_f32, wiki, n_ctx=N_CTX, max_chunks=CHUNKS)
    dense = run_llama_perplexity(get_fixture("smollm2-768").gguf_f32, wiki, n_ctx=N_CTX, max_chunks=CHUNKS)
    print(f"wiki-eval n_ctx={N_CTX} chunks={CHUNKS}: smollm2-768 {dense.ppl:.3f}; smollm2-moe transformers "
          f"{ours.ppl:.3f}, llama-perplexity {lcpp.ppl:.3f}")
    assert ours.count == lcpp.count
    # routing is discrete, so tiny float differences can flip a near-tied expert choice: allow 1%
    assert abs(ours.ppl / lcpp.ppl - 1) < 0.01
    assert dense.ppl < lcpp.ppl < MAX_PPL_RATIO * dense.ppl


@pytest.mark.slow
def test_expert_usage_is_uneven_and_input_dependent(moe) -> None:  # noqa: ANN001
    from quantmix.fixtures.smollm2_moe import expert_usage

    _fx, tok, model = moe
    n = 512
    wiki = expert_usage(model, token_chunks(_ids(tok, "wiki-eval", n), 512))
    jargon = expert_usage(model, token_chunks(_ids(tok, "jargon", n), 512))
    for use in (wiki, jargon):
        assert use.shape == (30, 10)
        assert torch.equal(use.sum(1), torch.full((30,), 8.0 * n))  # every token goes to exactly top_k experts
    share = wiki / n
    print("expert usage on wiki-eval (share of tokens per expert), per layer:")
    for i, row in enumerate(share):
        print(f"  layer {i:2d}: " + " ".join(f"{v:.2f}" for v in row.tolist()))
    spread = share.max(1).values - share.min(1).values
    assert (spread > 0.05).all(), f"usage too uniform in some layer: {spread}"
    # a different text routes differently
    diff = (wiki - jargon).abs().sum(1) / n
    assert diff.mean() > 0.05, f"routing barely depends on the text: {diff}"
    # within one text, tokens get different expert sets
    ids = torch.tensor([_ids(tok, "wiki-eval", 256)])
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    for layer, lg in enumerate(logits):
        sets = torch.topk(lg, 8, dim=-1).indices.sort(-1).values
        _, counts = sets.unique(dim=0, return_counts=True)
        assert counts.max() < 0.9 * 256 and len(counts) > 3, f"layer {layer}: routing hardly varies"
