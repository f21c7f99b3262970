"""Refinement against measured KLD: local search from the knapsack solution, as EvoPress does.

The additive model (predicted KLD = sum of per-tensor contributions) misses interactions between tensors.
Starting from the exact knapsack plan, each move raises one tensor (or tie group) to a larger type and lowers
another to a smaller one, keeping every pool within its budget; the move is measured on calibration tokens
(:class:`~quantmix.measurement.kld_probe.KLDProbe`, replaying from the first changed layer) and accepted
only when the measured KLD improves. Moves are drawn, with a seeded generator, among those the model predicts
to be nearly free (the near-ties are where its errors decide). When the time is up the winner is checked on
more tokens (a second probe on other calibration chunks); it is kept only if it wins there too.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, replace

from quantmix.measurement.kld_probe import KLDProbe
from quantmix.planning.constraints import Constraints, tensor_candidates, tie_groups
from quantmix.planning.solver import Plan, PlannedTensor, PoolUse, build_problem

__all__ = ["RefineResult", "refine"]


@dataclass
class RefineResult:
    plan: Plan
    predicted_before: float
    predicted_after: float
    measured_before: float  # on the search tokens
    measured_after: float  # of the returned plan (= measured_before when the check did not confirm)
    check_before: float | None  # on the check tokens (None: no check probe)
    check_after: float | None
    moves_tried: int
    moves_accepted: int
    kept: bool  # False: the check tokens did not confirm, the knapsack plan is returned
    seconds: float
    forward_tokens: int
    measured_found: float  # search tokens, the best plan the moves found (kept or not)

    def summary(self) -> str:
        s = (f"refinement: {self.moves_accepted} of {self.moves_tried} moves accepted in {self.seconds:.0f} s "
             f"({self.forward_tokens:,} forward-pass tokens); predicted KLD {self.predicted_before:.5f} -> "
             f"{self.predicted_after:.5f}; measured (search tokens) {self.measured_before:.5f} -> "
             f"{self.measured_after:.5f}")
        if not self.kept:
            s += f" (the moves found {self.measured_found:.5f})"
        if self.check_before is not None:
            s += (f"; check tokens {self.check_before:.5f} -> {self.check_after:.5f} "
                  f"({'kept' if self.kept else 'not confirmed: knapsack plan kept'})")
        return s


def refine(plan: Plan, costs: dict[str, dict[str, float]], probe: KLDProbe, constraints: Constraints | None = None,
           *, time_limit: float = 300.0, max_moves: int | None = None, seed: int = 0, pool_size: int = 24,
           check_probe: KLDProbe | None = None, progress: bool = True) -> RefineResult:
    """Improve ``plan`` by measured KLD: moves for ``time_limit`` seconds after the baseline measurement (at
    least one move when one exists), or ``max_moves`` moves.

    ``costs``: predicted KLD per (tensor, type) (the sensitivity-scaled table the plan was solved with)."""
    t0 = time.time()
    cat = plan.catalog
    cands = tensor_candidates(cat, costs, constraints)
    problem = build_problem(cat, cands, plan.budget, tie_groups(cat, constraints))
    types = plan.types()
    choice = []
    for g in problem.groups:
        want = tuple(types[n] for n in g.members)
        k = next((i for i, o in enumerate(g.options) if o.types == want), None)
        if k is None:
            raise ValueError(f"plan type {want} of {g.members[0]} is not among its candidates")
        choice.append(k)
    cap = problem.capacities
    f0 = probe.forward_tokens + (check_probe.forward_tokens if check_probe else 0)

    def current_types(ch: list[int]) -> dict[str, str]:
        out = dict(types)
        for g, k in zip(problem.groups, ch):
            out.update(zip(g.members, g.options[k].types))
        return out

    start_choice = list(choice)
    pred_before = problem.evaluate(choice)[1]
    probe.set_base(current_types(choice))
    measured = measured_before = probe.kld({})
    t_search = time.time()  # the time limit bounds the search, not the baseline measurement before it
    rng = random.Random(seed)
    tried: set[tuple] = set()
    n_tried = n_acc = 0
    order = [sorted(range(len(g.options)), key=lambda i: sum(g.options[i].usage)) for g in problem.groups]
    # only tensors the probe can measure move: a NextN layer's change would measure as free and be taken
    weights = set(probe.tensor_names)
    movable = [all(n in weights for n in g.members) for g in problem.groups]
    while (n_tried == 0 or time.time() - t_search < time_limit) and (max_moves is None or n_tried < max_moves):
        ups, downs = [], []
        for gi, (g, k) in enumerate(zip(problem.groups, choice)):
            if not movable[gi]:
                continue
            pos = order[gi].index(k)
            cur = g.options[k]
            if pos + 1 < len(order[gi]):
                nk = order[gi][pos + 1]
                ups.append((g.options[nk].cost - cur.cost, gi, nk))
            if pos > 0:
                nk = order[gi][pos - 1]
                downs.append((g.options[nk].cost - cur.cost, gi, nk))
        use, _ = problem.evaluate(choice)
        slack = [c - u for c, u in zip(cap, use)]

        def delta(gi: int, k: int) -> list[int]:
            cur, new = problem.groups[gi].options[choice[gi]], problem.groups[gi].options[k]
            return [a - b for a, b in zip(new.usage, cur.usage)]

        moves = []  # (predicted change, raised group, its option, lowered group, its option)
        up_d = [(du, gu, ku, delta(gu, ku)) for du, gu, ku in ups]
        down_d = [(dd, gd, kd, delta(gd, kd)) for dd, gd, kd in downs]
        for du, gu, ku, bu in up_d:
            for dd, gd, kd, bd in down_d:
                if gu == gd or any(x + y > sl for x, y, sl in zip(bu, bd, slack)):
                    continue  # the pair must fit in what is left of every pool
                if (tuple(choice), gu, ku, gd, kd) not in tried:
                    moves.append((du + dd, gu, ku, gd, kd))
        moves.sort()
        pick = None
        if moves:  # among the moves predicted nearly free, one drawn at random (the model's near-ties)
            m = rng.choice(moves[:pool_size])
            trial = list(choice)
            trial[m[1]], trial[m[3]] = m[2], m[4]
            pick = (m, trial)
        if pick is None:
            break
        m, trial = pick
        if any(u > c for u, c in zip(problem.evaluate(trial)[0], cap)):  # reserves (largest tensor) moved
            tried.add((tuple(choice), *m[1:]))
            continue
        tried.add((tuple(choice), *m[1:]))
        changes = {}
        for gi in (m[1], m[3]):
            g = problem.groups[gi]
            changes.update({n: q for n, q in zip(g.members, g.options[trial[gi]].types)})
        new = probe.kld_of_types(changes)
        n_tried += 1
        if new < measured:
            choice, measured = trial, new
            n_acc += 1
            probe.set_base(current_types(choice))
        if progress:
            print(f"\rrefine: {n_tried} moves, {n_acc} accepted, measured KLD {measured:.5f}", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    check_before = check_after = None
    kept = True
    if check_probe is not None and choice != start_choice:
        check_before = check_probe.kld(check_probe.quantized_changes(current_types(start_choice)))
        check_after = check_probe.kld(check_probe.quantized_changes(current_types(choice)))
        kept = check_after < check_before
    final = choice if kept else start_choice
    ft = current_types(final)
    tensors = [PlannedTensor(t.name, ft[t.name], t.n_bytes if t.fixed else _bytes(cat, t.name, ft[t.name]),
                             None if t.fixed else costs.get(t.name, {}).get(ft[t.name], 0.0), t.fixed)
               for t in plan.tensors]
    use, pred_after = problem.evaluate(final)
    pools = [PoolUse(p.name, p.capacity, u) for p, u in zip(plan.budget.pools, use)]
    refined = replace(plan, tensors=tensors, pools=pools, objective=pred_after,
                      method=plan.method + "+refine" if kept and final != start_choice else plan.method)
    return RefineResult(refined, pred_before, pred_after, measured_before, measured if kept else measured_before,
                        check_before, check_after, n_tried, n_acc, kept, time.time() - t0,
                        probe.forward_tokens + (check_probe.forward_tokens if check_probe else 0) - f0,
                        measured_found=measured)


def _bytes(cat: object, name: str, qtype: str) -> int:
    from quantmix.formats.registry import get_type

    return get_type(qtype).tensor_bytes(cat.by_name()[name].shape)  # type: ignore[attr-defined]
