"""The exact EXL3 plan: one bitrate per linear of a Hugging Face checkpoint, least measured cost within a bits-per-
weight, byte or VRAM budget, written as an exllamav3 recipe (``convert.py --recipe``).

ExLlamaV3's own ``optimize`` climbs greedily from whole-model quants and never steps back; here the same choice
(rates 1..8 and 1.5/2.5/3.5 per linear) goes through quantmix's exact knapsack (:mod:`quantmix.planning.solver`).
The costs come from a measurement file (``quantmix-exl3-measurement``, JSON): per linear and rate the error of
exllamav3's own quantizer (``bench/exl3_device.py`` measures it on a GPU), so planning runs on any machine.

Sizes follow exllamav3: ``bits`` averages the budgeted linears (the decoder's), the output head takes
``head_bits``, MTP/NextN layers ``mtp_bits``, the token embedding stays fp16 in system memory. The VRAM budget
counts the linears, the fp16 norms and ExLlamaV3's cache (fp16, or quantized k/v bits with fp16 scales per 32
values, in pages of 256 tokens).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantmix.formats.exl3 import RATES, Exl3Error, Exl3Linear, Exl3Model, _text_config, parse_rate
from quantmix.measurement.exl3_measure import Measurement

__all__ = ["exl3_cache_bytes", "parse_kv_cache", "Exl3Plan", "plan_exl3", "plan_from_exllamav3", "write_exl3_recipe",
           "read_exl3_recipe"]

PAGE = 256  # ExLlamaV3's cache page (tokens)


# ------------------------------------------------------------------------------------------ the cache


def parse_kv_cache(text: str) -> tuple[int, int]:
    """``fp16`` / ``f16`` -> (16, 16); ``k6v5`` (ExLlamaV3's quantized cache, 2-8 bits each) -> (6, 5)."""
    t = text.strip().lower()
    if t in ("fp16", "f16"):
        return 16, 16
    m = re.fullmatch(r"k([2-8])v([2-8])", t) or re.fullmatch(r"q([2-8])", t)
    if not m:
        raise Exl3Error(f"--kv-cache {text!r}: give fp16, or kNvM with N, M from 2 to 8 (e.g. k6v5), or qN")
    k = int(m.group(1))
    return k, int(m.group(2)) if m.lastindex == 2 else k


def exl3_cache_bytes(config: dict, ctx: int, k_bits: int, v_bits: int) -> int:
    """Bytes of ExLlamaV3's KV cache for ``ctx`` tokens (rounded up to its 256-token pages) over all attention
    layers: fp16 K and V, or k/v bits per value plus one fp16 scale per 32 values of K and of V (cache/quant.py)."""
    tc = _text_config(config)
    if tc.get("kv_lora_rank"):
        if (k_bits, v_bits) != (16, 16):
            raise Exl3Error("a quantized ExLlamaV3 cache for MLA models is not modeled here; use --kv-cache fp16")
        per_tok = 2 * (int(tc["kv_lora_rank"]) + int(tc.get("qk_rope_head_dim", 0)))
        return int(tc["num_hidden_layers"]) * _pages(ctx) * per_tok
    n_kv = int(tc.get("num_key_value_heads") or tc["num_attention_heads"])
    head_dim = int(tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"])
    dim = n_kv * head_dim
    layer_types = tc.get("layer_types")
    n_attn = sum(1 for t in layer_types if "attention" in t) if layer_types else int(tc["num_hidden_layers"])
    if (k_bits, v_bits) == (16, 16):
        per_tok = 2 * 2 * dim
    else:
        if dim % 32:
            raise Exl3Error(f"KV width {dim} is not a multiple of 32: ExLlamaV3's quantized cache needs one")
        per_tok = dim * (k_bits + v_bits) // 8 + 2 * 2 * (dim // 32)
    return n_attn * _pages(ctx) * per_tok


def _pages(ctx: int) -> int:
    return -(-ctx // PAGE) * PAGE


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class Exl3Plan:
    """A bitrate per linear, with its bytes, average bpw (exllamav3's: over the budgeted linears) and cost."""

    model: Exl3Model
    rates: dict[str, float]
    head_bits: float
    mtp_bits: float
    n_bytes: int
    bpw: float
    cost: float
    status: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts: dict[float, int] = {}
        for m in self.model.budgeted():
            counts[self.rates[m.key]] = counts.get(self.rates[m.key], 0) + 1
        mix = ", ".join(f"{r} bpw x {n}" for r, n in sorted(counts.items()))
        return (f"EXL3 plan: {self.bpw:.4f} bpw over {len(self.model.budgeted())} linears ({mix}); head "
                f"{self.head_bits} bpw; {self.n_bytes:,} bytes of linears; cost {self.cost:.6g} ({self.status})")


def plan_exl3(model: Exl3Model, measurement: Measurement, *, target_bpw: float | None = None,
              target_bytes: int | None = None, vram: int | None = None, ctx: int = 0,
              kv_cache: str = "fp16", head_bits: float = 6, mtp_bits: float = 4, codebook: str = "mul1",
              rates: tuple[float, ...] = RATES, vram_overhead: int = 512 * 2**20,
              time_limit: float = 60.0) -> Exl3Plan:
    """The least-cost rate per budgeted linear such that: their mean bpw <= ``target_bpw`` (exllamav3's
    definition), or all linears' bytes <= ``target_bytes``, or linears + norms + cache + overhead <= ``vram``."""
    from quantmix.planning.solver import Group, Option, Problem, solve
    if sum(x is not None for x in (target_bpw, target_bytes, vram)) != 1:
        raise Exl3Error("give exactly one EXL3 budget: a bpw, a byte size or a VRAM size")
    head_bits, mtp_bits = parse_rate(head_bits), parse_rate(mtp_bits)
    rates = tuple(r for r in rates if not (codebook != "mul1" and r != int(r)))
    budgeted = model.budgeted()
    missing = [m.key for m in budgeted if m.key not in measurement.costs]
    if missing:
        raise Exl3Error(f"the measurement lacks {len(missing)} linear(s) of {model.model_dir}, e.g. "
                        f"{', '.join(missing[:4])}")
    fixed_bytes = sum(m.n_bytes(_fixed_rate(m, head_bits, mtp_bits), codebook)
                      for m in model.linears if m.role != "bits")
    notes = []
    if target_bpw is not None:
        # bpw is over the budgeted linears' trellis alone, as exllamav3 counts it (bits = numel * rate)
        capacity = int(math.floor(target_bpw * sum(m.numel for m in budgeted)))
        usage = lambda m, r: int(round(m.numel * r))  # noqa: E731
        fixed = 0
    else:
        usage = lambda m, r: m.n_bytes(r, codebook)  # noqa: E731
        if target_bytes is not None:
            capacity, fixed = int(target_bytes), fixed_bytes
        else:
            k_bits, v_bits = parse_kv_cache(kv_cache)
            cache = exl3_cache_bytes(model.config, ctx, k_bits, v_bits)
            capacity, fixed = int(vram), fixed_bytes + model.other_vram_bytes + cache + int(vram_overhead)
            notes.append(f"VRAM: cache {cache:,} bytes ({kv_cache}, {ctx} tokens), norms "
                         f"{model.other_vram_bytes:,}, head/MTP {fixed_bytes:,}, overhead {vram_overhead:,}")
    groups = []
    for m in budgeted:
        opts = []
        for r in rates:
            if r not in measurement.costs[m.key]:
                continue
            c = measurement.predicted(m.key, r)
            opts.append(Option((str(r),), (usage(m, r),), (0,), c, (RATES.index(r),)))
        if not opts:
            raise Exl3Error(f"the measurement has no cost for {m.key} at any of the rates {rates}")
        groups.append(Group((m.key,), opts))
    problem = Problem(("exl3",), (capacity,), groups, (fixed,))
    if problem.smallest()[0] > capacity:
        raise Exl3Error(f"the EXL3 budget is too small: the smallest plan needs {problem.smallest()[0]:,} "
                        f"(bits or bytes) of {capacity:,}")
    sol = solve(problem, "ilp", time_limit)
    chosen = {g.members[0]: parse_rate(g.options[k].types[0]) for g, k in zip(groups, sol.choice)}
    cost = sum(measurement.predicted(m.key, chosen[m.key]) for m in budgeted)
    return _plan(model, chosen, head_bits, mtp_bits, codebook, cost, sol.status, notes)


def _plan(model: Exl3Model, chosen: dict[str, float], head_bits: float, mtp_bits: float, codebook: str,
          cost: float, status: str, notes: list[str]) -> Exl3Plan:
    """The plan from the budgeted linears' rates: the fixed roles' rates added, bytes and exllamav3's bpw counted."""
    chosen = dict(chosen)
    for m in model.linears:
        if m.role != "bits":
            chosen[m.key] = _fixed_rate(m, head_bits, mtp_bits)
    budgeted = model.budgeted()
    n_bytes = sum(m.n_bytes(chosen[m.key], codebook) for m in model.linears)
    bpw = sum(m.numel * chosen[m.key] for m in budgeted) / sum(m.numel for m in budgeted)
    return Exl3Plan(model, chosen, head_bits, mtp_bits, n_bytes, bpw, cost, status, notes)


def _fixed_rate(m: Exl3Linear, head_bits: float, mtp_bits: float) -> float:
    return {"head_bits": head_bits, "mtp_bits": mtp_bits}.get(m.role, 16)


# ------------------------------------------------------------------------------------------ exllamav3's recipe


def write_exl3_recipe(plan: Exl3Plan, path: str | Path, target_bpw: float | None = None) -> Path:
    """The plan as exllamav3's ``convert.py --recipe`` reads it (YAML: ``tensors`` maps each budgeted module key to
    its bitrate; ``achieved_bpw`` / ``target_bpw`` / ``head_bits``), written atomically."""
    import yaml
    doc = {"target_bpw": float(target_bpw if target_bpw is not None else round(plan.bpw, 4)),
           "achieved_bpw": round(plan.bpw, 4), "head_bits": plan.head_bits,
           "tensors": {m.key: plan.rates[m.key] for m in plan.model.budgeted()}}
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("# quantmix EXL3 plan; build with exllamav3: python convert.py -i MODEL -o OUT -w WORK "
                   f"--recipe {p.name}\n" + yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, p)
    return p


def read_exl3_recipe(path: str | Path) -> dict[str, float]:
    """A recipe's ``tensors`` (key or fnmatch pattern -> bitrate), checked as exllamav3 checks it."""
    import yaml
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise Exl3Error(f"{p}: {e}") from None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(tensors, dict) or not tensors:
        raise Exl3Error(f"{p}: no 'tensors' mapping")
    out = {}
    for k, v in tensors.items():
        try:
            out[str(k)] = parse_rate(v)
        except Exl3Error as e:
            raise Exl3Error(f"{p}: tensor {k}: {e}") from None
    return out


# ------------------------------------------------------------------------------------------ exllamav3's measurement


def _nearest_rate(bpw: float) -> float:
    return min(RATES, key=lambda r: (abs(r - bpw), r))


def _alt_rates(entry: object, where: str, model: Exl3Model) -> dict[str, float]:
    """The rate of each budgeted linear in one of exllamav3's measured models: read from its directory when it is
    there, else its bpw rounded to the nearest EXL3 rate (exllamav3 measures uniform quants)."""
    from quantmix.formats.exl3 import read_exl3_dir
    if not isinstance(entry, dict) or not isinstance(entry.get("bpw"), (int, float)):
        raise Exl3Error(f"{where}: needs a number 'bpw' (and 'dir')")
    d = Path(str(entry.get("dir", "")))
    if entry.get("dir") and (d / "config.json").is_file():
        got = {s.key: s.rate for s in read_exl3_dir(d)[1]}
        return {m.key: got.get(m.key, _nearest_rate(float(entry["bpw"]))) for m in model.budgeted()}
    return {m.key: _nearest_rate(float(entry["bpw"])) for m in model.budgeted()}


def plan_from_exllamav3(model: Exl3Model, measurement: str | Path, target_bpw: float, *, head_bits: float = 6,
                        mtp_bits: float = 4, time_limit: float = 60.0) -> Exl3Plan:
    """The exact plan over exllamav3's own measurement (``measure_model``'s JSON: per group of modules, the output
    KLD change and bits of swapping in each alternative quant), where its ``optimize_model`` climbs greedily and
    only upward. Same objective (the sum of the groups' dKLD), same bpw budget (bits over the budgeted linears)."""
    import json

    from quantmix.planning.solver import Group, Option, Problem, solve
    p = Path(measurement)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Exl3Error(f"{p}: not a readable exllamav3 measurement ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or not isinstance(doc.get("alts"), list):
        raise Exl3Error(f"{p}: not exllamav3's measurement.json (needs 'base', 'alts' and 'groups')")
    head_bits, mtp_bits = parse_rate(head_bits), parse_rate(mtp_bits)
    base = _alt_rates(doc.get("base"), f"{p}: base", model)
    alts = [_alt_rates(a, f"{p}: alts[{i}]", model) for i, a in enumerate(doc["alts"])]
    budgeted = {m.key: m for m in model.budgeted()}
    grouped: set[str] = set()
    groups = []
    for gi, g in enumerate(doc["groups"]):
        layers, cands = g.get("layers") if isinstance(g, dict) else None, g.get("candidates") if isinstance(g, dict) else None
        if not isinstance(layers, list) or not isinstance(cands, list) or len(cands) != len(alts):
            raise Exl3Error(f"{p}: groups[{gi}] needs 'layers' and one candidate per alt ({len(alts)})")
        members = tuple(sorted(k for k in budgeted if any(k == x or k.startswith(f"{x}.") for x in layers)))
        if not members:
            raise Exl3Error(f"{p}: groups[{gi}] ({', '.join(map(str, layers[:3]))}) matches no linear of "
                            f"{model.model_dir}: wrong model for this measurement?")
        if grouped & set(members):
            raise Exl3Error(f"{p}: groups[{gi}] overlaps an earlier group")
        grouped.update(members)
        opts = [Option(tuple(str(base[k]) for k in members), (sum(round(budgeted[k].numel * base[k]) for k in members),),
                       (0,), 0.0, (0,))]
        for j, (c, alt) in enumerate(zip(cands, alts)):
            dkld = c.get("dkld") if isinstance(c, dict) else None
            if not isinstance(dkld, (int, float)) or not math.isfinite(dkld):
                raise Exl3Error(f"{p}: groups[{gi}].candidates[{j}]: dkld {dkld!r} is not a number")
            opts.append(Option(tuple(str(alt[k]) for k in members),
                               (sum(round(budgeted[k].numel * alt[k]) for k in members),), (0,), float(dkld), (j + 1,)))
        groups.append(Group(members, opts))
    fixed = sum(round(m.numel * base[k]) for k, m in budgeted.items() if k not in grouped)
    capacity = int(math.floor(target_bpw * sum(m.numel for m in budgeted.values())))
    problem = Problem(("exl3",), (capacity,), groups, (fixed,))
    if problem.smallest()[0] > capacity:
        raise Exl3Error(f"{target_bpw} bpw is below the measurement's base quant ({doc['base'].get('bpw')} bpw)")
    sol = solve(problem, "ilp", time_limit)
    chosen = {k: base[k] for k in budgeted}
    cost = 0.0
    for g, choice in zip(groups, sol.choice):
        opt = g.options[choice]
        cost += opt.cost
        chosen.update({k: parse_rate(t) for k, t in zip(g.members, opt.types)})
    return _plan(model, chosen, head_bits, mtp_bits, "mul1", cost, sol.status,
                 [f"from exllamav3's measurement {p.name}: {len(groups)} groups x {len(alts) + 1} quants, "
                  f"predicted dKLD {cost:+.5f} over the base ({doc.get('base_kld', float('nan')):.5f})"])
