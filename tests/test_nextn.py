"""GLM's NextN (multi-token prediction) layer in eval: run as llama.cpp's graph_mtp runs it, from the float
model's own layer N weights, quantized like every other tensor; the main KLD never depends on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantmix.fixtures.tiny import get_tiny

N_CTX = 128


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from quantmix.evaluation.reference import prepare_text
    from quantmix.fixtures.text import read_text
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    hf = get_tiny("tiny-glm4-moe", vocab=True)
    tok = AutoTokenizer.from_pretrained(str(hf))
    et = prepare_text(tok, read_text("wiki-eval")[:30_000], N_CTX, 3, label="wiki-eval")
    return hf, et


def _recipe(*rules: tuple[str, str]):  # noqa: ANN202
    from quantmix.planning.recipe import RecipeSpec, Rule

    return RecipeSpec(ftype=None, rules=[Rule(p, t) for p, t in rules])


def test_float_head_is_exact_and_nextn_is_measured_alone(setup) -> None:  # noqa: ANN001
    from quantmix.evaluation.evaluate import evaluate_tokens, recipe_source

    hf, et = setup
    kw = dict(device="cpu", act_quant="llama-cpu")
    f32 = evaluate_tokens(hf, recipe_source(_recipe((".*", "F32"))), et, **kw)
    assert f32.nextn is not None and f32.nextn.kld == 0.0 and f32.nextn.same_top_p == 1.0
    assert "nextn_kld" in f32.row() and f32.meta["nextn"].startswith("layer 3:")

    only_nextn = evaluate_tokens(hf, recipe_source(_recipe((r"blk\.3\.", "Q4_0"), (".*", "F32"))), et, **kw)
    assert only_nextn.stats.kld == 0.0  # off the next-token path: the main model is untouched
    assert only_nextn.nextn is not None and only_nextn.nextn.kld > 1e-4

    only_main = evaluate_tokens(hf, recipe_source(_recipe((r"blk\.3\.", "F32"), (".*", "Q4_0"))), et, **kw)
    assert only_main.stats.kld > 1e-3
    assert only_main.nextn is not None and only_main.nextn.kld > 0  # its input h_i moved with the main model


def test_gguf_and_recipe_agree_on_the_nextn_head(setup, llamacpp, tmp_path: Path) -> None:  # noqa: ANN001
    """The NextN tensors of a llama-quantize GGUF are loaded into the layer exactly as the simulated recipe
    quantizes them: the same NextN KLD from the file and from the recipe."""
    import subprocess

    from quantmix.evaluation.evaluate import evaluate_tokens, gguf_source, recipe_source
    from quantmix.job import resolve_model

    hf, et = setup
    inputs = resolve_model(hf)
    q = tmp_path / "q8.gguf"
    llamacpp.run("llama-quantize", inputs.gguf, q, "Q8_0", "2", stdin=subprocess.DEVNULL)
    kw = dict(device="cpu", act_quant="llama-cpu")
    from_file = evaluate_tokens(hf, gguf_source(q), et, **kw)
    from quantmix.planning.recipe import RecipeSpec

    from_recipe = evaluate_tokens(hf, recipe_source(RecipeSpec(ftype="Q8_0")), et, **kw)
    assert from_file.nextn is not None and from_recipe.nextn is not None
    assert from_file.nextn.kld == pytest.approx(from_recipe.nextn.kld, rel=1e-6)
    assert from_file.stats.kld == pytest.approx(from_recipe.stats.kld, rel=1e-6)


def test_sensitivity_measures_the_nextn_tensors_on_the_draft_head() -> None:
    """The NextN layer's tensors get measured coefficients (the draft head's KLD), not a proxy: zero for an
    unchanged tensor, positive for a quantized one, largest for what feeds the head directly."""
    from quantmix.calibration.imatrix import calibration_tokens
    from quantmix.fixtures.text import read_text
    from quantmix.measurement.kld_probe import KLDProbe
    from quantmix.measurement.nextn_probe import NextNProbe
    from transformers import AutoTokenizer

    hf = get_tiny("tiny-glm4-moe", vocab=True)
    ids = calibration_tokens(AutoTokenizer.from_pretrained(str(hf)), [read_text("wiki-calib")[:20_000]], 128, 2)
    nx = NextNProbe(KLDProbe(hf, ids, None, "cpu"))
    assert "blk.3.nextn.eh_proj.weight" in nx.tensor_names and "blk.3.ffn_down_exps.weight" in nx.tensor_names
    assert not [n for n in nx.tensor_names if not n.startswith("blk.3.")]
    assert nx.kld("blk.3.nextn.eh_proj.weight", "F32") == 0.0
    q4 = {n: nx.kld(n, "Q4_0") for n in ("blk.3.nextn.eh_proj.weight", "blk.3.nextn.shared_head_head.weight",
                                          "blk.3.attn_q.weight")}
    assert all(v > 0 for v in q4.values()), q4
    assert nx.kld("blk.3.nextn.eh_proj.weight", "Q8_0") < q4["blk.3.nextn.eh_proj.weight"]
