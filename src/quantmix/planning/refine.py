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

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from quantmix.measurement.kld_probe import KLDProbe, ProbeDeadline
from quantmix.planning.constraints import Constraints, tensor_candidates, tie_groups
from quantmix.planning.solver import Plan, PlannedTensor, PoolUse, build_problem

__all__ = ["RefineResult", "refine"]

_STATE_FORMAT = 1


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
    time_bound: bool = False  # the wall-clock limit stopped the search before its move budget

    def summary(self) -> str:
        s = (f"refinement: {self.moves_accepted} of {self.moves_tried} moves accepted in {self.seconds:.0f} s "
             f"({self.forward_tokens:,} forward-pass tokens); predicted KLD {self.predicted_before:.5f} -> "
             f"{self.predicted_after:.5f}; measured (search tokens) {self.measured_before:.5f} -> "
             f"{self.measured_after:.5f}")
        if not self.kept:
            s += f" (the moves found {self.measured_found:.5f})"
        if self.time_bound:
            s += ("; stopped by the time limit, not the move budget: the recipe depends on this machine's speed "
                  "(a larger --refine-time lets the --refine-moves budget decide)")
        if self.check_before is not None:
            s += (f"; check tokens {self.check_before:.5f} -> {self.check_after:.5f} "
                  f"({'kept' if self.kept else 'not confirmed: knapsack plan kept'})")
        return s


def refine(plan: Plan, costs: dict[str, dict[str, float]], probe: KLDProbe, constraints: Constraints | None = None,
           *, time_limit: float = 300.0, max_moves: int | None = None, seed: int = 0, pool_size: int = 24,
           check_probe: KLDProbe | None = None, progress: bool = True, batch: int | None = None,
           state_dir: Path | None = None) -> RefineResult:
    """Improve ``plan`` by measured KLD: ``max_moves`` moves (a budget that gives the same answer on any
    machine), within ``time_limit`` seconds of search as an outer bound, checked between layers inside a round
    (a round cut short is dropped; the result says when the time limit bound).

    ``costs``: predicted KLD per (tensor, type) (the sensitivity-scaled table the plan was solved with).
    ``batch``: moves measured together per round, breadth first (:meth:`KLDProbe.kld_many`: one pass over the
    layers for the whole round); the best improving one is taken, the other improving ones are tried first in
    the next round. Default: 1 when every layer stays resident (a move costs only its own layers then), else as
    many as the probe's state memory holds, at most 16. ``state_dir``: the search state is saved there after
    every round (atomically, in a file named by the hash of every input) and a rerun with the same inputs
    continues from it (after kill -9 too; with larger limits, further); a finished search is returned from it
    without measuring."""
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
    if batch is None:
        streamed = any(not probe.engine.is_resident(i) for i in range(probe.n_layer))
        batch = min(probe.group_size(), 16) if streamed else 1
    batch = max(1, batch)

    try:
        return _search(plan, costs, probe, problem, types, choice, batch, time_limit=time_limit,
                       max_moves=max_moves, seed=seed, pool_size=pool_size, check_probe=check_probe,
                       progress=progress, state_dir=state_dir, t0=t0)
    finally:
        probe.set_base({})  # the probe is left as found (recorded again only when it next measures)


