"""Recipes: which GGML type each tensor gets, read and written in the forms quant makers use.

Forms read: llama-quantize's ``--tensor-type PATTERN=TYPE`` rules and ``--tensor-type-file`` (with or without a
file type for the tensors no rule matches), ik_llama.cpp's ``--custom-q "re1=t1,re2=t2"`` lists, and the
``[Default]-[FFN_UP]-[FFN_GATE]-[FFN_DOWN]`` shorthand (``Q6_K-IQ2_S-IQ2_S-IQ3_S``). Every form resolves
through :func:`resolve`, the one resolver: it applies llama.cpp's exact semantics (which tensors are quantized,
rule matching, default mixes, shape fallback) by way of :mod:`quantmix.planning.llama_rules`, and is what size
accounting, the GGUF writer and the optimizer all use.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from quantmix.formats.registry import UnknownTypeError, get_type
from quantmix.model.catalog import Catalog, TensorInfo
from quantmix.paths import temp_beside
from quantmix.planning import llama_rules
from quantmix.planning.llama_rules import LlamaRulesError, MixHParams, TensorDecision

# A nominal quantized file type for recipes whose rules cover every tensor: llama-quantize ignores all
# --tensor-type rules under a float file type, so a recipe must run under a quantized one.
NOMINAL_FTYPE = "Q8_0"


class RecipeError(ValueError):
    """A recipe is malformed or does not apply to the model; the message names the line or tensor."""


@dataclass(frozen=True)
class Rule:
    """One ``PATTERN=TYPE`` rule, with where it came from (``recipe.txt:3``) for error messages."""

    pattern: str
    qtype: str
    origin: str = ""


@dataclass
class RecipeSpec:
    """What the user asked for: a file type (the mix for tensors no rule matches) and rules.

    ``dialect``: ``"llama"`` (pattern lower-cased, regex search, first match wins) or ``"ik"``
    (ik_llama.cpp --custom-q: case-sensitive). ``ftype=None`` means the rules must cover every quantizable
    tensor (quantmix's own recipes end in a catch-all). ``keep_source`` means "as stored" (a published GGUF).
    """

    ftype: str | None = None
    rules: list[Rule] = field(default_factory=list)
    dialect: str = "llama"
    label: str = ""
    keep_source: bool = False

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.keep_source:
            return "as stored"
        return f"{self.ftype or 'rules'}" + (f" + {len(self.rules)} rules" if self.rules and self.ftype else "")


@dataclass(frozen=True)
class Assignment:
    """The resolved type of one tensor, and why."""

    tensor: TensorInfo
    qtype: str
    reason: str
    fell_back: bool = False
    requested: str | None = None  # type before the shape fallback, when it fell back

    @property
    def n_bytes(self) -> int:
        return int(get_type(self.qtype).tensor_bytes(self.tensor.shape))


@dataclass
class Resolution:
    """A recipe applied to a catalog: exactly one type per tensor, in llama-quantize's order."""

    catalog: Catalog
    spec: RecipeSpec
    assignments: list[Assignment]

    def types(self) -> dict[str, str]:
        return {a.tensor.name: a.qtype for a in self.assignments}

    @property
    def n_bytes(self) -> int:
        return sum(a.n_bytes for a in self.assignments)

    @property
    def fallbacks(self) -> list[Assignment]:
        return [a for a in self.assignments if a.fell_back]


# ------------------------------------------------------------------------------------------------ parsing


def _check_type(qtype: str, origin: str) -> str:
    try:
        return get_type(qtype).name
    except UnknownTypeError:
        raise RecipeError(f"{origin}: unknown type {qtype!r}") from None


def _check_regex(pattern: str, origin: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"{origin}: pattern {pattern!r} is not a valid regex ({e})") from None


def parse_rule(text: str, origin: str) -> Rule:
    """``PATTERN=TYPE`` -> Rule; a clear error naming ``origin`` otherwise."""
    if "=" not in text:
        raise RecipeError(f"{origin}: malformed rule {text!r}: expected PATTERN=TYPE")
    pattern, qtype = text.split("=", 1)
    if not pattern:
        raise RecipeError(f"{origin}: rule {text!r} has no pattern")
    if not qtype:
        raise RecipeError(f"{origin}: rule {text!r} has no type")
    _check_regex(pattern, origin)
    return Rule(pattern, _check_type(qtype, origin), origin)


def parse_tensor_type_file(path: str | Path) -> list[Rule]:
    """llama-quantize ``--tensor-type-file``: whitespace-separated PATTERN=TYPE tokens, in order."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise RecipeError(f"{p}: cannot read recipe ({e.strerror})") from None
    rules = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in line.split():
            rules.append(parse_rule(token, f"{p}:{lineno}"))
    if not rules:
        raise RecipeError(f"{p}: recipe has no rules")
    return rules


def parse_custom_q(text: str, origin: str = "--custom-q") -> list[Rule]:
    """ik_llama.cpp ``--custom-q "re1=t1,re2=t2"``: comma-separated, split at the first '='."""
    rules = []
    for i, item in enumerate(text.split(","), 1):
        item = item.strip()
        if not item:
            raise RecipeError(f"{origin} item {i}: empty rule")
        rules.append(parse_rule(item, f"{origin} item {i}"))
    return rules


def parse_shorthand(text: str) -> RecipeSpec:
    """``[Default]-[FFN_UP]-[FFN_GATE]-[FFN_DOWN]``: Default for every quantizable tensor but the routed
    experts' up, gate and down (token_embd and output included)."""
    parts = text.strip().split("-")
    if len(parts) != 4 or not all(parts):
        raise RecipeError(
            f"mix {text!r}: expected four types Default-FFN_UP-FFN_GATE-FFN_DOWN, e.g. Q6_K-IQ2_S-IQ2_S-IQ3_S"
        )
    names = ("Default", "FFN_UP", "FFN_GATE", "FFN_DOWN")
    default, up, gate, down = (_check_type(p, f"mix {text!r} ({n})") for p, n in zip(parts, names))
    rules = [
        Rule(r"ffn_up_exps\.", up, "mix FFN_UP"),
        Rule(r"ffn_gate_exps\.", gate, "mix FFN_GATE"),
        Rule(r"ffn_down_exps\.", down, "mix FFN_DOWN"),
        Rule(".*", default, "mix Default"),
    ]
    return RecipeSpec(ftype=None, rules=rules, label=text.strip().upper())


def parse_custom_q_file(path: Path) -> list[Rule]:
    """An ik_llama.cpp recipe as quant makers publish it: ``regex=type`` rules separated by commas or newlines,
    ``#`` comments (they strip them before joining the lines into one ``--custom-q`` argument)."""
    rules = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        for i, item in enumerate(x.strip() for x in line.split(",")):
            if item:
                rules.append(parse_rule(item, f"{path}:{lineno}" + (f" item {i + 1}" if "," in line else "")))
    if not rules:
        raise RecipeError(f"{path}: recipe has no rules")
    return rules


def _looks_like_ik(text: str) -> bool:
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if any(ln.startswith("#") for ln in text.splitlines()) or (len(lines) == 1 and "," in lines[0]):
        return True
    for token in " ".join(lines).replace(",", " ").split():
        qtype = token.rsplit("=", 1)[-1]
        try:
            if get_type(qtype).ik_only:
                return True
        except UnknownTypeError:
            pass
    return False


def load_recipe(path: str | Path, ftype: str | None = None, dialect: str | None = None) -> RecipeSpec:
    """A recipe file: a llama-quantize ``--tensor-type-file`` (dialect "llama"), or an ik_llama.cpp
    ``--custom-q`` list (dialect "ik": commas or newlines, ``#`` comments). ``dialect=None`` tells them apart:
    comments, a single comma-separated line, or ik-only types mean ik."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: no such recipe file")
    if dialect is None:
        dialect = "ik" if _looks_like_ik(p.read_text()) else "llama"
    if dialect == "ik":
        return RecipeSpec(ftype=ftype, rules=parse_custom_q_file(p), dialect="ik", label=p.name)
    if dialect != "llama":
        raise RecipeError(f"unknown recipe dialect {dialect!r}: use 'llama' or 'ik'")
    return RecipeSpec(ftype=ftype, rules=parse_tensor_type_file(p), label=p.name)


# ------------------------------------------------------------------------------------------------ resolving


def _mix_hparams(catalog: Catalog) -> MixHParams:
    hp = catalog.hparams
    return MixHParams(arch=hp.arch, n_layer=hp.n_layer, n_expert=hp.n_expert, n_head=hp.n_head,
                      n_head_kv=hp.n_head_kv, n_layer_nextn=hp.n_nextn)


def _source_type(t: TensorInfo) -> str:
    # A config-only catalog has no stored types: llama.cpp's converter writes 1-D tensors and the tensors
    # llama-quantize leaves alone (router, ...) in F32 when converting with --outtype f32.
    return t.source_type or "F32"


def _ik_rules_as_llama(catalog: Catalog, rules: list[Rule]) -> tuple[list[Rule], dict[str, str]]:
    """ik matching is case-sensitive and does not lower-case patterns: resolve it here, tensor by tensor, and
    hand the llama resolver one exact-name rule per matched tensor (same result, one resolver). Types only
    ik_llama.cpp has stand in as a mainline type of the same block size; returns the rules and, per tensor,
    the ik type to put back."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    out, ik_types = [], {}
    for t in catalog:
        hit = next((r for rx, r in compiled if rx.search(t.name)), None)
        if hit is None:
            continue
        qtype = hit.qtype
        if get_type(qtype).ik_only:
            ik_types[t.name] = qtype
            qtype = _IK_STAND_IN[get_type(qtype).block_size]
        out.append(Rule("^" + re.escape(t.name) + "$", qtype, hit.origin))
    return out, ik_types


_IK_STAND_IN = {32: "Q8_0", 64: "Q2_0", 256: "Q4_K"}


def resolve(catalog: Catalog, spec: RecipeSpec, *, imatrix_present: bool = False) -> Resolution:
    """Apply a recipe to a catalog: one type per tensor, exactly as llama-quantize would choose it."""
    if spec.keep_source:
        missing = [t.name for t in catalog if t.source_type is None]
        if missing:
            raise RecipeError(f"{catalog.source}: no stored types to keep (not a GGUF); first: {missing[0]}")
        return Resolution(catalog, spec, [Assignment(t, t.source_type or "F32", "as stored") for t in catalog])
    rules, ik_types = _ik_rules_as_llama(catalog, spec.rules) if spec.dialect == "ik" else (spec.rules, {})
    ftype = spec.ftype or NOMINAL_FTYPE
    entries = [(t.name, t.shape, _source_type(t)) for t in catalog]
    try:
        decisions = llama_rules.default_mix(
            entries, ftype, _mix_hparams(catalog), [(r.pattern, r.qtype) for r in rules], imatrix_present
        )
    except LlamaRulesError as e:
        raise RecipeError(f"{catalog.source}: {e}") from None
    by_name = catalog.by_name()
    origin = {r.pattern.lower(): r.origin for r in rules}
    out = []
    for d in decisions:
        if spec.ftype is None and d.quantized and d.reason == "default mix":
            raise RecipeError(
                f"recipe {spec.describe()}: no rule matches tensor {d.name}; end the recipe with a catch-all "
                f"rule (e.g. '.*=Q8_0') or give a file type (--ftype) for unmatched tensors"
            )
        a = _assignment(by_name[d.name], d, origin)
        if d.name in ik_types and d.quantized:
            if d.fell_back:
                raise RecipeError(f"tensor {d.name}: rows of {d.shape[0]} do not fit {ik_types[d.name]}'s block, "
                                  f"and quantmix does not know ik_llama.cpp's fallback for it")
            a = Assignment(a.tensor, ik_types[d.name], a.reason)
        out.append(a)
    return Resolution(catalog, spec, out)


def _assignment(t: TensorInfo, d: TensorDecision, origin: dict[str, str]) -> Assignment:
    reason = d.reason
    m = re.match(r"rule '(.*)=[^=]*'$", reason)
    if m and origin.get(m.group(1)):
        reason = f"{reason} ({origin[m.group(1)]})"
    if d.fell_back:
        reason += f"; {d.default_type} does not fit rows of {t.shape[0]}: llama.cpp falls back to {d.type}"
    return Assignment(t, d.type, reason, d.fell_back, d.default_type if d.fell_back else None)


# ------------------------------------------------------------------------------------------------ writing


def _grouped_rules(resolution: Resolution) -> list[tuple[str, str]]:
    """One anchored rule per (tensor kind, type), layers folded into an alternation: every quantized tensor
    is typed explicitly and matches exactly one rule."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    singles: list[tuple[str, str]] = []
    for a in resolution.assignments:
        if a.reason.startswith("not quantized"):
            continue
        qtype = a.requested or a.qtype  # llama-quantize applies the fallback itself
        if a.tensor.layer is None:
            singles.append(("^" + re.escape(a.tensor.name) + "$", qtype))
        else:
            stem = a.tensor.name.split(".", 2)[2]
            groups[(stem, qtype)].append(a.tensor.layer)
    rules = list(singles)
    for (stem, qtype), layers in groups.items():
        alt = "|".join(str(i) for i in sorted(set(layers)))
        rules.append((rf"^blk\.({alt})\." + re.escape(stem) + "$", qtype))
    return rules


def _most_common_type(resolution: Resolution) -> str:
    counts: dict[str, int] = defaultdict(int)
    for a in resolution.assignments:
        if not a.reason.startswith("not quantized"):
            counts[a.requested or a.qtype] += a.tensor.n_elements
    return max(sorted(counts), key=lambda k: counts[k]) if counts else NOMINAL_FTYPE


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary file and a rename, so no half-written file is ever seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensor_type_file_text(resolution: Resolution) -> str:
    """A llama-quantize ``--tensor-type-file``: explicit rules, then a catch-all."""
    lines = [f"{pat}={qtype.lower()}" for pat, qtype in _grouped_rules(resolution)]
    lines.append(f".*={_most_common_type(resolution).lower()}")
    return "\n".join(lines) + "\n"


def custom_q_text(resolution: Resolution) -> str:
    """An ik_llama.cpp ``--custom-q`` argument (type names lower-case, as ik spells them)."""
    rules = [f"{pat}={qtype.lower()}" for pat, qtype in _grouped_rules(resolution)]
    rules.append(f".*={_most_common_type(resolution).lower()}")
    return ",".join(rules)


def write_recipe(resolution: Resolution, path: str | Path, dialect: str = "llama") -> Path:
    """Write a recipe file (atomically) that reproduces ``resolution`` exactly under llama-quantize
    (``--tensor-type-file FILE`` with file type Q8_0) or ik_llama.cpp (``--custom-q "$(cat FILE)"``)."""
    p = Path(path)
    text = tensor_type_file_text(resolution) if dialect == "llama" else custom_q_text(resolution) + "\n"
    atomic_write_text(p, text)
    return p
