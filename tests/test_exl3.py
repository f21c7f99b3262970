"""EXL3 on the CPU: exllamav3's storage layout and bytes, the linears of real checkpoints, the exact plan within
bpw / byte / VRAM budgets, and the recipe exllamav3's convert.py reads. (The numerics are exllamav3's own and run
on a GPU: bench/exl3_device.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantmix.fixtures.tiny import build_tiny
from quantmix.formats.exl3 import RATES, Exl3Error, linear_bytes, parse_rate, read_exl3_dir
from quantmix.formats.exl3 import exl3_model
from quantmix.measurement.exl3_measure import Measurement, read_measurement, write_measurement
from quantmix.planning.exl3_plan import (exl3_cache_bytes, parse_kv_cache, plan_exl3,
                                         read_exl3_recipe, write_exl3_recipe)
from quantmix.planning.solver import Group, Option, Problem, solve_dp


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in ("tiny-llama", "tiny-glm4-moe"):
        d = tmp_path_factory.mktemp(name)
        build_tiny(name, d, seed=0)
        out[name] = d
    return out


def _measurement(model_dir: Path) -> Measurement:
    """Costs with the shape of a rate-distortion curve (error ~ |W|^2 2^(-2r)), scaled per linear by its norm."""
    from safetensors import safe_open
    costs = {}
    m = exl3_model(model_dir)
    norms = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for n in fh.keys():
                if n.endswith(".weight"):
                    norms[n[:-7]] = float(fh.get_tensor(n).double().pow(2).sum())
    for lin in m.budgeted():
        w = norms[lin.key] * (1 + (hash(lin.key) % 7) / 10)
        costs[lin.key] = {r: w * 2.0 ** (-2 * r) for r in RATES}
    return Measurement(costs, {"kind": "test curve"})


def test_rates_and_bytes() -> None:
    assert parse_rate("2.5") == 2.5 and parse_rate(4) == 4 and parse_rate("16") == 16
    for bad in ("9", "2.25", "x", "0"):
        with pytest.raises(Exl3Error):
            parse_rate(bad)
    # trellis 256x512 at 4 bpw: 16x32 tiles x 64 int16 words; suh 256, svh 512 fp16; mul1 marker
    assert linear_bytes(256, 512, 4) == 16 * 32 * 64 * 2 + 2 * 256 + 2 * 512 + 4
    assert linear_bytes(256, 512, 2.5) == 16 * 32 * 40 * 2 + 2 * 768 + 4
    assert linear_bytes(256, 512, 16) == 2 * 256 * 512
    with pytest.raises(Exl3Error, match="tile"):
        linear_bytes(250, 512, 4)
    with pytest.raises(Exl3Error, match="mul1"):
        linear_bytes(256, 512, 3.5, codebook="mcg")


def _write_exl3_dir(d: Path, rates: dict[str, tuple[int, int, float]], *, bad: str | None = None) -> None:
    tensors = {}
    for key, (k, n, rate) in rates.items():
        words = round(16 * rate)
        tensors[f"{key}.trellis"] = torch.zeros(k // 16, n // 16, words, dtype=torch.int16)
        tensors[f"{key}.suh"] = torch.ones(k, dtype=torch.float16)
        tensors[f"{key}.svh"] = torch.ones(n if bad != "svh" else n + 1, dtype=torch.float16)
        tensors[f"{key}.mul1"] = torch.tensor(0, dtype=torch.int32)
    tensors["model.norm.weight"] = torch.ones(256, dtype=torch.float16)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "quantization_config": {
        "quant_method": "exl3", "version": "1.6.5", "bits": 3.0, "head_bits": 6, "codebook": "mul1"}}))


def test_read_exl3_dir(tmp_path: Path) -> None:
    layout = {"model.layers.0.self_attn.q_proj": (256, 256, 2.5), "model.layers.0.mlp.down_proj": (512, 256, 4),
              "lm_head": (256, 512, 6)}
    _write_exl3_dir(tmp_path, layout)
    qc, linears = read_exl3_dir(tmp_path)
    assert qc["quant_method"] == "exl3"
    got = {s.key: (s.in_features, s.out_features, s.rate, s.n_bytes, s.codebook) for s in linears}
    for key, (k, n, rate) in layout.items():
        assert got[key] == (k, n, rate, linear_bytes(k, n, rate), "mul1"), key
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_exl3_dir(bad, layout, bad="svh")
    with pytest.raises(Exl3Error, match=r"svh must be fp16 \["):
        read_exl3_dir(bad)


def test_fixture_from_exllamav3() -> None:
    """Tensors exllamav3 1.6.5 itself wrote on an H100 (bench/exl3_device.py): the layout read here is theirs."""
    f = Path(__file__).parent / "data" / "exl3-fixture.safetensors"
    if not f.exists():
        pytest.skip("no exllamav3 fixture checked in")
    from safetensors import safe_open
    with safe_open(str(f), "pt") as fh:
        keys = set(fh.keys())
        w = fh.get_tensor("weight")
        for rate in (2, 3.5, 4):
            tr = fh.get_tensor(f"k{rate}.trellis")
            assert tr.dtype == torch.int16 and tuple(tr.shape) == (w.shape[0] // 16, w.shape[1] // 16, round(16 * rate))
            n = sum(fh.get_tensor(f"k{rate}.{s}").numel() * fh.get_tensor(f"k{rate}.{s}").element_size()
                    for s in ("trellis", "suh", "svh", "mul1") if f"k{rate}.{s}" in keys)
            assert n == linear_bytes(w.shape[0], w.shape[1], rate)
            err = (fh.get_tensor(f"k{rate}.weight_q") - w).pow(2).sum() / w.pow(2).sum()
            assert 0 < float(err) < 2.0 ** (-1.5 * rate) * 4


def test_model_linears(tiny_dirs: dict[str, Path]) -> None:
    m = exl3_model(tiny_dirs["tiny-llama"])
    keys = {lin.key: lin for lin in m.linears}
    assert "lm_head" in keys and keys["lm_head"].role == "head_bits"  # tied: exllamav3 writes one
    q = keys["model.layers.0.self_attn.q_proj"]
    assert (q.in_features, q.out_features, q.role) == (256, 256, "bits")
    assert len(m.budgeted()) == 2 * 7
    g = exl3_model(tiny_dirs["tiny-glm4-moe"])
    roles = {lin.role for lin in g.linears}
    assert roles == {"bits", "head_bits", "mtp_bits", "fp16"}, roles
    assert all(lin.key.endswith("mlp.gate") for lin in g.linears if lin.role == "fp16")
    assert any(".experts.3.down_proj" in lin.key for lin in g.budgeted())


def test_measurement_roundtrip(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    meas = _measurement(tiny_dirs["tiny-llama"])
    p = write_measurement(tmp_path / "m.json", meas)
    again = read_measurement(p)
    assert again.costs == meas.costs
    assert write_measurement(tmp_path / "m2.json", again).read_bytes() == p.read_bytes()
    doc = json.loads(p.read_text())
    doc["linears"][next(iter(doc["linears"]))]["cost"]["2"] = "nan"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(Exl3Error, match="bad.json: linear .*rate 2"):
        read_measurement(tmp_path / "bad.json")


def _brute(model, meas, capacity_bits: int) -> float:
    groups = [Group((lin.key,), [Option((str(r),), (round(lin.numel * r),), (0,), meas.costs[lin.key][r],
                                        (RATES.index(r),)) for r in RATES]) for lin in model.budgeted()]
    return solve_dp(Problem(("bits",), (capacity_bits,), groups)).objective


@pytest.mark.parametrize("bpw", [2.0, 3.3, 4.75, 6.0])
def test_plan_bpw_exact(tiny_dirs: dict[str, Path], bpw: float) -> None:
    d = tiny_dirs["tiny-llama"]
    m, meas = exl3_model(d), _measurement(d)
    plan = plan_exl3(m, meas, target_bpw=bpw)
    assert plan.bpw <= bpw + 1e-12
    assert set(plan.rates.values()) <= set(RATES)
    # the exact optimum: the dynamic program over the same choices finds no cheaper plan
    cap = math.floor(bpw * sum(lin.numel for lin in m.budgeted()))
    assert plan.cost <= _brute(m, meas, cap) * (1 + 1e-9)
    # and no greedy upgrade-only allocator beats it: a uniform plan at floor(bpw) costs at least as much
    uniform = max(r for r in RATES if r <= bpw)
    assert plan.cost <= sum(c[uniform] for c in meas.costs.values()) + 1e-12


def test_plan_vram_and_recipe(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    d = tiny_dirs["tiny-glm4-moe"]
    m, meas = exl3_model(d), _measurement(d)
    cfg = json.loads((d / "config.json").read_text())
    fp16 = exl3_cache_bytes(cfg, 1000, 16, 16)
    k6v5 = exl3_cache_bytes(cfg, 1000, *parse_kv_cache("k6v5"))
    dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    assert fp16 == cfg["num_hidden_layers"] * 1024 * 4 * dim
    assert k6v5 == cfg["num_hidden_layers"] * 1024 * (dim * 11 // 8 + 4 * (dim // 32))
    lin_bytes = sum(lin.n_bytes(16 if lin.role == "fp16" else 6 if lin.role == "head_bits" else 4)
                    for lin in m.linears)
    vram = lin_bytes + m.other_vram_bytes + k6v5 + 512 * 2**20
    plan = plan_exl3(m, meas, vram=vram, ctx=1000, kv_cache="k6v5")
    used = plan.n_bytes + m.other_vram_bytes + k6v5 + 512 * 2**20
    assert used <= vram
    assert plan.cost <= sum(meas.costs[lin.key][4] for lin in m.budgeted()) + 1e-12
    assert all(plan.rates[lin.key] == 4 for lin in m.linears if lin.role == "mtp_bits")
    with pytest.raises(Exl3Error, match="too small"):
        plan_exl3(m, meas, vram=k6v5, ctx=1000, kv_cache="k6v5")
    r = write_exl3_recipe(plan, tmp_path / "recipe.yaml", target_bpw=None)
    got = read_exl3_recipe(r)
    assert got == {lin.key: plan.rates[lin.key] for lin in m.budgeted()}
    (tmp_path / "again").mkdir()
    assert write_exl3_recipe(plan, tmp_path / "again" / "recipe.yaml").read_bytes() == r.read_bytes()


def test_kv_cache_option() -> None:
    assert parse_kv_cache("fp16") == (16, 16) and parse_kv_cache("k6v5") == (6, 5) and parse_kv_cache("q4") == (4, 4)
    with pytest.raises(Exl3Error, match="k6v5"):
        parse_kv_cache("k9v5")


def test_cli_optimize_exl3(tmp_path: Path, tiny_dirs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from quantmix.cli import main
    d = tiny_dirs["tiny-llama"]
    meas = write_measurement(tmp_path / "meas.json", _measurement(d))
    out = tmp_path / "recipe.yaml"
    assert main(["optimize", str(d), "--format", "exl3", "--exl3-measurement", str(meas), "--target-bpw", "3.5",
                 "-o", str(out)]) == 0
    rates = read_exl3_recipe(out)
    plan = plan_exl3(exl3_model(d), read_measurement(meas), target_bpw=3.5)
    assert rates == {k: v for k, v in plan.rates.items() if k != "lm_head"}
    assert "3.5000 bpw" in capsys.readouterr().out or plan.bpw < 3.5
    rc = main(["optimize", str(d), "--format", "exl3", "--target-bpw", "3.5", "-o", str(tmp_path / "r2.yaml")])
    assert rc != 0 and not (tmp_path / "r2.yaml").exists()
    assert "--exl3-measurement" in capsys.readouterr().err


def _grid_quantize(w: torch.Tensor, imp: torch.Tensor | None, rate: float, _scratch: str) -> tuple[torch.Tensor, float]:
    """A CPU stand-in for exllamav3's quantizer (which needs CUDA): round each row to 2^rate levels over its range;
    the cost is the importance-weighted squared error, as exllamav3's proxy_err * trace(W^T H W) is."""
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    step = (hi - lo).clamp_min(1e-12) / (2 ** rate - 1)
    q = lo + torch.round((w - lo) / step) * step
    d = imp.to(w.dtype) if imp is not None else torch.ones(w.shape[1], dtype=w.dtype)
    return q, float((((w - q) ** 2) * d[None, :]).sum())