def _search(plan: Plan, costs: dict[str, dict[str, float]], probe: KLDProbe, problem: object,
            types: dict[str, str], choice: list[int], batch: int, *, time_limit: float, max_moves: int | None,
            seed: int, pool_size: int, check_probe: KLDProbe | None, progress: bool, state_dir: Path | None,
            t0: float) -> RefineResult:
    """The rounds of moves from ``choice`` (one option per group of ``problem``), the check, the result."""
    cat = plan.catalog
    cap = problem.capacities

    def current_types(ch: list[int]) -> dict[str, str]:
        out = dict(types)
        for g, k in zip(problem.groups, ch):
            out.update(zip(g.members, g.options[k].types))
        return out

    def changes_of(ch: list[int], groups: tuple[int, ...]) -> dict[str, str]:
        t = {}
        for gi in groups:
            g = problem.groups[gi]
            t.update(zip(g.members, g.options[ch[gi]].types))
        return probe.changes_over_base(t)

    start_choice = list(choice)
    pred_before = problem.evaluate(choice)[1]
    key = _state_key(probe, check_probe, problem, choice, seed, pool_size, batch)
    state_path = state_dir / f"{key[:32]}.json" if state_dir is not None else None
    st = _load_state(state_path, key)
    rng = random.Random(seed)
    if st is None:
        st = {"key": key, "choice": choice, "measured": None, "measured_before": None, "tried": [],
              "n_tried": 0, "n_acc": 0, "search_s": 0.0, "promising": [], "rng": None, "exhausted": False,
              "check": None, "forward_tokens": 0}
    else:
        if progress:
            print(f"refine: resuming after {st['n_tried']} moves ({st['n_acc']} accepted) from {state_path}",
                  file=sys.stderr)
        choice = list(st["choice"])
        v = st["rng"]
        rng.setstate((v[0], tuple(v[1]), v[2]))
    f0 = probe.forward_tokens + (check_probe.forward_tokens if check_probe else 0) - st["forward_tokens"]
    tried = {(tuple(t[0]), *t[1:]) for t in st["tried"]}  # (plan the move was made from, the move)

    def save() -> None:
        st.update(choice=list(choice), tried=[[list(t[0]), *t[1:]] for t in sorted(tried)], rng=list(rng.getstate()),
                  forward_tokens=probe.forward_tokens + (check_probe.forward_tokens if check_probe else 0) - f0)
        _save_state(state_path, st)

    order = [sorted(range(len(g.options)), key=lambda i: sum(g.options[i].usage)) for g in problem.groups]
    # only tensors the probe can measure move: a NextN layer's change would measure as free and be taken
    weights = set(probe.tensor_names)
    movable = [all(n in weights for n in g.members) for g in problem.groups]
    probe.set_base(current_types(choice))  # measured (recorded) only when a measurement follows
    if st["measured"] is None:
        st["measured"] = st["measured_before"] = probe.kld({})
        save()
    t_search = time.time() - st["search_s"]  # the limit bounds the search, not the baseline measurement
    deadline = time.monotonic() + max(0.0, time_limit - st["search_s"])
    searched = time_bound = False
    while not st["exhausted"] and (max_moves is None or st["n_tried"] < max_moves):
        if time.time() - t_search >= time_limit:
            time_bound = True
            break
        rng_before, tried_before = rng.getstate(), set(tried)  # a round cut short is undone whole
        round_moves = _draw_round(problem, choice, order, movable, cap, tried, st["promising"], rng, pool_size,
                                  batch if max_moves is None else min(batch, max_moves - st["n_tried"]))
        if not round_moves:
            st["exhausted"] = True
            save()
            break
        searched = True
        trials = []
        for m in round_moves:
            tried.add((tuple(choice), *m))
            trial = list(choice)
            trial[m[0]], trial[m[2]] = m[1], m[3]
            trials.append(trial)
        try:
            klds = [float(k.mean()) for k in probe.kld_many(
                [changes_of(t, (m[0], m[2])) for t, m in zip(trials, round_moves)], deadline=deadline)]
        except ProbeDeadline:  # not measured: a rerun with more time draws the same round again
            rng.setstate(rng_before)
            tried = tried_before
            time_bound = True
            break
        st["n_tried"] += len(trials)
        before = st["measured"]
        best = min(range(len(trials)), key=lambda i: (klds[i], i))
        if klds[best] < before:
            choice, st["measured"] = trials[best], klds[best]
            st["n_acc"] += 1
            probe.set_base(current_types(choice))
        # the other moves that improved on the old plan are tried first next round (on the new plan)
        st["promising"] = [list(round_moves[i]) for i in sorted(range(len(trials)), key=lambda i: (klds[i], i))
                           if i != best and klds[i] < before]
        st["search_s"] = time.time() - t_search
        save()
        if progress:
            print(f"\rrefine: {st['n_tried']} moves, {st['n_acc']} accepted, measured KLD {st['measured']:.5f}",
                  end="", file=sys.stderr, flush=True)
    if progress and searched:
        print(file=sys.stderr)
    check_before = check_after = None
    if check_probe is not None and choice != start_choice:
        if st["check"] is None or st["check"][0] != choice:
            a, b = check_probe.kld_many([check_probe.quantized_changes(current_types(start_choice)),
                                         check_probe.quantized_changes(current_types(choice))])
            st["check"] = [list(choice), float(a.mean()), float(b.mean())]
            save()
        check_before, check_after = st["check"][1:]
    kept = check_after is None or check_after < check_before
    measured, measured_before = st["measured"], st["measured_before"]
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
                        check_before, check_after, st["n_tried"], st["n_acc"], kept, time.time() - t0,
                        st["forward_tokens"], measured_found=measured, time_bound=time_bound)


