"""Baselines: uniform and stock recipes cost exactly what ``quantmix size`` (and llama-quantize --dry-run) says;
the Lagrangian allocator of the target-bpw proposal never exceeds its budget, never beats the exact solver on
the same costs and budget, brackets the optimum with its dual bound, honours constraints and is deterministic.

Fast tests use config-only catalogs of real large models (tests/data/configs) and the tiny models (built from
configs in seconds); the tests on measured error tables and against llama-quantize are marked slow (they need
llama.cpp's converter and tools)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantmix import cli
from quantmix.formats.registry import get_type
from quantmix.model.catalog import Catalog, catalog_from_config, catalog_from_gguf
from quantmix.planning.baselines import (
    BENCH_FTYPES,
    BaselineError,
    baseline_plan,
    lagrangian_allocation,
    resolution_plan,
    stock_resolution,
    uniform_resolution,
)
from quantmix.planning.budget import Budget
from quantmix.planning.constraints import Constraints, parse_type_rule, tie_groups, type_rank
from quantmix.planning.llama_rules import shape_fallback
from quantmix.planning.recipe import resolve
from quantmix.planning.solver import InfeasibleBudget, optimize

CONFIGS = Path(__file__).parent / "data" / "configs"
SUPPORT = Path(__file__).parent / "support" / "convert_no_vocab.py"
TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "IQ3_S", "IQ4_XS", "IQ4_NL",
         "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")


def _config_catalog(name: str, tmp: Path) -> Catalog:
    d = tmp / name
    d.mkdir()
    shutil.copy(CONFIGS / f"{name}.json", d / "config.json")
    return catalog_from_config(d)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Catalog]]:
    """Real published configs (GLM-4.6, DeepSeek-V3, Qwen3-235B-A22B): 1,000-1,800 tensors, no weights."""
    out = {}
    for name in ("glm-4.6", "deepseek-v3", "qwen3-235b-a22b"):
        d = tmp_path_factory.mktemp(name)
        shutil.copy(CONFIGS / f"{name}.json", d / "config.json")
        out[name] = (d, catalog_from_config(d))
    return out


def seeded_costs(catalog: Catalog, seed: int = 0) -> dict[str, dict[str, float]]:
    """A seeded stand-in shaped like a measured table (for the config-only catalogs, which have no weights):
    per-tensor sensitivity x 2^(-2 bpw), with a per-type and per-tensor wobble so that hulls are not trivial.
    The measured tables are used in the slow tests below."""
    rng = random.Random(seed)
    wobble = {q: rng.uniform(0.8, 1.25) for q in TYPES}
    out = {}
    for t in catalog:
        if t.quantizable:
            s = rng.lognormvariate(0.0, 1.0)
            out[t.name] = {q: s * wobble[q] * rng.uniform(0.95, 1.05) * 2.0 ** (-2 * get_type(q).bits_per_weight())
                           for q in TYPES if get_type(q).fits_row(t.shape[0])}
    return out


def _size_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert cli.main(["size", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ uniform, stock


@pytest.mark.parametrize("name", ["glm-4.6", "deepseek-v3", "qwen3-235b-a22b"])
def test_uniform_and_stock_equal_quantmix_size(configs, capsys: pytest.CaptureFixture[str], name: str) -> None:
    d, cat = configs[name]
    for qtype in ("IQ2_XXS", "Q4_K", "Q8_0") if name != "glm-4.6" else ("IQ2_XXS", "Q2_K", "IQ4_XS", "Q4_K", "Q6_K"):
        res = uniform_resolution(cat, qtype)
        ref = _size_cli(capsys, str(d), "--tensor-type", f".*={qtype}")
        assert res.n_bytes == ref["bytes"]
        assert res.types() == {t["name"]: t["type"] for t in ref["tensors"]}
        for a in res.assignments:
            if a.tensor.quantizable:
                assert a.qtype == shape_fallback(qtype, a.tensor.shape[0])[0], a.tensor.name
            else:
                assert a.qtype == "F32", a.tensor.name
    for ftype in BENCH_FTYPES if name == "glm-4.6" else ("Q2_K", "Q4_K_M"):
        for imatrix in (False, True):
            res = stock_resolution(cat, ftype, imatrix)
            ref = _size_cli(capsys, str(d), "--ftype", ftype, *(["--imatrix"] if imatrix else []))
            assert res.n_bytes == ref["bytes"], (ftype, imatrix)
            assert res.types() == {t["name"]: t["type"] for t in ref["tensors"]}


def test_stock_mixes_grow_with_the_file_type(configs) -> None:
    _, cat = configs["glm-4.6"]
    sizes = [stock_resolution(cat, f).n_bytes for f in BENCH_FTYPES]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    # a stock mix is not uniform: Q4_K_M bumps attn_v / ffn_down / output above Q4_K
    assert stock_resolution(cat, "Q4_K_M").n_bytes > uniform_resolution(cat, "Q4_K").n_bytes
    assert stock_resolution(cat, "Q4_K").types() == stock_resolution(cat, "Q4_K_M").types()  # llama.cpp's alias


def test_uniform_falls_back_on_rows_that_do_not_fit(tmp_path: Path) -> None:
    import transformers

    # rows of 576 (SmolLM2-135M's hidden size): 256-block types fall back as llama.cpp does, 32-block ones fit
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                   num_key_value_heads=3, num_hidden_layers=2, vocab_size=512)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp_path)
    cat = catalog_from_config(tmp_path)
    res = uniform_resolution(cat, "Q4_K")
    assert res.fallbacks and {a.qtype for a in res.fallbacks} == {"Q5_0"}
    assert {a.requested for a in res.fallbacks} == {"Q4_K"}
    assert {a.qtype for a in uniform_resolution(cat, "IQ2_XXS").fallbacks} == {"IQ4_NL"}
    assert not uniform_resolution(cat, "Q4_0").fallbacks


def test_bad_names_are_clear_errors(configs) -> None:
    _, cat = configs["deepseek-v3"]
    with pytest.raises(BaselineError, match="Q9_K"):
        uniform_resolution(cat, "Q9_K")
    with pytest.raises(BaselineError, match="Q4_K_XL"):
        stock_resolution(cat, "Q4_K_XL")
    with pytest.raises(BaselineError, match="COPY"):
        stock_resolution(cat, "COPY")
    with pytest.raises(BaselineError, match="unknown baseline"):
        baseline_plan("evopress", cat)
    with pytest.raises(BaselineError, match="unknown baseline"):
        baseline_plan("uniform2:Q4_K", cat)
    with pytest.raises(BaselineError, match="uniform:Q4_K"):
        baseline_plan("uniform", cat)
    with pytest.raises(BaselineError, match="Q4_K_XL"):
        baseline_plan("stock:Q4_K_XL", cat)
    assert baseline_plan("q4_k_m", cat).types() == stock_resolution(cat, "Q4_K_M").types()
    with pytest.raises(BaselineError, match="cost table and a budget"):
        baseline_plan("lagrangian", cat)


def test_resolution_plans_round_trip(configs) -> None:
    _, cat = configs["qwen3-235b-a22b"]
    costs = seeded_costs(cat)
    for name, res in (("stock:Q3_K_M", stock_resolution(cat, "Q3_K_M", True)),
                      ("uniform:IQ4_XS", uniform_resolution(cat, "IQ4_XS"))):
        plan = baseline_plan(name, cat, costs=costs, imatrix_present=True)
        assert plan.types() == res.types() and plan.n_bytes == res.n_bytes
        assert plan.pools[0].used == res.n_bytes and plan.pools[0].left == 0
        assert plan.resolution().types() == res.types()  # its recipe gives back the same file
        assert resolution_plan(res, costs).objective == plan.objective
        assert plan.objective == pytest.approx(sum(costs[a.tensor.name][a.qtype] for a in res.assignments
                                                   if a.tensor.quantizable), rel=1e-12)
    # against a smaller budget, usage is reported, not refused
    small = Budget.of_size(stock_resolution(cat, "Q2_K").n_bytes)
    plan = baseline_plan("stock:Q4_K_M", cat, small)
    assert plan.pools[0].left < 0 and any("exceeds" in n for n in plan.notes)


# ------------------------------------------------------------------------------------------- Lagrangian


@pytest.mark.parametrize("name,bpw", [("glm-4.6", "2.1"), ("glm-4.6", "4.25"), ("deepseek-v3", "3.0"),
                                      ("qwen3-235b-a22b", "6.0")])
def test_lagrangian_within_budget_and_never_beats_exact(configs, name: str, bpw: str) -> None:
    _, cat = configs[name]
    costs = seeded_costs(cat)
    budget = Budget.of_bpw(cat, bpw)
    lag = lagrangian_allocation(cat, costs, budget)
    exact = optimize(cat, costs, budget, time_limit=60)
    assert exact.status == "optimal"
    cap = budget.pools[0].capacity
    assert lag.n_bytes <= cap and lag.pools[0].used == lag.n_bytes and lag.pools[0].left >= 0
    assert resolve(cat, lag.to_spec()).n_bytes == lag.n_bytes  # llama-quantize writes exactly this
    assert lag.resolution().types() == lag.types()
    # exact <= Lagrangian, and the Lagrangian dual bound <= exact
    assert exact.objective <= lag.objective * (1 + 1e-9)
    assert lag.bound <= exact.objective * (1 + 1e-9)
    assert 0.0 <= lag.gap < 1e-2
    assert lag.method == "lagrangian" and lag.status == "feasible"
    assert lag.pools[0].left >= exact.pools[0].left  # typically leaves more bytes unused
    assert lag.predicted_cost == pytest.approx(sum(costs[n][q] for n, q in lag.types().items() if n in costs))


def test_lagrangian_is_deterministic(configs) -> None:
    _, cat = configs["glm-4.6"]
    costs = seeded_costs(cat, seed=3)
    budget = Budget.of_bpw(cat, "3.5")
    a = lagrangian_allocation(cat, costs, budget)
    b = lagrangian_allocation(cat, dict(reversed(list(costs.items()))), budget)
    assert a.types() == b.types() and a.objective == b.objective and a.bound == b.bound
    assert [t.name for t in a.tensors] == [t.name for t in cat]


def test_lagrangian_on_small_catalogs_is_bracketed_by_the_exact_optimum() -> None:
    """Many random cost tables on a tiny model: always feasible, never below the exact optimum, and the
    dual bound never above it."""
    from quantmix.fixtures.tiny import get_tiny

    cat = catalog_from_config(get_tiny("tiny-glm4-moe"))
    lo = uniform_resolution(cat, "IQ1_S").n_bytes
    hi = uniform_resolution(cat, "Q8_0").n_bytes
    rng = random.Random(7)
    worse = 0
    for seed in range(12):
        costs = seeded_costs(cat, seed)
        budget = Budget.of_size(rng.randint(lo + (hi - lo) // 10, hi))
        lag = lagrangian_allocation(cat, costs, budget)
        exact = optimize(cat, costs, budget)
        assert lag.n_bytes <= budget.pools[0].capacity
        assert exact.objective <= lag.objective * (1 + 1e-9)
        assert lag.bound <= exact.objective * (1 + 1e-9)
        worse += lag.objective > exact.objective * (1 + 1e-9)
    assert worse > 0  # the baseline is not the exact solver under another name


def test_lagrangian_honours_constraints(configs) -> None:
    _, cat = configs["glm-4.6"]
    costs = seeded_costs(cat, seed=1)
    c = Constraints(pins=[parse_type_rule(r"blk\.3\.attn_v=Q8_0", "--pin 1")],
                    mins=[parse_type_rule(r"\.attn_=Q6_K", "--min 1")],
                    maxs=[parse_type_rule(r"ffn_down_exps=Q4_K", "--max 1")],
                    ties=[(r"ffn_(gate|up)_exps", "--tie 1")],
                    weights=[(r"\.ffn_down_exps\.", 3.0, "--weight 1")])
    budget = Budget.of_bpw(cat, "2.6")
    lag = lagrangian_allocation(cat, costs, budget, c)
    types = lag.types()
    assert lag.n_bytes <= budget.pools[0].capacity
    assert types["blk.3.attn_v.weight"] == "Q8_0"
    for n, q in types.items():
        if re.search(r"\.attn_", n) and n in costs and n != "blk.3.attn_v.weight":
            assert type_rank(q) >= type_rank("Q6_K"), n
        if "ffn_down_exps" in n:
            assert type_rank(q) <= type_rank("Q4_K"), n
    for g in tie_groups(cat, c):
        assert len({types[n] for n in g}) == 1, g
    exact = optimize(cat, costs, budget, c)
    assert exact.objective <= lag.objective * (1 + 1e-9)  # weighted objectives, same problem


def test_lagrangian_budget_errors(configs) -> None:
    _, cat = configs["deepseek-v3"]
    costs = seeded_costs(cat)
    smallest = uniform_resolution(cat, "IQ1_S").n_bytes
    with pytest.raises(InfeasibleBudget, match="smallest feasible"):
        lagrangian_allocation(cat, costs, Budget.of_size(smallest // 2))
    two = Budget.of_memory(cat, "96GiB", 8192, "q8_0", ram="512GiB")
    with pytest.raises(BaselineError, match="single pool"):
        lagrangian_allocation(cat, costs, two)
    # a budget above everything at Q8_0 takes the best option everywhere
    rich = lagrangian_allocation(cat, costs, Budget.of_size(10 * uniform_resolution(cat, "Q8_0").n_bytes))
    assert set(q for n, q in rich.types().items() if n in costs) == {"Q8_0"}
    assert rich.gap == 0.0


# ------------------------------------------------------------------------------ slow: real tools, real errors


@pytest.fixture(scope="module")
def moe_gguf(llamacpp) -> Path:
    """llama.cpp's converter run on the tiny MoE (cached; the same file test_error_table.py makes)."""
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.paths import cache_dir

    out = cache_dir() / "fixtures" / "tiny" / "tiny-qwen2-moe.gguf"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(SUPPORT), str(llamacpp.root), str(get_tiny("tiny-qwen2-moe")), str(tmp)],
                       check=True, capture_output=True)
        tmp.replace(out)
    return out


