"""The exact size-budget solver: one type per tensor, least total predicted cost, every pool within its bytes.

A multiple-choice knapsack, exact to the byte. Each *group* (one tensor, or tensors tied to one type) has
options (a type per member, the bytes it takes in each pool, its reserve, its cost); exactly one option is
chosen per group, subject to, for every pool p::

    fixed_p + sum of chosen usage_p + max(fixed reserve_p, max of chosen reserve_p) <= capacity_p

(the reserve is the VRAM held for the op-offload copy of the largest CPU-resident weight; zero elsewhere).
Every tensor counts: tensors llama-quantize never quantizes are fixed and their bytes come off first.

Solved as an integer program with HiGHS (binary variable per option, one continuous variable per reserve),
after removing dominated options (no fewer bytes in any pool and no lower cost), which is exact. HiGHS gets
the byte rows scaled by a power of two (lossless) and the solution is re-checked in integer arithmetic; a
dynamic program (exact, small problems) cross-checks it in the tests. Deterministic: groups are ordered by
name, options by ggml type order, equal options resolved in type order, HiGHS runs single-threaded.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantmix.formats.registry import get_type
from quantmix.model.catalog import Catalog
from quantmix.planning.budget import Budget, format_bytes
from quantmix.planning.constraints import (
    Candidate,
    Constraints,
    CostTable,
    tensor_candidates,
    tie_groups,
    type_order,
)
from quantmix.planning.recipe import RecipeSpec, Resolution, Rule, resolve, write_recipe


class InfeasibleBudget(ValueError):
    """No plan fits the budget; the message gives the smallest size that does."""


class SolverError(RuntimeError):
    """The integer program could not be solved (time limit without any solution, numerical trouble)."""


# ------------------------------------------------------------------------------------------ the problem


@dataclass(frozen=True)
class Option:
    """One choice for a group: a type per member, bytes per pool, reserve per pool, cost."""

    types: tuple[str, ...]
    usage: tuple[int, ...]
    reserve: tuple[int, ...]
    cost: float
    rank: tuple[int, ...] = ()  # tie-break order for choices that are no GGUF type (EXL3 rates)

    @property
    def order(self) -> tuple[int, ...]:
        return self.rank or tuple(type_order(t) for t in self.types)


@dataclass
class Group:
    """Tensors that take one option together (a single tensor, or a tie)."""

    members: tuple[str, ...]
    options: list[Option]


@dataclass
class Problem:
    """Groups, pools and the bytes already taken by fixed tensors."""

    pool_names: tuple[str, ...]
    capacities: tuple[int, ...]
    groups: list[Group]
    fixed: tuple[int, ...] = ()
    fixed_reserve: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.pool_names)
        self.fixed = self.fixed or (0,) * n
        self.fixed_reserve = self.fixed_reserve or (0,) * n
        if len(self.capacities) != n or len(self.fixed) != n or len(self.fixed_reserve) != n:
            raise ValueError("one capacity, fixed usage and fixed reserve per pool")
        for g in self.groups:
            if not g.options:
                raise ValueError(f"group {g.members}: no options")
            for o in g.options:
                if len(o.usage) != n or len(o.reserve) != n or len(o.types) != len(g.members):
                    raise ValueError(f"group {g.members}: option {o.types} has the wrong shape")

    @property
    def n_pools(self) -> int:
        return len(self.pool_names)

    def evaluate(self, choice: list[int]) -> tuple[tuple[int, ...], float]:
        """Exact bytes used per pool (reserve included) and total cost of a choice (option index per group)."""
        use = list(self.fixed)
        res = list(self.fixed_reserve)
        cost = 0.0
        for g, k in zip(self.groups, choice):
            o = g.options[k]
            cost += o.cost
            for p in range(self.n_pools):
                use[p] += o.usage[p]
                res[p] = max(res[p], o.reserve[p])
        return tuple(u + r for u, r in zip(use, res)), cost

    def smallest(self) -> tuple[int, ...]:
        """Per pool, the least bytes any plan needs (every group at its smallest option in that pool)."""
        out = []
        for p in range(self.n_pools):
            u = self.fixed[p] + sum(min(o.usage[p] for o in g.options) for g in self.groups)
            r = max([self.fixed_reserve[p]] + [min(o.reserve[p] for o in g.options) for g in self.groups])
            out.append(u + r)
        return tuple(out)


def prune(group: Group) -> Group:
    """Drop options another option dominates (no more bytes or reserve in any pool, no higher cost); among
    equal options keep the first in type order. Exact: some optimal plan uses only the options kept."""
    opts = sorted(group.options, key=lambda o: (o.cost, sum(o.usage), o.order))
    kept: list[Option] = []
    for o in opts:
        if not any(k.cost <= o.cost and all(a <= b for a, b in zip(k.usage, o.usage))
                   and all(a <= b for a, b in zip(k.reserve, o.reserve)) for k in kept):
            kept.append(o)
    kept.sort(key=lambda o: o.order)
    return Group(group.members, kept)


@dataclass
class Solution:
    """The chosen option per group, with what the solver proved about it."""

    choice: list[int]
    status: str  # "optimal", "time limit", ...
    objective: float
    bound: float  # best proven lower bound on the objective
    gap: float  # relative gap between objective and bound (0 when proven optimal)
    usage: tuple[int, ...]
    seconds: float
    method: str


# ------------------------------------------------------------------------------------------------ ILP

_BANNER_SHOWN = False


def _new_highs():  # type: ignore[no-untyped-def]
    """A silent HiGHS instance (its banner goes to the C stdout once per process: keep it out of ours)."""
    import highspy

    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        h = highspy.Highs()
    else:
        with _stdout_to_devnull():
            h = highspy.Highs()
        _BANNER_SHOWN = True
    h.setOptionValue("output_flag", False)
    return h


@contextlib.contextmanager
def _stdout_to_devnull():  # type: ignore[no-untyped-def]
    try:
        fd = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


def _pow2_scale(max_value: float, target: float = 2.0**20) -> float:
    """A power of two s with max_value * s <= target (exact scaling of integers in doubles)."""
    if max_value <= 0:
        return 1.0
    return 2.0 ** math.floor(math.log2(target / max_value))


def solve_ilp(problem: Problem, time_limit: float = 60.0, rel_gap: float = 0.0) -> Solution:
    """Solve with HiGHS' branch and bound. ``rel_gap=0``: run until optimality is proven or time runs out."""
    import highspy

    t0 = time.perf_counter()
    groups = problem.groups
    P = problem.n_pools
    reserve_pools = [p for p in range(P) if any(o.reserve[p] for g in groups for o in g.options)]
    umin = [[min(o.usage[p] for o in g.options) for p in range(P)] for g in groups]
    rhs = [problem.capacities[p] - problem.fixed[p] - sum(u[p] for u in umin) for p in range(P)]

    # columns: one binary per option, then one continuous reserve variable per reserve pool
    col_group, col_opt = [], []
    for gi, g in enumerate(groups):
        for k in range(len(g.options)):
            col_group.append(gi)
            col_opt.append(k)
    n_x = len(col_group)
    n_col = n_x + len(reserve_pools)
    costs = np.array([groups[g].options[k].cost for g, k in zip(col_group, col_opt)], dtype=np.float64)
    cscale = _pow2_scale(float(np.max(np.abs(costs))) if n_x else 1.0, 1.0)

    # pool scales: bring the largest coefficient near 2^20 (powers of two: exact)
    pscale = []
    for p in range(P):
        m = max([0] + [o.usage[p] - umin[gi][p] for gi, g in enumerate(groups) for o in g.options]
                + [o.reserve[p] for g in groups for o in g.options])
        pscale.append(_pow2_scale(float(m)))

    rows_lo: list[float] = []
    rows_hi: list[float] = []
    starts: list[int] = []
    index: list[int] = []
    value: list[float] = []

    def add_row(cols: list[int], vals: list[float], lo: float, hi: float) -> None:
        starts.append(len(index))
        index.extend(cols)
        value.extend(vals)
        rows_lo.append(lo)
        rows_hi.append(hi)

    inf = highspy.kHighsInf
    col = 0
    group_cols: list[list[int]] = []
    for g in groups:
        cols = list(range(col, col + len(g.options)))
        group_cols.append(cols)
        add_row(cols, [1.0] * len(cols), 1.0, 1.0)
        col += len(cols)
    pool_rows = []
    for p in range(P):
        cols, vals = [], []
        for gi, g in enumerate(groups):
            for k, o in enumerate(g.options):
                d = o.usage[p] - umin[gi][p]
                if d:
                    cols.append(group_cols[gi][k])
                    vals.append(d * pscale[p])
        if p in reserve_pools:
            cols.append(n_x + reserve_pools.index(p))
            vals.append(pscale[p])
        pool_rows.append(len(rows_lo))
        add_row(cols, vals, -inf, rhs[p] * pscale[p])
    for p in reserve_pools:
        m_col = n_x + reserve_pools.index(p)
        for gi, g in enumerate(groups):
            if any(o.reserve[p] for o in g.options):
                cols = [group_cols[gi][k] for k, o in enumerate(g.options) if o.reserve[p]]
                vals = [o.reserve[p] * pscale[p] for o in g.options if o.reserve[p]]
                add_row(cols + [m_col], vals + [-pscale[p]], -inf, 0.0)

    lp = highspy.HighsLp()
    lp.num_col_ = n_col
    lp.num_row_ = len(rows_lo)
    lp.col_cost_ = np.concatenate([costs * cscale, np.zeros(len(reserve_pools))])
    lp.col_lower_ = np.concatenate([np.zeros(n_x), [problem.fixed_reserve[p] * pscale[p] for p in reserve_pools]])
    lp.col_upper_ = np.concatenate([np.ones(n_x), np.full(len(reserve_pools), inf)])
    lp.row_lower_ = np.array(rows_lo)
    lp.row_upper_ = np.array(rows_hi)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.array(starts + [len(index)], dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value, dtype=np.float64)
    lp.a_matrix_.num_col_ = n_col
    lp.a_matrix_.num_row_ = len(rows_lo)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n_x + [highspy.HighsVarType.kContinuous] * len(reserve_pools)

    for attempt in range(4):
        h = _new_highs()
        for k, v in (("time_limit", float(max(time_limit - (time.perf_counter() - t0), 0.1))),
                     ("mip_rel_gap", float(rel_gap)), ("mip_abs_gap", 0.0), ("threads", 1),
                     ("random_seed", 0), ("mip_feasibility_tolerance", 1e-9),
                     ("primal_feasibility_tolerance", 1e-9)):
            h.setOptionValue(k, v)
        h.passModel(lp)
        h.run()
        status = h.modelStatusToString(h.getModelStatus())
        info = h.getInfo()
        if info.primal_solution_status != 2:  # no feasible solution
            if "nfeasible" in status:
                raise InfeasibleBudget(infeasible_message(problem, "no plan fits every pool at once"))
            raise SolverError(f"HiGHS found no solution ({status}) within {time_limit:.0f} s")
        x = np.asarray(h.getSolution().col_value[:n_x])
        choice = [int(np.argmax(x[cols])) for cols in group_cols]
        used, obj = problem.evaluate(choice)
        over = [used[p] - problem.capacities[p] for p in range(P)]
        if all(o <= 0 for o in over):
            bound = float(info.mip_dual_bound) / cscale
            gap = 0.0 if status == "Optimal" else float(info.mip_gap)
            return Solution(choice, "optimal" if status == "Optimal" else status.lower(), obj, bound, gap, used,
                            time.perf_counter() - t0, "highs")
        # rounding of a nearly-integral solution went over by a few bytes: tighten and solve again
        for p in range(P):
            if over[p] > 0:
                lp.row_upper_[pool_rows[p]] -= (over[p] + 1) * pscale[p]
    raise SolverError("HiGHS' solutions kept exceeding the budget after rounding (numerical trouble)")