def test_exl3_sensitivity_probes(tmp_path: Path) -> None:
    """Each budgeted linear gets KLD / cost from a probe through the streaming engine; the journal makes a rerun
    probe nothing; the plan then weighs costs by these coefficients, and they survive the measurement file."""
    from quantmix.measurement.exl3_sensitivity import exl3_coefficients
    hf = tmp_path / "hf"
    build_tiny("tiny-llama", hf, seed=0, vocab=True)
    text = tmp_path / "calib.txt"
    text.write_text(Path(__file__).read_text() * 4)
    kw = dict(probe_rate=3, n_ctx=64, chunks=2, texts=[text], device="cpu", progress=False)
    coef = exl3_coefficients(hf, "k1", tmp_path / "m.json.sensitivity", quantize=_grid_quantize, **kw)
    budgeted = {m.key for m in exl3_model(hf).budgeted()}
    assert set(coef) == budgeted and all(math.isfinite(c) and c >= 0 for c in coef.values())
    assert len({round(c, 12) for c in coef.values()}) > len(coef) // 2  # tensors differ, not one constant

    def refuse(*_a: object) -> None:
        raise AssertionError("a journaled tensor was probed again")
    assert exl3_coefficients(hf, "k1", tmp_path / "m.json.sensitivity", quantize=refuse, **kw) == coef
    # another measurement key is another journal: probed afresh, same numbers (deterministic)
    assert exl3_coefficients(hf, "k2", tmp_path / "m.json.sensitivity", quantize=_grid_quantize, **kw) == coef

    # a MoE: the stacked experts probed with 2 of 4 experts quantized, every expert linear gets its tensor's figure
    moe = tmp_path / "moe"
    build_tiny("tiny-qwen3-moe", moe, seed=0, vocab=True)
    shapes: list[tuple[int, ...]] = []

    def counted(w: torch.Tensor, *a: object) -> tuple[torch.Tensor, float]:
        shapes.append(tuple(w.shape))
        return _grid_quantize(w, *a)
    mc = exl3_coefficients(moe, "k3", tmp_path / "moe.sensitivity", quantize=counted, expert_sample=2, **kw)
    moe_keys = {m.key for m in exl3_model(moe).budgeted()}
    assert set(mc) == moe_keys and all(math.isfinite(c) and c >= 0 for c in mc.values())
    n_exp_tensors = len({k.split(".experts.")[0] + k.rsplit(".", 1)[1] for k in moe_keys if ".experts." in k})
    n_dense = len([k for k in moe_keys if ".experts." not in k])
    assert len(shapes) == n_dense + 2 * n_exp_tensors

    m = _measurement(hf)
    weighted = Measurement(m.costs, m.source, coef)
    p = write_measurement(tmp_path / "meas.json", weighted)
    back = read_measurement(p)
    assert back.coefficients == coef
    key = sorted(coef)[0]
    assert back.predicted(key, 3) == coef[key] * m.costs[key][3]
    plan = plan_exl3(exl3_model(hf), back, target_bpw=3.0)
    assert plan.cost == pytest.approx(sum(coef[k] * m.costs[k][plan.rates[k]] for k in budgeted))
    bad = json.loads(p.read_text())
    bad["linears"][key]["kld_per_cost"] = -1
    p.write_text(json.dumps(bad))
    with pytest.raises(Exl3Error, match=f"{key}: kld_per_cost"):
        read_measurement(p)


