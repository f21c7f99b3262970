"""`quantmix run` end to end on the default fixture: calibrate, measure, fit sensitivity, optimize + refine,
write the GGUF, evaluate it beside a stock mix on held-out text, write the report folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_run_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from quantmix.cli import main
    from quantmix.fixtures.store import get_fixture
    from quantmix.model.catalog import catalog_from_gguf
    from quantmix.model.gguf_header import read_gguf_header
    from quantmix.planning.recipe import load_recipe, resolve

    out = tmp_path / "out"
    argv = ["run", "smollm2-768", "--targets", "4.5", "-o", str(out), "--profile", "quick", "--refine-moves", "4",
            "--stock", "Q4_K_M", "--eval-chunks", "2", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Quant | Size | KL-div (quant, FP16) |" in printed
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["quant"], r["family"]) for r in rows] == [("quantmix-4.5bpw", "quantmix"), ("Q4_K_M", "stock")]
    ours, stock = rows
    cat = catalog_from_gguf(get_fixture("smollm2-768").gguf_f32)
    budget = int(4.5 * cat.n_elements / 8)
    plan = json.loads((out / "recipes" / "quantmix-4.5bpw.plan.json").read_text())
    assert ours["size_bytes"] == plan["bytes"] <= budget and budget - plan["bytes"] < 0.01 * budget
    res = resolve(cat, load_recipe(out / "recipes" / "quantmix-4.5bpw.txt"))
    assert res.n_bytes == plan["bytes"]  # the recipe file gives llama-quantize exactly the plan
    gguf = out / "gguf" / "smollm2-768-quantmix-4.5bpw.gguf"
    assert read_gguf_header(gguf).tensor_bytes == plan["bytes"]
    assert ours["kld"] > 0 and stock["kld"] > 0 and ours["predicted_kld"] > 0
    assert plan["predicted"].startswith("mean KLD") and plan["refinement"].startswith("refinement:")
    assert not plan["refinement"].startswith("refinement: 0 of 0 moves")  # at least one move was measured
    for f in ("README.md", "results.md", "pareto.png", "sensitivity.png", "sensitivity.md", "sensitivity.json"):
        assert (out / f).stat().st_size > 0, f
    card = (out / "README.md").read_text()
    assert "quantmix-4.5bpw" in card and "Q4_K_M" in card and "pareto.png" in card
    assert "KL-div" in card and "llama-quantize" in card