def _draw_round(problem: object, choice: list[int], order: list[list[int]], movable: list[bool], cap: list[int],
                tried: set[tuple], promising: list[list[int]], rng: random.Random, pool_size: int,
                want: int) -> list[tuple[int, int, int, int]]:
    """Up to ``want`` untried moves (raised group, its option, lowered group, its option) that keep every pool
    within its capacity: last round's improving moves first, then a seeded draw among the ``pool_size`` moves
    the additive model predicts nearly free (its near-ties are where its errors decide)."""
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
    down_d = [(dd, gd, kd, delta(gd, kd)) for dd, gd, kd in downs]
    for du, gu, ku in ups:
        bu = delta(gu, ku)
        for dd, gd, kd, bd in down_d:
            if gu == gd or any(x + y > sl for x, y, sl in zip(bu, bd, slack)):
                continue  # the pair must fit in what is left of every pool
            if (tuple(choice), gu, ku, gd, kd) not in tried:
                moves.append((du + dd, gu, ku, gd, kd))
    moves.sort()

    def fits(m: tuple[int, int, int, int]) -> bool:  # reserves (the largest tensor) can move with a pair
        trial = list(choice)
        trial[m[0]], trial[m[2]] = m[1], m[3]
        return all(u <= c for u, c in zip(problem.evaluate(trial)[0], cap))

    valid = {m[1:] for m in moves}
    out = [tuple(m) for m in promising if tuple(m) in valid and fits(tuple(m))][:want]
    pool = [m[1:] for m in moves[:pool_size] if m[1:] not in out]
    while len(out) < want and pool:
        m = pool.pop(rng.randrange(len(pool)))
        if fits(m):
            out.append(m)
        else:
            tried.add((tuple(choice), *m))
    return out


def _state_key(probe: KLDProbe, check_probe: KLDProbe | None, problem: object, choice: list[int], seed: int,
               pool_size: int, batch: int) -> str:
    """Every input of a search: the probes, the problem (groups, options, capacities), the start, the draw."""
    h = hashlib.sha256()
    h.update(json.dumps([_STATE_FORMAT, probe.identity(), check_probe.identity() if check_probe else None,
                         problem.capacities, choice, seed, pool_size, batch]).encode())
    for g in problem.groups:
        h.update(json.dumps([g.members, [[o.types, o.usage, o.cost] for o in g.options]]).encode())
    return h.hexdigest()


def _load_state(path: Path | None, key: str) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged state is measured again, never trusted
    return st if isinstance(st, dict) and st.get("key") == key else None


def _save_state(path: Path | None, st: dict) -> None:
    if path is None:
        return
    from quantmix.planning.recipe import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(st) + "\n")


def _bytes(cat: object, name: str, qtype: str) -> int:
    from quantmix.formats.registry import get_type

    return get_type(qtype).tensor_bytes(cat.by_name()[name].shape)  # type: ignore[attr-defined]
