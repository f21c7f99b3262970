"""Recipe parsing and the one resolver: llama.cpp's matching semantics, errors that name the line."""

from pathlib import Path

import pytest

from quantmix.fixtures.tiny import get_tiny
from quantmix.model.catalog import catalog_from_config
from quantmix.planning.recipe import (
    RecipeError, RecipeSpec, load_recipe, parse_custom_q, parse_rule, parse_shorthand, resolve, write_recipe,
)
from quantmix.planning.size import size_report


@pytest.fixture(scope="module")
def moe():
    return catalog_from_config(get_tiny("tiny-qwen2-moe"))


@pytest.fixture(scope="module")
def glm():
    return catalog_from_config(get_tiny("tiny-glm4-moe"))


def _types(res):
    return res.types()


def test_first_match_wins_and_pattern_lowercased(tmp_path: Path, moe) -> None:
    f = tmp_path / "r.txt"
    f.write_text("FFN_DOWN_EXPS=q5_k  ffn_down=q3_k\nffn=q4_k\n.*=Q8_0\n")
    types = _types(resolve(moe, load_recipe(f)))
    assert types["blk.0.ffn_down_exps.weight"] == "Q5_K"  # upper-case pattern still matches (lower-cased)
    assert types["blk.0.ffn_down_shexp.weight"] == "Q3_K"  # 'ffn_down' matched before 'ffn'
    assert types["blk.0.ffn_up_exps.weight"] == "Q4_K"
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms are never quantized, whatever the rules say
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # router stays F32


@pytest.mark.parametrize("text,where,what", [
    ("attn_q=q4_k\nffn_down\n", ":2", "expected PATTERN=TYPE"),
    ("attn_q=q4_k\n\n=q4_k\n", ":3", "no pattern"),
    ("attn_q=\n", ":1", "no type"),
    ("attn_q=q4_kk\n", ":1", "unknown type 'q4_kk'"),
    ("attn_q=q4_k ffn_(down=q4_k\n", ":1", "not a valid regex"),
    ("", "", "no rules"),
])
def test_malformed_recipe_names_line(tmp_path: Path, text: str, where: str, what: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert f"{f}{where}" in str(e.value) and what in str(e.value)


def test_uncovered_tensor_without_ftype_is_an_error(moe) -> None:
    spec = RecipeSpec(rules=[parse_rule("attn=q4_k", "test")])
    with pytest.raises(RecipeError, match="no rule matches tensor .*catch-all"):
        resolve(moe, spec)
    # with a file type, unmatched tensors follow its mix
    res = resolve(moe, RecipeSpec(ftype="Q4_K_M", rules=spec.rules))
    assert res.types()["blk.0.attn_q.weight"] == "Q4_K"


def test_shorthand(glm) -> None:
    spec = parse_shorthand("q6_k-IQ2_S-IQ2_S-IQ3_S")
    types = resolve(glm, spec).types()
    assert types["blk.1.ffn_up_exps.weight"] == "IQ2_S"
    assert types["blk.1.ffn_gate_exps.weight"] == "IQ2_S"
    assert types["blk.1.ffn_down_exps.weight"] == "IQ3_S"
    for name in ("blk.1.ffn_down_shexp.weight", "blk.0.ffn_down.weight", "token_embd.weight", "output.weight",
                 "blk.3.nextn.eh_proj.weight", "blk.0.attn_v.weight"):
        assert types[name] == "Q6_K", name
    with pytest.raises(RecipeError, match="four types"):
        parse_shorthand("Q6_K-IQ2_S-IQ3_S")
    with pytest.raises(RecipeError, match="unknown type"):
        parse_shorthand("Q6_K-IQ2_S-IQ2_Q-IQ3_S")


def test_ik_custom_q_is_case_sensitive_and_costs_ik_types(moe) -> None:
    rules = parse_custom_q("FFN_DOWN_EXPS=iq4_ks,ffn_.*_exps=iq2_ks,.*=q8_0")
    res = resolve(moe, RecipeSpec(rules=rules, dialect="ik"))
    types = res.types()
    assert types["blk.0.ffn_down_exps.weight"] == "IQ2_KS"  # upper-case pattern does not match in ik
    t = next(a for a in res.assignments if a.tensor.name == "blk.0.ffn_down_exps.weight")
    ne0, ne1, ne2 = t.tensor.shape
    assert t.n_bytes == ne1 * ne2 * (2 + 70 * ne0 // 256)  # IQ2_KS: 2 bytes of row scale per row
    with pytest.raises(RecipeError, match="item 2"):
        parse_custom_q("a=q8_0,b")


def test_shape_fallback_is_applied_and_reported() -> None:
    # tiny-llama is 256 wide but its rows of 512... use a 576-wide config: the 135m fixture's shape class
    cat = catalog_from_config(get_tiny("tiny-llama"))
    res = resolve(cat, RecipeSpec(rules=[parse_rule(".*=IQ4_XS", "t")]))
    assert not res.fallbacks  # 256 and 512 rows fit 256-blocks


def test_written_recipe_reproduces_resolution(tmp_path: Path, glm) -> None:
    res = resolve(glm, RecipeSpec(ftype="Q3_K_M"), imatrix_present=True)
    for dialect in ("llama", "ik"):
        f = write_recipe(res, tmp_path / f"r-{dialect}.txt", dialect)
        again = resolve(glm, load_recipe(f))
        assert again.types() == res.types()
        assert size_report(again).n_bytes == size_report(res).n_bytes


def test_published_ik_recipe_with_comments(tmp_path: Path, glm) -> None:
    """ik_llama.cpp recipes as quant makers publish them: one rule per line, # comments, ik-only types."""
    f = tmp_path / "ik.recipe"
    f.write_text(
        "# Attention\n"
        "blk\\..*\\.attn_.*=iq6_k\n"
        "# Shared experts and dense layers\n"
        "blk\\..*\\.ffn_(gate|up|down)_shexp\\.weight=iq6_k\n"
        "blk\\.0\\.ffn_.*=iq6_k   # first dense layer\n"
        "# Routed experts\n"
        "blk\\..*\\.ffn_down_exps\\.weight=iq3_ks,blk\\..*\\.ffn_(gate|up)_exps\\.weight=iq2_kl\n"
        "token_embd\\.weight=iq4_k\n"
        "output\\.weight=iq6_k\n"
        ".*=iq5_ks\n"
    )
    spec = load_recipe(f)
    assert spec.dialect == "ik" and len(spec.rules) == 8
    res = resolve(glm, spec)
    types = res.types()
    assert types["blk.1.ffn_down_exps.weight"] == "IQ3_KS"
    assert types["blk.1.ffn_up_exps.weight"] == "IQ2_KL"
    assert types["blk.0.attn_q.weight"] == "IQ6_K"
    t = next(a for a in res.assignments if a.tensor.name == "blk.1.ffn_down_exps.weight")
    ne0, ne1, ne2 = t.tensor.shape
    assert t.n_bytes == ne1 * ne2 * (2 + 102 * ne0 // 256)
    bad = tmp_path / "bad.recipe"
    bad.write_text("# c\nattn=iq6_k\nffn_down=iq9_k\n")
    with pytest.raises(RecipeError, match=r"bad.recipe:3.*unknown type 'iq9_k'"):
        load_recipe(bad)