# ------------------------------------------------------------------------------------------------- DP


def solve_dp(problem: Problem, max_states: int = 2_000_000) -> Solution:
    """Exact dynamic program over bytes used per pool (small problems; the tests' cross-check of the ILP).

    A reserve (max over chosen options) is handled by trying every threshold: options above it are dropped
    and the threshold comes off the capacity; the best over thresholds is the optimum.
    """
    t0 = time.perf_counter()
    P = problem.n_pools
    rpools = [p for p in range(P) if any(o.reserve[p] for g in problem.groups for o in g.options)]
    levels = [sorted({problem.fixed_reserve[p]} | {o.reserve[p] for g in problem.groups for o in g.options
                                                    if o.reserve[p] >= problem.fixed_reserve[p]}) for p in rpools]
    best: tuple[float, list[int]] | None = None
    for combo in _product(levels):
        th = dict(zip(rpools, combo))
        r = _dp_once(problem, th, max_states)
        if r is not None and (best is None or r[0] < best[0]):
            best = r
    if best is None:
        raise InfeasibleBudget(infeasible_message(problem, "no plan fits every pool at once"))
    used, obj = problem.evaluate(best[1])
    return Solution(best[1], "optimal", obj, obj, 0.0, used, time.perf_counter() - t0, "dp")


