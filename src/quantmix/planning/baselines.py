"""Baselines to compare quantmix's plans with: uniform types, llama-quantize's stock mixes, and the proxy-only
Lagrangian allocator of llama.cpp's "target bpw" proposal (E. Addario, llama.cpp PR #15550).

Uniform and stock recipes are not reimplemented here: they are recipe specs handed to the one resolver
(:func:`quantmix.planning.recipe.resolve`, which applies llama-quantize's rules by way of
:mod:`quantmix.planning.llama_rules`, checked against ``llama-quantize --dry-run``). The Lagrangian allocator
works on the same knapsack the exact solver builds (:func:`quantmix.planning.solver.build_problem`) and returns
the same :class:`~quantmix.planning.solver.Plan`, so both can be costed, written and compared alike.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping

from quantmix.formats.registry import UnknownTypeError, get_type
from quantmix.model.catalog import Catalog
from quantmix.planning.budget import Budget, usage
from quantmix.planning.constraints import Constraints, CostTable, tensor_candidates, tie_groups
from quantmix.planning.llama_rules import FTYPE_BASE_TYPE, LlamaRulesError, parse_ftype
from quantmix.planning.recipe import RecipeError, RecipeSpec, Resolution, Rule, resolve
from quantmix.planning.solver import (
    Group,
    InfeasibleBudget,
    Plan,
    PlannedTensor,
    PoolUse,
    Problem,
    build_problem,
    infeasible_message,
    plan_from_choice,
)

__all__ = [
    "BENCH_FTYPES",
    "STOCK_FTYPES",
    "BaselineError",
    "baseline_plan",
    "lagrangian_allocation",
    "resolution_plan",
    "stock_resolution",
    "stock_spec",
    "uniform_resolution",
    "uniform_spec",
]

# llama-quantize's K-quant file types, low to high: the stock mixes quant makers compare against.
STOCK_FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
# The ones the quality benchmark (issue 5, item 8) runs.
BENCH_FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")


class BaselineError(ValueError):
    """A baseline cannot be built as asked (unknown type or file type, a budget it does not handle)."""


# ------------------------------------------------------------------------------------------------ uniform


def uniform_spec(qtype: str) -> RecipeSpec:
    """Every quantizable tensor (token_embd and output included) at ``qtype``: ``--tensor-type '.*=TYPE'``."""
    try:
        t = get_type(qtype)
    except UnknownTypeError as e:
        raise BaselineError(f"uniform baseline: {e}") from None
    return RecipeSpec(ftype=None, rules=[Rule(".*", t.name, f"uniform {t.name}")],
                      dialect="ik" if t.ik_only else "llama", label=f"uniform {t.name}")


def uniform_resolution(catalog: Catalog, qtype: str) -> Resolution:
    """Every quantizable tensor at ``qtype`` as llama-quantize would store it: rows that do not fit the type's
    block fall back as llama.cpp does (Q4_K -> Q5_0, IQ types -> IQ4_NL, ...); tensors llama-quantize never
    quantizes (norms, router, ...) keep their stored type (F32 for a config-only catalog)."""
    return resolve(catalog, uniform_spec(qtype))


# -------------------------------------------------------------------------------------------------- stock


def stock_spec(ftype: str) -> RecipeSpec:
    """llama-quantize's own mix for file type ``ftype`` (``Q4_K_M``, ``IQ2_M``, ``Q4_K`` = ``Q4_K_M``, ...)."""
    try:
        name = parse_ftype(ftype)
    except LlamaRulesError as e:
        raise BaselineError(f"stock baseline: {e}") from None
    if FTYPE_BASE_TYPE.get(name) is None:
        raise BaselineError(f"stock baseline: {ftype!r} copies the model unchanged; give a quantized file type")
    return RecipeSpec(ftype=name, label=f"stock {name}")


def stock_resolution(catalog: Catalog, ftype: str, imatrix_present: bool = False) -> Resolution:
    """What ``llama-quantize [--imatrix FILE] MODEL OUT FTYPE`` writes: its default mix for ``ftype`` (layer
    bumps, attn_v/ffn_down/output rules, shape fallbacks). ``imatrix_present`` changes a few mixes (IQ3_XXS,
    IQ4_NL/IQ4_XS, Q4_0/Q5_0 ffn_down), as it does in llama-quantize."""
    return resolve(catalog, stock_spec(ftype), imatrix_present=imatrix_present)


