"""MLA (DeepSeek-V2/V3) as llama.cpp computes it: the absorbed attention (queries through attn_k_b into latent
space, attention over the latent, attn_v_b after) reproduces transformers' expanded attention, and llama.cpp's
activation rounding is applied to what attn_k_b / attn_v_b really multiply."""

from __future__ import annotations

import pytest
import torch

from quantmix.fixtures.tiny import get_tiny


def _model(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(get_tiny(name)), dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-v3"])
def test_absorbed_attention_equals_expanded(name: str) -> None:
    from quantmix.model.mla import absorbed_attention, mla_attention

    model = _model(name)
    ids = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(0))
    calls = []

    def around(call):  # noqa: ANN001, ANN202
        calls.append(call.name)
        return absorbed_attention(call), None

    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with mla_attention(model, around) as n:
            out = model(input_ids=ids).logits
        again = model(input_ids=ids).logits  # the context restored transformers' own path
    assert n == model.config.num_hidden_layers and len(calls) == n
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert torch.equal(again, ref)


def test_emulation_rounds_what_k_b_and_v_b_multiply() -> None:
    """With llama.cpp's CPU numerics, q_nope is rounded to attn_k_b's activation type and the weighted latent to
    attn_v_b's: Q8_0 (blocks of 32) for Q4_0 weights changes the logits; F32 weights leave them exact."""
    from quantmix.evaluation.llama_cpu import llama_cpu_activations
    from quantmix.export.simulate import tensor_targets

    model = _model("tiny-deepseek-v3")
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(1))
    names = list(tensor_targets(model))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        f32 = {n: "F32" for n in names}
        with llama_cpu_activations(model, f32) as mode:
            same = model(input_ids=ids).logits
        assert not mode.unseen()
        mla_only = dict(f32, **{n: "Q4_0" for n in names if n.endswith(("attn_k_b.weight", "attn_v_b.weight"))})
        assert len(mla_only) == len(f32) and sum(v == "Q4_0" for v in mla_only.values()) == 6
        with llama_cpu_activations(model, mla_only):
            rounded = model(input_ids=ids).logits
    assert (same - ref).abs().max() < 1e-4 * ref.abs().max()  # absorbed, unrounded: the same model
    d = (rounded - ref).abs().max() / ref.abs().max()
    assert 1e-5 < d < 0.05, d  # 8-bit activations: a small, real change
