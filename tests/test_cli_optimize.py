"""`quantmix optimize` end to end on a tiny MoE GGUF: error table -> exact solver -> recipes that resolve to
the plan's bytes, never over budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from quantmix.model.catalog import catalog_from_gguf
from quantmix.planning.recipe import load_recipe, resolve
from quantmix.planning.size import size_report
from test_catalog import _converted_tiny


def test_optimize_writes_recipes_within_budget(llamacpp, tmp_path: Path) -> None:
    src = _converted_tiny(llamacpp, "tiny-qwen2-moe")
    out = tmp_path / "recipe.txt"
    cmd = [sys.executable, "-m", "quantmix.cli", "optimize", str(src), "--target-bpw", "5.0", "-o", str(out),
           "--types", "Q4_0,Q4_K,Q6_K,Q8_0", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "optimal" in proc.stdout and "gap 0.00e+00" in proc.stdout
    cat = catalog_from_gguf(src)
    plan = json.loads(out.with_suffix(".plan.json").read_text())
    budget = int(5.0 * cat.n_elements / 8)
    for recipe in (out, Path(str(out) + ".ik")):
        res = resolve(cat, load_recipe(recipe))
        assert size_report(res).n_bytes == plan["bytes"] <= budget
        assert {a.tensor.name: a.qtype for a in res.assignments} == {t["name"]: t["type"] for t in plan["tensors"]}
    bad = subprocess.run(cmd[:5] + ["--target-bpw", "1.0", "-o", str(out), "--types", "Q4_0", "--quiet"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "smallest feasible" in bad.stderr.lower()


def test_optimize_types_all_measures_codebook_types_with_ggml(llamacpp, tmp_path: Path) -> None:
    """`--types all` on a CPU adds the codebook types (measured by ggml's C there); without an imatrix only
    IQ3_S of them is admissible (llama-quantize's rule)."""
    src = _converted_tiny(llamacpp, "tiny-qwen2-moe")
    out = tmp_path / "recipe.txt"
    proc = subprocess.run([sys.executable, "-m", "quantmix.cli", "optimize", str(src), "--target-bpw", "3.6",
                           "-o", str(out), "--types", "all", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ggml's own quantizer" in proc.stderr
    types = {t["type"] for t in json.loads(out.with_suffix(".plan.json").read_text())["tensors"]}
    assert not types & {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}
