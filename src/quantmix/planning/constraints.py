"""What the optimizer may choose for each tensor: candidate types, pins, bounds, ties, cost weights, presets.

Rules name tensors by regex (Python ``re.search`` on the GGUF name, e.g. ``blk\\.[0-2]\\.ffn_down``):

- ``--pin REGEX=TYPE``: exactly this type (the first matching pin wins; pinned tensors ignore bounds).
- ``--min REGEX=TYPE`` / ``--max REGEX=TYPE``: at least / at most this many bits per weight (types ordered by
  bits per weight, then by ggml's type order: ``--min attn=Q6_K`` admits Q6_K, Q8_0, F16...).
- ``--tie REGEX``: tensors whose names are equal once the matched part is blanked share one type:
  ``--tie 'ffn_(gate|up)'`` ties ``blk.N.ffn_gate_exps`` with ``blk.N.ffn_up_exps`` in every layer;
  ``--tie 'blk\\.\\d+'`` gives each kind of tensor one type in all layers.
- ``--weight REGEX=FACTOR``: multiply the predicted cost (a prior: "favour these tensors").

Tensors llama-quantize never quantizes (norms, biases, the expert router) keep their stored type (F32) and are
fixed: rules do not apply to them, but they still take their bytes from the budget.

A type whose block does not divide a tensor's rows is not a candidate for it (rather than being costed as
the type llama.cpp would fall back to): the fallback types (Q8_0, Q5_1, Q5_0, Q4_0, IQ4_NL) are candidates in
their own right, with their own measured errors, and a plan that names the type actually stored keeps the
recipe honest; ``resolve`` then never falls back.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from quantmix.formats.registry import RELEASE_QUANT_TYPES, UnknownTypeError, all_types, get_type
from quantmix.model.catalog import Catalog, TensorInfo

CostTable = Mapping[str, Mapping[str, float]]  # tensor name -> type name -> predicted cost (e.g. KLD)

_TYPE_ORDER = {t.name: i for i, t in enumerate(all_types())}
_EMBED_OUTPUT = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")


class ConstraintError(ValueError):
    """A rule is malformed, matches nothing, or leaves a tensor without any type; the message names it."""


def type_name(qtype: str, origin: str = "") -> str:
    try:
        return get_type(qtype).name
    except UnknownTypeError:
        raise ConstraintError(f"{origin}: unknown type {qtype!r}" if origin else f"unknown type {qtype!r}") from None


def type_rank(qtype: str) -> tuple[float, int]:
    """Order of types by bits per weight, ties broken by ggml's type order (Q4_0 < IQ4_NL < Q4_K at 4.5)."""
    t = get_type(qtype)
    return (t.bits_per_weight(), _TYPE_ORDER.get(t.name, 10**6))


def type_order(qtype: str) -> int:
    """ggml's type order (mainline enum order, then ik_llama.cpp's): the deterministic tie-breaker."""
    return _TYPE_ORDER.get(get_type(qtype).name, 10**6)


