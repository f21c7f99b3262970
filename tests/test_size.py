"""Exact size accounting: quantmix's bytes equal, tensor for tensor, the data llama-quantize writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quantmix.model.catalog import catalog_from_config, catalog_from_gguf
from quantmix.model.gguf_header import read_gguf_header
from quantmix.planning.recipe import RecipeSpec, load_recipe, parse_rule, parse_shorthand, resolve, write_recipe
from quantmix.planning.size import format_size, size_report

pytestmark = pytest.mark.slow


def _quantize(llamacpp, src: Path, out: Path, ftype: str, *extra: str) -> dict[str, tuple[str, int]]:
    llamacpp.run("llama-quantize", *extra, src, out, ftype)
    h = read_gguf_header(out)
    types = {t.name: (t.type_name, t.n_bytes) for t in h.tensors}
    out.unlink()
    return types


def _check(res, written: dict[str, tuple[str, int]]) -> None:
    ours = {a.tensor.name: (a.qtype, a.n_bytes) for a in res.assignments}
    assert ours == written
    assert size_report(res).n_bytes == sum(b for _, b in written.values())


def test_ftype_mix_with_fallbacks_135m(llamacpp, tmp_path: Path) -> None:
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture("smollm2-135m")
    res = resolve(catalog_from_config(fx.hf_dir), RecipeSpec(ftype="Q4_K_M"))
    assert res.fallbacks, "576-wide rows must fall back from 256-block types"
    _check(res, _quantize(llamacpp, fx.gguf_f32, tmp_path / "q.gguf", "Q4_K_M"))


def test_ftype_with_rules_768(llamacpp, tmp_path: Path) -> None:
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture("smollm2-768")
    rules = [parse_rule("ffn_down=q6_k", "t"), parse_rule("blk\\.1[0-9]\\.attn_v=q8_0", "t")]
    res = resolve(catalog_from_config(fx.hf_dir), RecipeSpec(ftype="Q3_K_M", rules=rules))
    written = _quantize(llamacpp, fx.gguf_f32, tmp_path / "q.gguf", "Q3_K_M",
                        "--tensor-type", "ffn_down=q6_k", "--tensor-type", "blk\\.1[0-9]\\.attn_v=q8_0")
    _check(res, written)


def test_written_recipe_is_applied_verbatim(llamacpp, tmp_path: Path) -> None:
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture("smollm2-768")
    cat = catalog_from_gguf(fx.gguf_f32)
    spec = RecipeSpec(rules=[parse_rule(r, "t") for r in (
        "attn_q=q4_k", "attn_k=q5_k", "attn_v=q6_k", "attn_output=iq4_xs", "ffn_down=q3_k", "ffn_gate=iq4_xs",
        "ffn_up=q2_k", "token_embd=q8_0", "output=q5_1", ".*=q4_0")])
    res = resolve(cat, spec)
    recipe = write_recipe(res, tmp_path / "recipe.txt")
    assert resolve(cat, load_recipe(recipe)).types() == res.types()
    _check(res, _quantize(llamacpp, fx.gguf_f32, tmp_path / "q.gguf", "Q8_0", "--tensor-type-file", recipe))


def test_shorthand_on_moe(llamacpp, tmp_path: Path) -> None:
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture("smollm2-moe")
    res = resolve(catalog_from_config(fx.hf_dir), parse_shorthand("Q6_K-Q4_K-Q4_K-Q5_K"))
    recipe = write_recipe(res, tmp_path / "recipe.txt")
    _check(res, _quantize(llamacpp, fx.gguf_f32, tmp_path / "q.gguf", "Q8_0", "--tensor-type-file", recipe))


def test_cli_size_from_config_and_gguf(tmp_path: Path) -> None:
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture("smollm2-768")
    cfg = tmp_path / "config.json"
    cfg.write_text((fx.hf_dir / "config.json").read_text())
    cmd = [sys.executable, "-m", "quantmix.cli", "size"]
    out = subprocess.run(cmd + [str(cfg), "--ftype", "Q4_K_M"], capture_output=True, text=True, check=True).stdout
    res = resolve(catalog_from_config(cfg), RecipeSpec(ftype="Q4_K_M"))
    r = size_report(res)
    assert f"size: {format_size(r.n_bytes, r.total.n_elements)}" in out
    # a GGUF alone is costed as stored, and that equals its tensor data
    out = subprocess.run(cmd + [str(fx.gguf_f32)], capture_output=True, text=True, check=True).stdout
    h = read_gguf_header(fx.gguf_f32)
    n_el = sum(t.n_elements for t in catalog_from_gguf(fx.gguf_f32))
    assert format_size(h.tensor_bytes, n_el) in out
    assert abs(float(format_size(h.tensor_bytes, n_el).split("(")[1].split()[0]) - 32.0) < 1e-9
    bad = subprocess.run(cmd + [str(cfg), "--mix", "Q6_K-IQ2_S"], capture_output=True, text=True)
    assert bad.returncode != 0 and "four types" in bad.stderr
