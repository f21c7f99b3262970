"""The measured-KLD instrument (KLDProbe), the sensitivity fit and refinement, on the real MoE fixture and real
text: partial replays equal full forward passes, the fit is additive and cached, refinement never leaves the
budget and never makes the measured KLD worse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from quantmix.measurement.kld_probe import KLDProbe, tensor_layer

pytestmark = pytest.mark.slow

NAME = "smollm2-moe"
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"]
TENSORS = ["token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight",
           "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_shexp.weight",
           "blk.2.ffn_down_exps.weight", "blk.3.attn_q.weight", "blk.3.ffn_up_exps.weight"]


@pytest.fixture(scope="module")
def setup():  # noqa: ANN201
    """The real MoE fixture (fused routed experts, a shared expert), 2 chunks of 64 wiki-calib tokens, and the
    error table of the tensors the tests use."""
    from transformers import AutoTokenizer

    from quantmix.calibration.imatrix import calibration_tokens
    from quantmix.fixtures.store import get_fixture
    from quantmix.fixtures.text import read_text
    from quantmix.measurement.error_table import error_table
    from quantmix.model.catalog import catalog_from_gguf

    fx = get_fixture(NAME)
    chunks = calibration_tokens(AutoTokenizer.from_pretrained(fx.hf_dir), [read_text("wiki-calib")], 64, 2)
    probe = KLDProbe(fx.hf_dir, chunks, device="cpu")
    table = error_table(fx.gguf_f32, None, candidates=TYPES, device="cpu", progress=False, tensors=TENSORS)
    return fx.gguf_f32, probe, table, catalog_from_gguf(fx.gguf_f32)


def _full_kld(hf: Path, chunks: torch.Tensor, ref_logp: torch.Tensor, name: str, image: torch.Tensor) -> float:
    """KLD computed the slow, independent way: a fresh model, the tensor written by the simulator's mapping,
    one full forward pass."""
    from transformers import AutoModelForCausalLM

    from quantmix.export.simulate import tensor_targets, unpermute_rows

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tgt = tensor_targets(model)[name]
    p = dict(model.named_parameters())[tgt.param].data
    view = p[:, tgt.part] if tgt.part is not None else p
    view.copy_(unpermute_rows(image, tgt.n_head_perm) if tgt.n_head_perm else image)
    with torch.no_grad():
        lq = F.log_softmax(model(input_ids=chunks).logits[:, :-1].float(), -1)
    return float((ref_logp.exp() * (ref_logp - lq)).sum(-1).mean())


def test_partial_replay_equals_a_full_forward(setup) -> None:  # noqa: ANN001
    _, probe, _, _ = setup
    assert probe.kld({}) < 1e-12  # the float model against itself
    names = ["blk.1.ffn_gate_exps.weight", "blk.0.attn_q.weight", "output.weight", "token_embd.weight",
             "blk.1.ffn_down_shexp.weight", "blk.2.ffn_down_exps.weight"]
    for n in names:
        assert n in probe.tensor_names
        k = probe.kld({n: "Q2_K"})
        assert k > 1e-4 and probe.kld({n: "Q2_K"}) == k  # deterministic
        full = _full_kld(probe.model_dir, probe.chunks, probe.ref_logp, n, probe.image(n, "Q2_K"))
        assert math.isclose(k, full, rel_tol=1e-3), (n, k, full)
    assert probe.kld({}) < 1e-12  # every change was undone
    assert tensor_layer("blk.12.attn_k.weight") == 12 and tensor_layer("output.weight") == -1


def test_base_state_and_changes_on_top(setup) -> None:  # noqa: ANN001
    _, probe, _, _ = setup
    both = {"blk.0.ffn_up_exps.weight": "Q3_K", "blk.1.attn_v.weight": "Q2_K"}
    together = probe.kld(both)
    alone = probe.kld({"blk.0.ffn_up_exps.weight": "Q3_K"})
    probe.set_base({"blk.0.ffn_up_exps.weight": "Q3_K"})
    try:
        assert math.isclose(probe.kld({}), alone, rel_tol=1e-5)  # the base state is measured as such
        on_top = probe.kld({"blk.1.attn_v.weight": "Q2_K"})
        assert math.isclose(on_top, together, rel_tol=1e-5)
    finally:
        probe.set_base({})
    assert probe.kld({}) < 1e-12


def test_sensitivity_fit_is_additive_cached_and_checked(setup, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from quantmix.measurement.sensitivity import Sensitivity, fit_sensitivity, spearman

    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path))
    _, probe, table, cat = setup
    costs = table.to_costs()
    classes = {t.name: t.tensor_class for t in cat}
    before = probe.forward_tokens
    s = fit_sensitivity(probe.model_dir, costs, classes, profile="quick", probe=probe, checks=3, progress=False)
    spent = probe.forward_tokens - before
    assert set(s.coefficients) == set(costs) and all(c >= 0 for c in s.coefficients.values())
    assert sum(1 for c in s.coefficients.values() if c > 0) >= len(costs) - 1
    for n, k in s.probe_kld.items():  # each coefficient reproduces its own probe exactly
        assert math.isclose(s.contribution(n, "Q3_K", costs), k, rel_tol=1e-12)
    types = {n: "Q4_K" for n in costs}
    assert math.isclose(s.predict(types, costs), sum(s.coefficients[n] * costs[n]["Q4_K"] for n in costs))
    assert len(s.checks) == 3 and all(c["type"] != "Q3_K" and c["measured"] > 0 for c in s.checks)
    # cached: a second fit measures only its checks again, and gives the same coefficients
    before = probe.forward_tokens
    again = fit_sensitivity(probe.model_dir, costs, classes, profile="quick", probe=probe, checks=0, progress=False)
    assert again.coefficients == s.coefficients and probe.forward_tokens == before < before + spent
    s.save(tmp_path / "s.json")
    assert Sensitivity.load(tmp_path / "s.json") == s
    large = fit_sensitivity(probe.model_dir, costs, classes, profile="large", large_layers=1, probe=probe,
                            checks=0, progress=False)
    assert set(large.coefficients) == set(costs)
    assert {tensor_layer(n) for n in large.probe_kld} == {-1, 0}  # layer 0 and the non-layer tensors only
    assert "blk.3.attn_q.weight" not in large.probe_kld
    assert large.coefficients["blk.3.attn_q.weight"] == large.coefficients["blk.0.attn_q.weight"] > 0
    assert large.coefficients["blk.3.ffn_up_exps.weight"] == 0.0  # its class was not probed at layer 0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0


def _refine_problem(setup, tmp_path: Path, monkeypatch) -> tuple:  # noqa: ANN001
    """A plan at the size of every test tensor at Q4_K (the others held at Q8_0), on sensitivity-scaled costs."""
    from quantmix.formats.registry import get_type
    from quantmix.measurement.sensitivity import fit_sensitivity
    from quantmix.planning.budget import Budget
    from quantmix.planning.constraints import Constraints
    from quantmix.planning.solver import optimize

    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path))
    _, probe, table, cat = setup
    costs = table.to_costs()
    s = fit_sensitivity(probe.model_dir, costs, {t.name: t.tensor_class for t in cat}, profile="quick",
                        probe=probe, checks=0, progress=False)
    scaled = s.scaled_costs(costs)
    fixed = sum(get_type(t.source_type or "F32").tensor_bytes(t.shape) for t in cat if not t.quantizable)
    others = [t for t in cat if t.quantizable and t.name not in costs]
    scaled.update({t.name: {"Q8_0": 0.0} for t in others})  # held at Q8_0; the moves are among TENSORS
    size = fixed + sum(get_type("Q8_0").tensor_bytes(t.shape) for t in others) + \
        sum(get_type("Q4_K").tensor_bytes(t.shape) for t in cat if t.name in costs)
    budget = Budget.of_size(size)
    c = Constraints(imatrix=False)
    return optimize(cat, scaled, budget, c), scaled, c, budget


def test_refinement_stays_in_budget_and_never_worsens(setup, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from quantmix.planning.refine import refine

    probe = setup[1]
    plan, scaled, c, budget = _refine_problem(setup, tmp_path, monkeypatch)
    results = [refine(plan, scaled, probe, c, time_limit=600, max_moves=8, seed=3, progress=False) for _ in range(2)]
    r = results[0]
    assert r.plan.types() == results[1].plan.types()  # seeded: the same moves, the same answer
    assert r.moves_tried == 8 and r.plan.n_bytes <= budget.pools[0].capacity
    assert r.measured_after <= r.measured_before
    assert math.isclose(r.measured_before, probe.kld(probe.quantized_changes(plan.types())), rel_tol=1e-6)
    assert math.isclose(r.measured_after, probe.kld(probe.quantized_changes(r.plan.types())), rel_tol=1e-6)
    assert (r.moves_accepted > 0) == (r.plan.types() != plan.types())
    assert probe.kld({}) < 1e-12  # the probe is left as it was found: no base state
    assert r.measured_found == r.measured_after  # no check probe: what the moves found is returned
    assert "refinement:" in r.summary()


def test_batched_refinement_streams_once_per_round_and_resumes(setup, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Moves measured breadth first on a model streamed from disk: the baseline and each round of moves cost one
    pass over the layers (the accepted move's re-recording rides on the next round's pass); the answer is what an
    independent probe measures for the returned plan; a search stopped after one round and run again with the
    full budget continues to the same answer, and a finished search is returned from its state without a read."""
    from quantmix.planning.refine import refine

    plan, scaled, c, budget = _refine_problem(setup, tmp_path, monkeypatch)
    resident = setup[1]
    streamed = KLDProbe(resident.model_dir, resident.chunks, device="cpu", resident_bytes=0)
    try:
        reads = streamed.engine.layer_reads
        r = refine(plan, scaled, streamed, c, max_moves=6, batch=3, seed=3, progress=False)
        n = streamed.n_layer
        assert r.moves_tried == 6 and r.plan.n_bytes <= budget.pools[0].capacity
        assert streamed.engine.layer_reads - reads <= 3 * n  # baseline + 2 rounds, one pass each
        assert r.measured_after <= r.measured_before
        assert math.isclose(r.measured_after, resident.kld(resident.quantized_changes(r.plan.types())),
                            rel_tol=1e-5)
        state = tmp_path / "refine-state"
        part = refine(plan, scaled, streamed, c, max_moves=3, batch=3, seed=3, progress=False, state_dir=state)
        assert part.moves_tried == 3 and len(list(state.iterdir())) == 1
        full = refine(plan, scaled, streamed, c, max_moves=6, batch=3, seed=3, progress=False, state_dir=state)
        assert full.plan.types() == r.plan.types() and full.moves_tried == 6
        assert full.measured_after == r.measured_after and full.moves_accepted == r.moves_accepted
        reads = streamed.engine.layer_reads
        again = refine(plan, scaled, streamed, c, max_moves=6, batch=3, seed=3, progress=False, state_dir=state)
        assert streamed.engine.layer_reads == reads  # finished: nothing measured
        assert again.plan.types() == r.plan.types() and again.measured_after == r.measured_after
        other = refine(plan, scaled, streamed, c, max_moves=3, batch=3, seed=4, progress=False, state_dir=state)
        assert other.moves_tried == 3 and len(list(state.iterdir())) == 2  # another seed: its own search
    finally:
        streamed.close()