def test_eval_exl3_fields_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An EXL3 directory's evaluation row: size from the stored tensors, bpw as exllamav3 counts it (decoder
    linears, the head apart); `quantmix eval --exl3` refuses a CPU device and a non-EXL3 directory at once (exit 2)."""
    from quantmix.cli import main
    from quantmix.evaluation.exl3_logits import exl3_applied
    layout = {"model.layers.0.self_attn.q_proj": (256, 256, 2.5), "model.layers.0.mlp.down_proj": (512, 256, 4),
              "lm_head": (256, 512, 6)}
    q = tmp_path / "q"
    q.mkdir()
    _write_exl3_dir(q, layout)
    a = exl3_applied(q)
    assert a["size_bytes"] == sum(linear_bytes(*v) for v in layout.values())
    assert a["bpw"] == pytest.approx((256 * 256 * 2.5 + 512 * 256 * 4) / (256 * 256 + 512 * 256))
    assert a["types"] == "EXL3 2.5,4 head 6"
    hf = tmp_path / "hf"
    build_tiny("tiny-llama", hf, seed=0, vocab=True)
    assert main(["eval", str(hf), "--exl3", str(q), "--device", "cpu", "--quiet"]) == 2
    assert "CUDA only" in capsys.readouterr().err
    assert main(["eval", str(hf), "--exl3", str(hf), "--device", "cpu", "--quiet"]) == 2
    assert str(hf) in capsys.readouterr().err


def test_measure_exl3_resumes_and_samples_experts(tmp_path: Path) -> None:
    """measure_exl3 with a CPU stand-in quantizer: one cost per linear and rate; a rerun reads the journal and
    quantizes nothing; a torn last journal line is redone; with --expert-sample 2 of 4 experts only those are
    quantized and the others get their group's relative error times their own trace(W^T W)."""
    from quantmix.measurement.exl3_measure import expert_samples, measure_exl3
    hf = tmp_path / "moe"
    build_tiny("tiny-qwen3-moe", hf, seed=0)
    rates = (2, 3, 4)
    calls: list[str] = []

    def q(w: torch.Tensor, imp: torch.Tensor | None, rate: float, scratch: str) -> tuple[torch.Tensor, float]:
        calls.append(f"{tuple(w.shape)}@{rate}")
        return _grid_quantize(w, imp, rate, scratch)

    out = tmp_path / "m.json"
    m = measure_exl3(hf, out, rates=rates, device="cpu", progress=False, quantize=q)
    keys = [x.key for x in exl3_model(hf).budgeted()]
    assert sorted(m.costs) == sorted(keys) and len(calls) == 3 * len(keys)
    assert all(m.costs[k][2] > m.costs[k][3] > m.costs[k][4] > 0 for k in keys)
    journal = next(tmp_path.glob("m.json.*.jsonl"))
    calls.clear()
    assert measure_exl3(hf, out, rates=rates, device="cpu", progress=False, quantize=q).costs == m.costs
    assert calls == []
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-1]) + lines[-1][:10])  # a kill mid-write
    assert measure_exl3(hf, out, rates=rates, device="cpu", progress=False, quantize=q).costs == m.costs
    assert len(calls) == 3
    assert journal.read_text().splitlines(keepends=True) == lines  # cut back, then the redone line on its own
    assert read_measurement(out).costs == m.costs

    stand = expert_samples(keys, 2)
    experts = [k for k in keys if ".experts." in k]
    assert len(stand) == len(experts) // 2 and all(".experts." in k for k in stand)
    calls.clear()
    s = measure_exl3(hf, tmp_path / "s.json", rates=rates, device="cpu", progress=False, quantize=q,
                     expert_sample=2)
    assert len(calls) == 3 * (len(keys) - len(stand))
    for k in keys:
        if k not in stand:
            assert s.costs[k] == m.costs[k]
        else:  # near the exact figure: experts of one layer have like error curves
            assert all(0.5 < s.costs[k][r] / m.costs[k][r] < 2 for r in rates), k
    assert s.source["expert_sample"] == {"per_group": 2, "stand_ins": len(stand)}