# ------------------------------------------------------------------------------------- plans of recipes


def resolution_plan(resolution: Resolution, costs: CostTable | None = None, budget: Budget | None = None) -> Plan:
    """A resolved recipe (uniform, stock, anything) as a :class:`Plan`, so baselines are written, costed and
    reported like optimized plans. ``costs``: the cost table to predict with (tensor -> type -> cost); a
    tensor whose type it lacks gets no prediction (a note says how many). ``budget``: the pools to report
    usage against (default: one file pool of exactly the recipe's size); a recipe over budget is noted, not
    refused (a baseline is what it is)."""
    t0 = time.perf_counter()
    catalog = resolution.catalog
    budget = budget or Budget.of_size(resolution.n_bytes)
    by_name = {a.tensor.name: a for a in resolution.assignments}
    tensors, missing = [], []
    for t in catalog:
        a = by_name[t.name]
        fixed = a.reason.startswith("not quantized")
        cost = None
        if not fixed and costs is not None:
            cost = _lookup(costs.get(t.name), a.qtype)
            if cost is None:
                missing.append(f"{t.name} ({a.qtype})")
        tensors.append(PlannedTensor(t.name, a.qtype, a.n_bytes, cost, fixed))
    used = usage(budget, resolution)
    pools = [PoolUse(p.name, p.capacity, u) for p, u in zip(budget.pools, used)]
    notes = list(budget.notes)
    notes += [f"pool {p.name}: the recipe exceeds it by {-p.left:,} bytes" for p in pools if p.left < 0]
    if missing:
        notes.append(f"{len(missing)} tensors have no predicted cost for their type (first: {missing[0]}): the "
                     f"objective leaves them out")
    objective = sum(t.cost for t in tensors if t.cost is not None)
    return Plan(catalog, budget, tensors, pools, "given recipe", objective, objective, 0.0,
                time.perf_counter() - t0, resolution.spec.describe(), (0, 0), notes)


def _lookup(row: Mapping[str, float] | None, qtype: str) -> float | None:
    if not row:
        return None
    for k, v in row.items():
        if get_type(k).name == qtype:
            return float(v)
    return None


# ------------------------------------------------------------------------------------------- Lagrangian


def _hull(group: Group) -> list[int]:
    """Indices of ``group``'s options on the lower convex hull of (bytes, cost), bytes increasing.

    First the Pareto front (sorted by bytes, keep an option only if it costs strictly less than every smaller
    one; equal bytes: the cheaper, then the first in type order), then drop every point on or above the chord
    of its neighbours. The minimizer of cost + mu * bytes for any mu >= 0 is always on this hull."""
    order = sorted(range(len(group.options)),
                   key=lambda k: (group.options[k].usage[0], group.options[k].cost, group.options[k].order))
    front: list[int] = []
    for k in order:  # an option with the bytes of the last one kept costs at least as much: dropped too
        if not front or group.options[k].cost < group.options[front[-1]].cost:
            front.append(k)
    hull: list[int] = []
    for k in front:
        while len(hull) >= 2:
            a, b, c = (group.options[i] for i in (hull[-2], hull[-1], k))
            cross = (b.usage[0] - a.usage[0]) * (c.cost - a.cost) - (c.usage[0] - a.usage[0]) * (b.cost - a.cost)
            if cross > 0:  # b strictly below the chord a-c: keep it
                break
            hull.pop()
        hull.append(k)
    return hull