@dataclass(frozen=True)
class TypeRule:
    """``REGEX=TYPE`` with where it came from (``--pin 2``, ``preset moe-default``)."""

    pattern: str
    qtype: str
    origin: str

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def _compile(pattern: str, origin: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConstraintError(f"{origin}: {pattern!r} is not a valid regex ({e})") from None


def parse_type_rule(text: str, origin: str) -> TypeRule:
    """``REGEX=TYPE`` (split at the last ``=``, so the regex may contain one) -> TypeRule."""
    if "=" not in text:
        raise ConstraintError(f"{origin}: {text!r}: expected REGEX=TYPE")
    pattern, qtype = text.rsplit("=", 1)
    if not pattern or not qtype:
        raise ConstraintError(f"{origin}: {text!r}: expected REGEX=TYPE")
    _compile(pattern, origin)
    return TypeRule(pattern, type_name(qtype, origin), origin)


def parse_weight(text: str, origin: str) -> tuple[str, float, str]:
    """``REGEX=FACTOR`` -> (regex, factor, origin); the factor must be positive."""
    if "=" not in text:
        raise ConstraintError(f"{origin}: {text!r}: expected REGEX=FACTOR")
    pattern, f = text.rsplit("=", 1)
    _compile(pattern, origin)
    try:
        factor = float(f)
    except ValueError:
        raise ConstraintError(f"{origin}: {f!r} is not a number") from None
    if not (factor > 0 and math.isfinite(factor)):
        raise ConstraintError(f"{origin}: weight {f} must be positive")
    return pattern, factor, origin


@dataclass
class Constraints:
    """Rules for the candidate types. ``base`` holds a preset's rules, which the user's own rules override
    where they conflict (a user ``--max`` drops a preset ``--min`` above it on those tensors, and vice versa).
    ``types``: allowed types (None: every type the cost table has). ``imatrix=False``: the quantization runs
    without an importance matrix, so the types llama-quantize refuses without one are not candidates
    (except for token_embd and output, which it exempts)."""

    pins: list[TypeRule] = field(default_factory=list)
    mins: list[TypeRule] = field(default_factory=list)
    maxs: list[TypeRule] = field(default_factory=list)
    ties: list[tuple[str, str]] = field(default_factory=list)  # (regex, origin)
    weights: list[tuple[str, float, str]] = field(default_factory=list)
    types: tuple[str, ...] | None = None
    imatrix: bool = True
    base: Constraints | None = None
    label: str = ""

    # ---------------------------------------------------------------------------- per tensor

    def pin_for(self, name: str) -> TypeRule | None:
        for layer in (self, self.base):
            if layer is None:
                continue
            hit = next((r for r in layer.pins if r.matches(name)), None)
            if hit is not None:
                return hit
        return None

    def bounds_for(self, name: str) -> tuple[TypeRule | None, TypeRule | None]:
        """(lower, upper): the highest matching min and the lowest matching max, user over preset."""

        def pick(rules: list[TypeRule], hi: bool) -> TypeRule | None:
            hits = [r for r in rules if r.matches(name)]
            if not hits:
                return None
            return (max if hi else min)(hits, key=lambda r: type_rank(r.qtype))

        lo, up = pick(self.mins, True), pick(self.maxs, False)
        if self.base is not None:
            blo, bup = self.base.bounds_for(name)
            if lo is None and blo is not None and (up is None or type_rank(blo.qtype) <= type_rank(up.qtype)):
                lo = blo
            if up is None and bup is not None and (lo is None or type_rank(bup.qtype) >= type_rank(lo.qtype)):
                up = bup
        return lo, up

    def weight_for(self, name: str) -> float:
        w = 1.0
        for layer in (self, self.base):
            if layer is not None:
                for pat, f, _ in layer.weights:
                    if re.search(pat, name):
                        w *= f
        return w

    def all_ties(self) -> list[tuple[str, str]]:
        return self.ties + (self.base.all_ties() if self.base else [])

    def with_base(self, base: Constraints | None) -> Constraints:
        """These (user) rules on top of a preset's."""
        if base is None:
            return self
        return Constraints(self.pins, self.mins, self.maxs, self.ties, self.weights,
                           self.types if self.types is not None else base.types, self.imatrix and base.imatrix,
                           base, self.label or base.label)

    # ------------------------------------------------------------------------------- checks

    def check_matches(self, catalog: Catalog) -> None:
        """Every user rule must match at least one quantizable tensor (a typo should not pass silently)."""
        names = [t.name for t in catalog if t.quantizable]
        rules = [(r.pattern, r.origin) for r in self.pins + self.mins + self.maxs]
        rules += [(p, o) for p, _, o in self.weights] + list(self.ties)
        for pat, origin in rules:
            if origin.startswith("preset"):
                continue  # a preset names tensors some models lack (shared experts, dense layers)
            if not any(re.search(pat, n) for n in names):
                raise ConstraintError(f"{origin}: {pat!r} matches no quantizable tensor of {catalog.source}")


@dataclass(frozen=True)
class Candidate:
    """One admissible type for a tensor and its predicted cost (already weighted)."""

    qtype: str
    cost: float


def _requires_imatrix(t: TensorInfo, qtype: str) -> bool:
    return get_type(qtype).llama_quantize_requires_imatrix and t.name not in _EMBED_OUTPUT


def tensor_candidates(catalog: Catalog, costs: CostTable, constraints: Constraints | None = None
                      ) -> dict[str, list[Candidate]]:
    """Per quantizable tensor, its admissible types in ggml type order, with weighted costs.

    Errors name the tensor and say which rule left it without a type. A pinned type missing from the cost
    table is admitted with cost 0 (it is the same in every plan, so it does not change the choice).
    """
    c = constraints or Constraints()
    c.check_matches(catalog)
    allowed = None if c.types is None else {type_name(x, "--types") for x in c.types}
    out: dict[str, list[Candidate]] = {}
    for t in catalog:
        if not t.quantizable:
            continue
        row = costs.get(t.name)
        pin = c.pin_for(t.name)
        w = c.weight_for(t.name)
        if pin is not None:
            if not get_type(pin.qtype).fits_row(t.shape[0]):
                raise ConstraintError(f"{pin.origin}: tensor {t.name} cannot be {pin.qtype}: its rows of "
                                      f"{t.shape[0]} are not a multiple of the {get_type(pin.qtype).block_size}-block")
            cost = _row_cost(t, row, pin.qtype) if row and _has(row, pin.qtype) else 0.0
            out[t.name] = [Candidate(pin.qtype, cost * w)]
            continue
        if t.source_type in RELEASE_QUANT_TYPES:  # kept unless a rule pins another type
            # stored quantized by the release itself (gpt-oss's MXFP4 experts): kept as they are, as
            # llama-quantize does (it refuses to requantize them without --allow-requantize)
            out[t.name] = [Candidate(t.source_type, 0.0)]
            continue
        if row is None:
            raise ConstraintError(f"the cost table has no entry for tensor {t.name} (and no --pin names it)")
        types = sorted({type_name(q, f"cost table, tensor {t.name}") for q in row}, key=type_order)
        if not types:
            raise ConstraintError(f"the cost table has no types for tensor {t.name}")
        steps = [("the cost table", types)]
        if allowed is not None:
            types = [q for q in types if q in allowed]
            steps.append(("--types", types))
        types = [q for q in types if get_type(q).fits_row(t.shape[0])]
        steps.append((f"row length {t.shape[0]} (block fit)", types))
        if not c.imatrix:
            types = [q for q in types if not _requires_imatrix(t, q)]
            steps.append(("no imatrix (llama-quantize refuses IQ1/IQ2/IQ3_XXS without one)", types))
        lo, up = c.bounds_for(t.name)
        if lo is not None:
            types = [q for q in types if type_rank(q) >= type_rank(lo.qtype)]
            steps.append((f"{lo.origin} (at least {lo.qtype})", types))
        if up is not None:
            types = [q for q in types if type_rank(q) <= type_rank(up.qtype)]
            steps.append((f"{up.origin} (at most {up.qtype})", types))
        if not types:
            trail = "; ".join(f"after {what}: {', '.join(ts) or 'none'}" for what, ts in steps)
            raise ConstraintError(f"tensor {t.name} has no admissible type ({trail})")
        out[t.name] = [Candidate(q, _row_cost(t, row, q) * w) for q in types]
    return out


def _has(row: Mapping[str, float], qtype: str) -> bool:
    return any(get_type(k).name == qtype for k in row)


def _row_cost(t: TensorInfo, row: Mapping[str, float] | None, qtype: str) -> float:
    assert row is not None
    v = next(v for k, v in row.items() if get_type(k).name == qtype)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConstraintError(f"cost table, tensor {t.name}, type {qtype}: {v!r} is not a number") from None
    if not math.isfinite(f):
        raise ConstraintError(f"cost table, tensor {t.name}, type {qtype}: cost {v} is not finite")
    return f


def tie_groups(catalog: Catalog, constraints: Constraints | None = None) -> list[tuple[str, ...]]:
    """Groups of quantizable tensors that must share one type (two or more each), in catalog order."""
    c = constraints or Constraints()
    names = [t.name for t in catalog if t.quantizable]
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for pat, origin in c.all_ties():
        rx = re.compile(pat)
        keys: dict[str, list[str]] = {}
        for n in names:
            if rx.search(n):
                keys.setdefault(rx.sub("\x00", n), []).append(n)
        groups = [g for g in keys.values() if len(g) > 1]
        if keys and not groups and not origin.startswith("preset"):
            raise ConstraintError(f"{origin}: {pat!r} ties nothing together (no two tensor names differ only "
                                  f"in the matched part)")
        for g in groups:
            for n in g[1:]:
                parent[find(n)] = find(g[0])
    comp: dict[str, list[str]] = {}
    for n in names:
        comp.setdefault(find(n), []).append(n)
    return [tuple(g) for g in comp.values() if len(g) > 1]


# --------------------------------------------------------------------------------------------- presets


def _first_layers(catalog: Catalog) -> str:
    """Regex of the first eighth of the layers (llama.cpp's use_more_bits gives them more bits)."""
    n = max(1, catalog.hparams.n_layer // 8)
    return r"^blk\.(" + "|".join(str(i) for i in range(n)) + r")\."


def _last_layers(catalog: Catalog) -> str:
    n_layer = catalog.hparams.n_layer - catalog.hparams.n_nextn
    first = n_layer - max(1, catalog.hparams.n_layer // 8)
    return r"^blk\.(" + "|".join(str(i) for i in range(first, n_layer)) + r")\."


def _rules(kind: str, pairs: list[tuple[str, str]], origin: str) -> list[TypeRule]:
    return [TypeRule(p, type_name(q), f"{origin} ({kind} {p}={q})") for p, q in pairs]


def preset_moe_default(catalog: Catalog) -> Constraints:
    """``moe-default``: what makers of MoE quants do by hand (the ``Q6_K-IQ2_S-IQ2_S-IQ3_S`` style of mix).

    - Everything that runs for every token stays at Q6_K or more: attention (``attn_*``, MLA's projections
      included), shared experts (``*_shexp``), the dense FFN of the leading dense layers, and ``output``; their
      bytes are few next to the routed experts, and errors there hit every token.
    - ``token_embd`` at least Q4_K: a lookup table, tolerant, but quant makers do not go lower.
    - Routed experts: ``ffn_gate_exps`` and ``ffn_up_exps`` of a layer share a type (they are applied to the same
      input and always quantized alike); ``ffn_down_exps`` is favoured (cost weight 2, about half a bit more at
      the margin), and doubly so in the first eighth of the layers (weight 4), where llama.cpp's own mixes
      spend more bits on ffn_down.
    - Shared experts' gate/up tied likewise.
    """
    o = "preset moe-default"
    mins = _rules("min", [(r"\.attn_", "Q6_K"), (r"_shexp\.", "Q6_K"), (r"\.ffn_(gate|up|down)\.weight$", "Q6_K"),
                          (r"^output\.weight$", "Q6_K"), (r"^token_embd\.weight$", "Q4_K")], o)
    ties = [(r"ffn_(gate|up)_exps", f"{o} (tie)"), (r"ffn_(gate|up)_shexp", f"{o} (tie)")]
    weights = [(r"\.ffn_down_exps\.", 2.0, o), (_first_layers(catalog) + r"ffn_down_exps\.", 2.0, o)]
    return Constraints(mins=mins, ties=ties, weights=weights, label="moe-default")


def preset_dense_default(catalog: Catalog) -> Constraints:
    """``dense-default``: llama.cpp's Q*_K_M heuristics, as constraints and cost weights.

    - ``output`` at least Q6_K (every llama.cpp mix but the lowest puts it there); ``token_embd`` at least Q4_K.
    - ``attn_v`` favoured (cost weight 2): llama.cpp bumps attn_v in nearly every mix, it is small, and
      grouped-query attention shares each V head across several query heads.
    - ``ffn_down`` favoured (weight 1.5), and again in the first and last eighth of the layers (weight 2 more),
      following ``use_more_bits``.
    - ``ffn_gate`` and ``ffn_up`` of a layer share a type.
    """
    o = "preset dense-default"
    mins = _rules("min", [(r"^output\.weight$", "Q6_K"), (r"^token_embd\.weight$", "Q4_K")], o)
    ties = [(r"ffn_(gate|up)\.", f"{o} (tie)")]
    weights = [(r"\.attn_v\.", 2.0, o), (r"\.ffn_down\.", 1.5, o),
               (_first_layers(catalog) + r"ffn_down\.", 2.0, o), (_last_layers(catalog) + r"ffn_down\.", 2.0, o)]
    return Constraints(mins=mins, ties=ties, weights=weights, label="dense-default")


PRESETS = {"moe-default": preset_moe_default, "dense-default": preset_dense_default}


def preset(name: str, catalog: Catalog) -> Constraints | None:
    """A preset by name: ``moe-default``, ``dense-default``, ``auto`` (by whether the model has experts), ``none``."""
    if name == "none":
        return None
    if name == "auto":
        name = "moe-default" if catalog.hparams.n_expert > 0 else "dense-default"
    if name not in PRESETS:
        raise ConstraintError(f"unknown preset {name!r}; known: auto, none, {', '.join(PRESETS)}")
    return PRESETS[name](catalog)


# ------------------------------------------------------------------------------------------------- CLI


def add_constraint_arguments(parser: argparse.ArgumentParser) -> None:
    """The constraint options of ``quantmix optimize``."""
    g = parser.add_argument_group("constraints")
    g.add_argument("--preset", default="none", help="auto, none, " + ", ".join(PRESETS))
    g.add_argument("--pin", action="append", default=[], metavar="REGEX=TYPE", help="exactly this type")
    g.add_argument("--min", action="append", default=[], metavar="REGEX=TYPE", help="at least this many bits")
    g.add_argument("--max", action="append", default=[], metavar="REGEX=TYPE", help="at most this many bits")
    g.add_argument("--tie", action="append", default=[], metavar="REGEX",
                   help="tensors whose names differ only in the matched part share a type")
    g.add_argument("--weight", action="append", default=[], metavar="REGEX=FACTOR",
                   help="multiply these tensors' predicted cost (favour them)")
    g.add_argument("--types", default=None, help="comma-separated types the optimizer may use, or 'all' (default: all costed; on a CPU the "
                        "error table skips the codebook IQ1_S..IQ3_S types unless they are named or 'all' is given)")
    g.add_argument("--no-imatrix", action="store_true",
                   help="no importance matrix: leave out the types llama-quantize refuses without one")


def constraints_from_args(args: argparse.Namespace, catalog: Catalog) -> Constraints:
    """Build the constraints the options ask for (the user's rules on top of the preset's)."""
    c = Constraints(
        pins=[parse_type_rule(x, f"--pin {i + 1}") for i, x in enumerate(args.pin)],
        mins=[parse_type_rule(x, f"--min {i + 1}") for i, x in enumerate(args.min)],
        maxs=[parse_type_rule(x, f"--max {i + 1}") for i, x in enumerate(args.max)],
        ties=[(x, f"--tie {i + 1}") for i, x in enumerate(args.tie)],
        weights=[parse_weight(x, f"--weight {i + 1}") for i, x in enumerate(args.weight)],
        types=tuple(type_name(x.strip(), "--types") for x in args.types.split(",") if x.strip())
        if args.types and args.types.strip().lower() != "all" else None,
        imatrix=not args.no_imatrix,
    )
    for pat, o in c.ties:
        _compile(pat, o)
    return c.with_base(preset(args.preset, catalog))