def _product(levels: list[list[int]]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for lv in levels:
        out = [o + (v,) for o in out for v in lv]
    return out


def _dp_once(problem: Problem, th: dict[int, int], max_states: int) -> tuple[float, list[int]] | None:
    P = problem.n_pools
    cap = [problem.capacities[p] - problem.fixed[p] - th.get(p, 0) for p in range(P)]
    states: dict[tuple[int, ...], tuple[float, tuple[int, ...] | None, int]] = {(0,) * P: (0.0, None, -1)}
    history = []
    for g in problem.groups:
        new: dict[tuple[int, ...], tuple[float, tuple[int, ...] | None, int]] = {}
        for s, (c, _, _) in states.items():
            for k, o in enumerate(g.options):
                if any(o.reserve[p] > v for p, v in th.items()):
                    continue
                ns = tuple(a + b for a, b in zip(s, o.usage))
                if any(ns[p] > cap[p] for p in range(P)):
                    continue
                nc = c + o.cost
                cur = new.get(ns)
                if cur is None or nc < cur[0]:
                    new[ns] = (nc, s, k)
        if not new:
            return None
        if len(new) > max_states:
            raise SolverError(f"the DP needs more than {max_states} states: use the ILP for problems this large")
        history.append(new)
        states = new
    end = min(states, key=lambda s: (states[s][0], s))
    choice = []
    s: tuple[int, ...] | None = end
    for layer in reversed(history):
        _, prev, k = layer[s]  # type: ignore[index]
        choice.append(k)
        s = prev
    choice.reverse()
    return states[end][0], choice


def solve(problem: Problem, method: str = "ilp", time_limit: float = 60.0) -> Solution:
    """Prune, check feasibility, then solve with ``method`` ("ilp" or "dp"). Options are renumbered by pruning:
    the returned choice indexes ``problem.groups[i].options`` after this call replaced them."""
    problem.groups = [prune(g) for g in problem.groups]
    small = problem.smallest()
    if any(s > c for s, c in zip(small, problem.capacities)):
        raise InfeasibleBudget(infeasible_message(problem, "the budget is too small"))
    if method == "ilp":
        return solve_ilp(problem, time_limit)
    if method == "dp":
        return solve_dp(problem)
    raise ValueError(f"unknown solver method {method!r}: use 'ilp' or 'dp'")


def infeasible_message(problem: Problem, why: str) -> str:
    small = problem.smallest()
    parts = []
    for name, cap, s in zip(problem.pool_names, problem.capacities, small):
        flag = "  <- too small" if s > cap else ""
        parts.append(f"pool {name}: budget {format_bytes(cap)}, smallest feasible {format_bytes(s)}{flag}")
    return (f"{why}: " + "; ".join(parts) + " (smallest = every tensor at its smallest admissible type, fixed "
            "tensors included; loosen --min/--pin or allow smaller --types to go lower)")


# ----------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a plan: its type, its bytes of data, its predicted cost (None for fixed tensors)."""

    name: str
    qtype: str
    n_bytes: int
    cost: float | None
    fixed: bool


@dataclass(frozen=True)
class PoolUse:
    name: str
    capacity: int
    used: int

    @property
    def left(self) -> int:
        return self.capacity - self.used


@dataclass
class Plan:
    """The optimizer's answer: a type for every tensor, what it uses of each pool, what was proven."""

    catalog: Catalog
    budget: Budget
    tensors: list[PlannedTensor]
    pools: list[PoolUse]
    status: str
    objective: float  # the minimized (weighted) predicted cost
    bound: float
    gap: float
    seconds: float
    method: str
    n_options: tuple[int, int] = (0, 0)  # options before and after pruning
    notes: list[str] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        """Bytes of tensor data of the planned GGUF."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        return 8.0 * self.n_bytes / self.catalog.n_elements

    @property
    def predicted_cost(self) -> float:
        """Sum of the cost table's (unweighted) predictions over the quantized tensors."""
        return sum(t.cost for t in self.tensors if t.cost is not None)

    def types(self) -> dict[str, str]:
        return {t.name: t.qtype for t in self.tensors}

    @property
    def dialect(self) -> str:
        return "ik" if any(get_type(t.qtype).ik_only for t in self.tensors if not t.fixed) else "llama"

    def to_spec(self) -> RecipeSpec:
        """A recipe typing every quantized tensor explicitly: one anchored rule per (tensor kind, type), layers
        folded into an alternation, so each tensor matches exactly one rule and nothing falls back."""
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        rules: list[Rule] = []
        by_name = self.catalog.by_name()
        for t in self.tensors:
            if t.fixed:
                continue
            info = by_name[t.name]
            if info.layer is None:
                rules.append(Rule("^" + re.escape(t.name) + "$", t.qtype, "plan"))
            else:
                groups[(t.name.split(".", 2)[2], t.qtype)].append(info.layer)
        for (stem, qtype), layers in groups.items():
            alt = "|".join(str(i) for i in sorted(layers))
            rules.append(Rule(rf"^blk\.({alt})\." + re.escape(stem) + "$", qtype, "plan"))
        return RecipeSpec(ftype=None, rules=rules, dialect=self.dialect,
                          label=f"plan {self.n_bytes / 1024**3:.2f} GiB ({self.bpw:.3f} BPW)")

    def resolution(self) -> Resolution:
        """The plan through the one resolver (what llama-quantize will do with its recipe)."""
        return resolve(self.catalog, self.to_spec())

    def write_recipe(self, path: str | Path) -> Path:
        """Write the recipe (atomically) in the dialect its types need: llama-quantize or ik_llama.cpp."""
        return write_recipe(self.resolution(), path, self.dialect)

    def override_tensor_arg(self) -> str | None:
        return self.budget.override_tensor_arg()

    def summary(self) -> str:
        lines = [(f"plan: {self.n_bytes:,} bytes of tensor data = {self.n_bytes / 1024**3:.3f} GiB, "
                 f"{self.bpw:.4f} BPW; {self.status} by {self.method} in {self.seconds:.2f} s, "
                 f"objective {self.objective:.6g}, gap {self.gap:.2e}")]
        for p in self.pools:
            lines.append(f"  pool {p.name}: used {format_bytes(p.used)} of {format_bytes(p.capacity)}, "
                         f"left {p.left:,} bytes")
        ot = self.override_tensor_arg()
        if ot:
            lines.append(f"  run with: {ot}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _fixed_type(t_source: str | None) -> str:
    # as recipe.resolve: a config-only catalog's untouched tensors are F32 (converted with --outtype f32)
    return t_source or "F32"


def build_problem(catalog: Catalog, candidates: dict[str, list[Candidate]], budget: Budget,
                  ties: list[tuple[str, ...]] = ()) -> Problem:
    """The knapsack of a catalog: one group per tie or untied quantizable tensor (options from its candidates,
    bytes per pool from the budget), the other tensors fixed at their stored type."""
    ch = budget.charger(catalog)
    by_name = catalog.by_name()
    P = len(budget.pools)
    fixed = [0] * P
    fixed_res = [0] * P
    for t in catalog:
        if t.name in candidates:
            continue
        if t.quantizable:
            raise ValueError(f"tensor {t.name}: quantizable but has no candidates")
        q = _fixed_type(t.source_type)
        for p, b in enumerate(ch.usage(t, q)):
            fixed[p] += b
        for p, b in enumerate(ch.reserve(t, q)):
            fixed_res[p] = max(fixed_res[p], b)
    tied = {n for g in ties for n in g}
    member_sets: list[tuple[str, ...]] = [tuple(g) for g in ties] + [(n,) for n in candidates if n not in tied]
    groups = []
    for members in sorted(member_sets, key=lambda m: m[0]):
        per = [{c.qtype: c for c in candidates[n]} for n in members]
        common = [q for q in (c.qtype for c in candidates[members[0]]) if all(q in d for d in per)]
        if not common:
            lists = "; ".join(f"{n}: {', '.join(d)}" for n, d in zip(members, per))
            raise InfeasibleBudget(f"tied tensors have no type in common ({lists})")
        opts = []
        for q in common:
            usage = [0] * P
            res = [0] * P
            for n in members:
                for p, b in enumerate(ch.usage(by_name[n], q)):
                    usage[p] += b
                for p, b in enumerate(ch.reserve(by_name[n], q)):
                    res[p] = max(res[p], b)
            opts.append(Option((q,) * len(members), tuple(usage), tuple(res), sum(d[q].cost for d in per)))
        groups.append(Group(members, opts))
    return Problem(tuple(p.name for p in budget.pools), tuple(p.capacity for p in budget.pools), groups,
                   tuple(fixed), tuple(fixed_res))


def optimize(catalog: Catalog, costs: CostTable, budget: Budget, constraints: Constraints | None = None, *,
             method: str = "ilp", time_limit: float = 60.0) -> Plan:
    """The least-cost plan within ``budget``: candidates and ties from ``constraints``, costs from ``costs``
    (tensor -> type -> predicted cost, e.g. KLD contribution), solved exactly."""
    cands = tensor_candidates(catalog, costs, constraints)
    ties = tie_groups(catalog, constraints)
    problem = build_problem(catalog, cands, budget, ties)
    n_before = sum(len(g.options) for g in problem.groups)
    sol = solve(problem, method, time_limit)
    n_after = sum(len(g.options) for g in problem.groups)
    notes = []
    if budget.placement is not None:
        residence = budget.charger(catalog).residence
        unloaded = [t.name for t in catalog if residence.get(t.name) == ()]
        if unloaded:
            notes.append(f"{len(unloaded)} NextN/MTP tensors are not loaded by llama.cpp without MTP decoding: "
                         f"no memory pool is charged for them")
    return plan_from_choice(catalog, costs, budget, problem, sol.choice, sol.usage, status=sol.status,
                            objective=sol.objective, bound=sol.bound, gap=sol.gap, seconds=sol.seconds,
                            method=sol.method, n_options=(n_before, n_after), notes=notes)


def check_before_measuring(catalog: Catalog, budget: Budget, constraints: Constraints | None,
                           candidates: Sequence[str]) -> None:
    """What a plan needs that no measurement changes, checked before the error table's long work (minutes on a
    tiny model, hours on a big one): every rule matches a tensor, every pin fits its tensor's rows, every tensor
    keeps an admissible type among ``candidates`` (the error names the row length and the rule that removed the
    last one), and the smallest admissible plan fits the budget. Raises ConstraintError or InfeasibleBudget."""
    names = [get_type(q).name for q in candidates]
    costs = {t.name: {q: 0.0 for q in names} for t in catalog if t.quantizable}
    cands = tensor_candidates(catalog, costs, constraints)
    problem = build_problem(catalog, cands, budget, tie_groups(catalog, constraints))
    small = problem.smallest()
    if any(sm > c for sm, c in zip(small, problem.capacities)):
        raise InfeasibleBudget(infeasible_message(problem, "the budget is too small"))


def plan_from_choice(catalog: Catalog, costs: CostTable, budget: Budget, problem: Problem, choice: Sequence[int],
                     usage: Sequence[int], *, status: str, objective: float, bound: float, gap: float,
                     seconds: float, method: str, n_options: tuple[int, int], notes: Sequence[str] = ()) -> Plan:
    """The :class:`Plan` of one option per group of ``problem`` (any allocator's answer, exact or not): each
    planned tensor carries its unweighted predicted cost from ``costs``; tensors outside every group keep
    their stored type."""
    chosen: dict[str, str] = {}
    for g, k in zip(problem.groups, choice):
        for n, q in zip(g.members, g.options[k].types):
            chosen[n] = q
    tensors = []
    for t in catalog:
        if t.name in chosen:
            q = chosen[t.name]
            raw = costs.get(t.name, {})
            cost = next((float(v) for k, v in raw.items() if get_type(k).name == q), 0.0)
            tensors.append(PlannedTensor(t.name, q, get_type(q).tensor_bytes(t.shape), cost, False))
        else:
            q = _fixed_type(t.source_type)
            tensors.append(PlannedTensor(t.name, q, get_type(q).tensor_bytes(t.shape), None, True))
    pools = [PoolUse(p.name, p.capacity, u) for p, u in zip(budget.pools, usage)]
    return Plan(catalog, budget, tensors, pools, status, objective, bound, gap, seconds, method, n_options,
                list(budget.notes) + list(notes))


def add_solver_arguments(parser: argparse.ArgumentParser) -> None:
    """The solver options of ``quantmix optimize``."""
    g = parser.add_argument_group("solver")
    g.add_argument("--solver", choices=("ilp", "dp"), default="ilp",
                   help="ilp: HiGHS integer program (default); dp: exact dynamic program (small problems only)")
    g.add_argument("--time-limit", type=float, default=60.0,
                   help="seconds HiGHS may spend; the plan reports its optimality gap if it stops early")