def test_refinement_time_limit_binds_inside_a_round_and_says_so(setup, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The move budget decides; the wall-clock limit is only an outer bound, checked between layers inside a
    round: a round it cuts is dropped (a rerun with more time measures it again and reaches the answer of a run
    never cut), and the summary says the time limit bound."""
    from quantmix.planning.refine import refine

    plan, scaled, c, _ = _refine_problem(setup, tmp_path, monkeypatch)
    streamed = KLDProbe(setup[1].model_dir, setup[1].chunks, device="cpu", resident_bytes=0)
    try:
        full = refine(plan, scaled, streamed, c, max_moves=4, batch=2, seed=5, progress=False)
        assert full.moves_tried == 4 and not full.time_bound
        state = tmp_path / "state"
        cut = refine(plan, scaled, streamed, c, max_moves=4, batch=2, seed=5, progress=False, time_limit=1e-6,
                     state_dir=state)
        assert cut.time_bound and cut.moves_tried == 0 and cut.plan.types() == plan.types()
        assert "stopped by the time limit" in cut.summary()
        again = refine(plan, scaled, streamed, c, max_moves=4, batch=2, seed=5, progress=False, state_dir=state)
        assert again.moves_tried == 4 and again.plan.types() == full.plan.types()
        assert again.measured_after == full.measured_after and not again.time_bound
        # inside a measurement: the deadline stops it between layers, even while the base's inputs are being
        # recorded again; the next measurement redoes that and gives what an uncut one gives
        import time

        from quantmix.measurement.kld_probe import ProbeDeadline

        base = {"blk.0.attn_q.weight": "Q2_K"}
        on_top = {"blk.2.ffn_down_exps.weight": "Q3_K"}
        streamed.set_base(base)
        with pytest.raises(ProbeDeadline):
            streamed.kld_many([on_top], deadline=time.monotonic())
        assert math.isclose(streamed.kld(on_top), setup[1].kld({**base, **on_top}), rel_tol=1e-5)
        streamed.set_base({})
    finally:
        streamed.close()