def _exllamav3_measurement(path: Path, layers: list[list[str]], dkld: list[list[float]]) -> Path:
    """A file in the layout exllamav3 1.6.5's conversion/measure_model.py writes (base, alts, groups, base_kld)."""
    doc = {"base": {"dir": "/nonexistent/q2", "bpw": 2.0},
           "alts": [{"dir": "/nonexistent/q3", "bpw": 3.0}, {"dir": "/nonexistent/q4", "bpw": 4.0}],
           "groups": [{"idx": i, "layers": ls, "candidates": [{"dkld": d, "dbits": 0} for d in dk]}
                      for i, (ls, dk) in enumerate(zip(layers, dkld))],
           "base_kld": 0.5, "arch_string": "LlamaForCausalLM"}
    path.write_text(json.dumps(doc, indent=4))
    return path


def test_plan_from_exllamav3_measurement(tmp_path: Path, tiny_dirs: dict[str, Path],
                                         capsys: pytest.CaptureFixture) -> None:
    """exllamav3's own measurement, solved exactly: the least summed dKLD within the bpw, equal to brute force over
    every choice per group, each group at one quant; the CLI writes the recipe; a measurement of another model is
    refused naming the group."""
    import itertools

    from quantmix.cli import main
    from quantmix.planning.exl3_plan import plan_from_exllamav3
    hf = tiny_dirs["tiny-llama"]
    model = exl3_model(hf)
    layers = [[f"model.layers.{i}.{part}"] for i in range(2) for part in ("self_attn", "mlp")]
    dkld = [[-0.30, -0.40], [-0.05, -0.08], [-0.20, -0.35], [-0.01, -0.50]]
    meas = _exllamav3_measurement(tmp_path / "measurement.json", layers, dkld)
    budgeted = model.budgeted()
    numel = sum(m.numel for m in budgeted)
    members = [[m for m in budgeted if m.key.startswith(ls[0] + ".")] for ls in layers]
    for bpw in (2.5, 3.0, 3.4):
        plan = plan_from_exllamav3(model, meas, bpw)
        best = min((sum(dkld[g][c - 1] for g, c in enumerate(ch) if c), ch)
                   for ch in itertools.product(range(3), repeat=4)
                   if sum(m.numel * (2 + c) for g, c in enumerate(ch) for m in members[g]) <= bpw * numel)
        assert plan.cost == pytest.approx(best[0]) and plan.bpw <= bpw + 1e-12
        for g, ms in enumerate(members):
            assert {plan.rates[m.key] for m in ms} == {2 + best[1][g]}
    out = tmp_path / "r.yaml"
    assert main(["optimize", str(hf), "--format", "exl3", "--exllamav3-measurement", str(meas), "--target-bpw", "3",
                 "-o", str(out)]) == 0
    assert read_exl3_recipe(out) == {m.key: plan_from_exllamav3(model, meas, 3.0).rates[m.key] for m in budgeted}
    other = _exllamav3_measurement(tmp_path / "other.json", [["model.layers.7.mlp"]], [[-0.1, -0.2]])
    with pytest.raises(Exl3Error, match=r"groups\[0\] \(model.layers.7.mlp\) matches no linear"):
        plan_from_exllamav3(model, other, 3.0)