@pytest.mark.slow
def test_lagrangian_on_a_measured_error_table(moe_gguf: Path) -> None:
    from quantmix.measurement.error_table import error_table

    cands = ["Q2_K", "Q3_K", "IQ4_NL", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0"]
    costs = error_table(moe_gguf, None, cands, "cpu", progress=False).to_costs()
    cat = catalog_from_gguf(moe_gguf)
    strictly_worse = 0
    for bpw in ("2.9", "3.3", "4.0", "4.7", "5.5", "6.5"):
        budget = Budget.of_bpw(cat, bpw)
        lag = lagrangian_allocation(cat, costs, budget)
        exact = optimize(cat, costs, budget)
        assert lag.n_bytes <= budget.pools[0].capacity, bpw
        assert exact.objective <= lag.objective * (1 + 1e-9), bpw
        assert lag.bound <= exact.objective * (1 + 1e-9), bpw
        assert lag.resolution().types() == lag.types()
        again = lagrangian_allocation(cat, costs, budget)
        assert again.types() == lag.types() and again.objective == lag.objective
        strictly_worse += lag.objective > exact.objective * (1 + 1e-9)
    assert strictly_worse >= 1


def _dry_run_types(llamacpp, gguf: Path, ftype: str, *args: str) -> dict[str, str]:
    proc = llamacpp.run("llama-quantize", "--dry-run", *args, gguf, ftype, "1", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =\s*[\d.]+ MiB"
                      r"(?: ->\s*[\d.]+ MiB \((\S+)\))?\s*$")
    out = {}
    for ln in (proc.stderr + proc.stdout).splitlines():
        m = line.match(ln)
        if m:
            out[m[1]] = (m[3] or m[2]).upper()
    assert out, "llama-quantize --dry-run printed no tensor lines"
    return out


@pytest.mark.slow
def test_uniform_and_stock_match_llama_quantize_dry_run(llamacpp) -> None:
    """SmolLM2-135M (hidden 576: 256-block types fall back), as llama-quantize itself types it."""
    from quantmix.fixtures.store import get_fixture

    gguf = get_fixture("smollm2-135m").gguf_f32
    cat = catalog_from_gguf(gguf)
    for qtype, ftype in (("Q4_K", "Q4_K_M"), ("Q6_K", "Q6_K"), ("IQ4_XS", "IQ4_XS"), ("Q8_0", "Q8_0")):
        assert uniform_resolution(cat, qtype).types() == _dry_run_types(llamacpp, gguf, ftype, "--pure"), qtype
    for ftype in BENCH_FTYPES:
        assert stock_resolution(cat, ftype).types() == _dry_run_types(llamacpp, gguf, ftype), ftype