class _Relaxation:
    """The hulls of all groups, and the Lagrangian relaxation min sum(cost + mu * bytes) over them."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.hulls = [_hull(g) for g in problem.groups]
        self.points = [[(g.options[k].usage[0], g.options[k].cost) for k in h]
                       for g, h in zip(problem.groups, self.hulls)]
        # slope of each hull segment: cost saved per extra byte (decreasing along a convex hull)
        self.slopes = [[(p[i][1] - p[i + 1][1]) / (p[i + 1][0] - p[i][0]) for i in range(len(p) - 1)]
                       for p in self.points]

    def choose(self, mu: float) -> list[int]:
        """Per group, the hull position minimizing cost + mu * bytes (ties: fewer bytes)."""
        out = []
        for s in self.slopes:
            j = 0
            while j < len(s) and s[j] > mu:  # moving up saves more than mu per byte
                j += 1
            out.append(j)
        return out

    def bytes_of(self, pos: list[int]) -> int:
        return sum(p[j][0] for p, j in zip(self.points, pos))

    def cost_of(self, pos: list[int]) -> float:
        return sum(p[j][1] for p, j in zip(self.points, pos))

    def dual(self, mu: float, pos: list[int], room: int) -> float:
        """The Lagrangian dual value at ``mu`` (``pos`` = :meth:`choose`'s answer): a lower bound on the optimum."""
        return sum(p[j][1] + mu * p[j][0] for p, j in zip(self.points, pos)) - mu * room


def lagrangian_allocation(catalog: Catalog, costs: CostTable, budget: Budget,
                          constraints: Constraints | None = None, *, iterations: int = 200) -> Plan:
    """The proxy-only allocator of llama.cpp's target-bpw proposal (PR #15550), on quantmix's cost table.

    Same input and output as :func:`quantmix.planning.solver.optimize` (candidates, ties, pins, bounds and
    cost weights from ``constraints``; every tensor counts, fixed ones included), different search:

    1. Per group (tensor or tie), keep only the options on the lower convex hull of (bytes, cost).
    2. Lagrangian relaxation: for a multiplier mu, each group independently takes the option minimizing
       cost + mu x bytes. Bisect mu (geometrically, between the steepest and the flattest hull slope, at most
       ``iterations`` steps) for the least mu whose choice fits the budget; every point visited gives a dual
       lower bound, the best is reported as the plan's ``bound`` and ``gap``.
    3. Greedy fill, one pass: repeatedly move the group with the best cost saved per extra byte to its next
       hull option if that still fits; a group whose next step does not fit is dropped from the queue.

    How it differs from the exact solver: no backtracking and no branch and bound. A Lagrangian solution lies on
    the convex hull of the whole problem, so options off each tensor's hull (a type that is good value only
    in combination) are never chosen, and the last bytes are filled greedily; the plan usually leaves bytes
    unused and its objective is never below the exact solver's on the same costs and budget. It never exceeds
    the budget. The proposal's own heuristics (row sampling, boosts for ffn_down/output/attn_v, ffn_down caps)
    are left out: here the costs are the measured table (over all rows), and priors go through
    ``constraints`` (``--weight``), as for the exact solver. One pool only (``--target-size``,
    ``--target-bpw``, or ``--vram`` alone); a two-pool budget raises :class:`BaselineError`.
    """
    t0 = time.perf_counter()
    cands = tensor_candidates(catalog, costs, constraints)
    problem = build_problem(catalog, cands, budget, tie_groups(catalog, constraints))
    if problem.n_pools != 1 or problem.fixed_reserve[0] or any(o.reserve[0] for g in problem.groups
                                                                 for o in g.options):
        raise BaselineError(f"the Lagrangian baseline plans a single pool without reserves; this budget has "
                            f"{', '.join(problem.pool_names)}"
                            f"{' with an op-offload reserve' if problem.n_pools == 1 else ''}: use the exact solver")
    if problem.smallest()[0] > problem.capacities[0]:
        raise InfeasibleBudget(infeasible_message(problem, "the budget is too small"))
    room = problem.capacities[0] - problem.fixed[0]
    rel = _Relaxation(problem)

    all_slopes = [s for ss in rel.slopes for s in ss]
    top = [len(s) for s in rel.slopes]
    best_bound = -math.inf
    if rel.bytes_of(top) <= room:  # everything at its largest hull option fits
        pos = top
        best_bound = rel.cost_of(top)  # mu = 0 (min over hull = last point on a convex front)
    else:
        lo = min(all_slopes) / 2.0  # every group takes its largest option (over budget)
        hi = max(all_slopes) * 2.0  # every group takes its smallest option (fits: checked above)
        pos = rel.choose(hi)
        best_bound = max(best_bound, rel.dual(hi, pos, room))
        for _ in range(iterations):
            mid = math.sqrt(lo * hi)
            if not lo < mid < hi:
                break
            cand = rel.choose(mid)
            best_bound = max(best_bound, rel.dual(mid, cand, room))
            if rel.bytes_of(cand) <= room:
                hi, pos = mid, cand
            else:
                lo = mid
    pos = _greedy_fill(rel, pos, room)

    choice = [h[j] for h, j in zip(rel.hulls, pos)]
    used, objective = problem.evaluate(choice)
    if used[0] > problem.capacities[0]:  # cannot happen: every step above checks the room
        raise AssertionError(f"Lagrangian plan uses {used[0]} bytes of {problem.capacities[0]}")
    best_bound = min(best_bound, objective)
    gap = (objective - best_bound) / abs(objective) if objective else 0.0
    n_opts = (sum(len(g.options) for g in problem.groups), sum(len(h) for h in rel.hulls))
    left = problem.capacities[0] - used[0]
    notes = [f"Lagrangian baseline (target-bpw proposal): {left:,} bytes of the budget left unused; not proven "
             f"optimal (dual bound {best_bound:.6g}, gap {gap:.2e})"]
    return plan_from_choice(catalog, costs, budget, problem, choice, used, status="feasible", objective=objective,
                            bound=best_bound, gap=gap, seconds=time.perf_counter() - t0, method="lagrangian",
                            n_options=n_opts, notes=notes)


def _greedy_fill(rel: _Relaxation, pos: list[int], room: int) -> list[int]:
    """One pass of upgrades along the hulls, best cost saved per extra byte first, each only if it fits."""
    pos = list(pos)
    used = rel.bytes_of(pos)
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        if pos[i] < len(rel.slopes[i]):
            heapq.heappush(heap, (-rel.slopes[i][pos[i]], i))

    for i in range(len(pos)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        p = rel.points[i]
        extra = p[pos[i] + 1][0] - p[pos[i]][0]
        if used + extra <= room:
            used += extra
            pos[i] += 1
            push(i)
    return pos


# ---------------------------------------------------------------------------------------------- dispatch


def baseline_plan(name: str, catalog: Catalog, budget: Budget | None = None, costs: CostTable | None = None,
                  constraints: Constraints | None = None, *, imatrix_present: bool = False) -> Plan:
    """A baseline by name, as a :class:`Plan`: ``lagrangian`` (needs ``costs`` and ``budget``),
    ``uniform:TYPE`` (``uniform:Q4_K``) or ``stock:FTYPE`` (``stock:Q4_K_M``; a bare file type also works).
    Uniform and stock plans ignore ``constraints`` and report usage against ``budget`` without being held to it."""
    kind, _, arg = name.strip().partition(":")
    kind = kind.lower()
    if kind == "lagrangian" and not arg:
        if costs is None or budget is None:
            raise BaselineError("the lagrangian baseline needs a cost table and a budget")
        return lagrangian_allocation(catalog, costs, budget, constraints)
    if kind in ("uniform", "stock") and not arg:
        raise BaselineError(f"baseline {name!r}: name the type, e.g. uniform:Q4_K or stock:Q4_K_M")
    if kind not in ("uniform", "stock"):
        if arg:
            raise BaselineError(_UNKNOWN.format(name=name))
        try:  # a bare llama-quantize file type: its stock mix
            arg, kind = parse_ftype(kind), "stock"
        except LlamaRulesError:
            raise BaselineError(_UNKNOWN.format(name=name)) from None
    try:
        if kind == "uniform":
            return resolution_plan(uniform_resolution(catalog, arg), costs, budget)
        return resolution_plan(stock_resolution(catalog, arg, imatrix_present), costs, budget)
    except (RecipeError, BaselineError) as e:
        raise BaselineError(f"baseline {name!r}: {e}") from None


_UNKNOWN = ("unknown baseline {name!r}: use lagrangian, uniform:TYPE (e.g. uniform:Q4_K), stock:FTYPE "
            "(e.g. stock:Q4_K_M) or a bare llama-quantize file type")
