"""Measure exllamav3's own EXL3 quantizer on every linear of a checkpoint at every rate: the costs of the EXL3 plan.

Each linear is read from the safetensors as stored (FP8 with its scales dequantized by
:class:`quantmix.model.checkpoint.Checkpoint`), quantized by ``exllamav3``'s ``quantize_exl3`` (on a CUDA device;
it has no CPU path) with the input Hessian diag(imatrix) of quantmix's calibration (llama.cpp's importance
weights, mapped from GGUF names through the catalog; identity where there is none), and costed as
proxy_err * trace(W H W^T): the H-weighted squared error, additive over linears. One JSON line per finished
linear goes to a journal beside the output, keyed by the checkpoint's fingerprint, the imatrix's bytes, the rates
and exllamav3's version, so an interrupted run resumes where it stopped and never reuses another input's figures.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quantmix.formats.exl3 import RATES, Exl3Error, exl3_model, parse_rate

__all__ = ["Measurement", "read_measurement", "write_measurement", "measure_exl3", "input_weights", "read_journal",
           "exl3_quantize", "expert_samples", "even_indices"]

MEASUREMENT_FORMAT = "quantmix-exl3-measurement"


@dataclass
class Measurement:
    """Per linear key, per rate: the cost to minimize (exllamav3's proxy error, trace(E H E^T), in absolute units so
    that linears add up), and where it came from."""

    costs: dict[str, dict[float, float]]
    source: dict = field(default_factory=dict)
    # measured output KLD per unit of cost (measurement.exl3_sensitivity); empty: costs are taken as they are
    coefficients: dict[str, float] = field(default_factory=dict)
    _median: float | None = field(default=None, repr=False, compare=False)

    def predicted(self, key: str, rate: float) -> float:
        """The objective of the plan for ``key`` at ``rate``: predicted KLD where coefficients were measured
        (linears without one take their median), else the proxy cost itself."""
        c = self.costs[key][rate]
        if not self.coefficients:
            return c
        if key in self.coefficients:
            return self.coefficients[key] * c
        if self._median is None:
            vals = sorted(self.coefficients.values())
            self._median = vals[len(vals) // 2]
        return self._median * c


def read_measurement(path: str | Path) -> Measurement:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Exl3Error(f"{p}: not a readable measurement file ({e})") from None
    if doc.get("format") != MEASUREMENT_FORMAT:
        raise Exl3Error(f"{p}: format is {doc.get('format')!r}, expected {MEASUREMENT_FORMAT!r}")
    costs: dict[str, dict[float, float]] = {}
    coefs: dict[str, float] = {}
    for key, entry in (doc.get("linears") or {}).items():
        if "kld_per_cost" in entry:
            c = entry["kld_per_cost"]
            if not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
                raise Exl3Error(f"{p}: linear {key}: kld_per_cost {c!r} is not a finite non-negative number")
            coefs[key] = float(c)
        row = {}
        for r, v in (entry.get("cost") or {}).items():
            try:
                rate, val = parse_rate(r), float(v)
            except (Exl3Error, TypeError, ValueError) as e:
                raise Exl3Error(f"{p}: linear {key}, rate {r!r}: {e}") from None
            if not math.isfinite(val) or val < 0:
                raise Exl3Error(f"{p}: linear {key}, rate {r}: cost {v!r} is not a finite non-negative number")
            row[rate] = val
        costs[key] = row
    if not costs:
        raise Exl3Error(f"{p}: no linears measured")
    return Measurement(costs, doc.get("source") or {}, coefs)


def write_measurement(path: str | Path, m: Measurement) -> Path:
    """Atomically (temporary file, then rename), keys and rates in a fixed order: same inputs, same bytes."""
    p = Path(path)
    linears = {}
    for k in sorted(m.costs):
        linears[k] = {"cost": {str(r): m.costs[k][r] for r in sorted(m.costs[k])}}
        if k in m.coefficients:
            linears[k]["kld_per_cost"] = m.coefficients[k]
    doc = {"format": MEASUREMENT_FORMAT, "version": 1, "source": m.source, "linears": linears}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, p)
    return p


def input_weights(model_dir: Path, imatrix_path: Path | None) -> dict[str, np.ndarray]:
    """HF weight name -> its input channels' importance (imatrix row), through the catalog's HF sources (per-expert
    rows of stacked expert tensors by their order)."""
    if imatrix_path is None:
        return {}
    from quantmix.calibration.imatrix_io import read_imatrix
    from quantmix.model.catalog import catalog_from_config
    im = read_imatrix(imatrix_path)
    out: dict[str, np.ndarray] = {}
    for t in catalog_from_config(model_dir):
        w = im.weights_for(t.name, t.shape) if t.hf_sources else None
        if w is None:
            continue
        if len(t.hf_sources) == w.shape[0]:
            for src, row in zip(t.hf_sources, w):
                out[src] = row
        elif w.shape[0] == 1:
            for src in t.hf_sources:
                out[src] = w[0]
    return out


def _key(model_dir: Path, imatrix_path: Path | None, rates: tuple[float, ...], version: str) -> str:
    from quantmix.model.fingerprint import model_fingerprint
    h = hashlib.sha256()
    h.update(model_fingerprint(model_dir).encode())
    h.update(Path(imatrix_path).read_bytes() if imatrix_path else b"no-imatrix")
    h.update(json.dumps([list(rates), version]).encode())
    return h.hexdigest()[:24]


Quantizer = Callable[[torch.Tensor, "torch.Tensor | None", float, str], tuple[torch.Tensor, float]]
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def exl3_quantize(w_out_in: torch.Tensor, imp: torch.Tensor | None, rate: float, scratch: str
                  ) -> tuple[torch.Tensor, float]:
    """exllamav3's quantize_exl3 on one [out, in] weight (on a CUDA device) with H = diag(imp): the dequantized
    weight in the same layout, and its cost proxy_err * trace(W^T H W)."""
    from exllamav3.modules.quant.exl3_lib.quantize import quantize_exl3

    dev = w_out_in.device
    w = w_out_in.float().T.contiguous()  # exllamav3 holds linears as [in, out]
    d = imp.to(dev).float() if imp is not None else torch.ones(w.shape[0], device=dev)
    hd = {"H": torch.diag(d.clamp_min(1e-8)), "packed": False, "n": w.shape[0], "first_key": "x", "count": 1,
          "finalized": False, "num_total": 0, "device": dev, "inf_nan": torch.zeros(2, dtype=torch.long, device=dev)}
    qa = {"seed": 0, "K": rate, "devices": [dev.index or 0], "device_ratios": None, "apply_out_scales": None,
          "debug_dir": scratch, "mul1": True}
    wq, proxy, _t = quantize_exl3(w, hd, qa, return_weight_q=True)
    base = float(torch.sum((w * w) * d[:, None]))
    return wq.float().T.contiguous(), float(proxy) * base


def even_indices(n: int, k: int) -> list[int]:
    """``k`` of ``n`` indices, evenly spaced, first and last included (all of them when k >= n)."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)} if k > 1 else {0})


def _expert_group(key: str) -> str | None:
    """``...experts.E.gate_proj`` -> ``...experts.*.gate_proj`` (its layer's experts of that projection); None for a
    linear that is no expert."""
    m = _EXPERT.search(key)
    return key[:m.start()] + ".experts.*." + key[m.end():] if m else None


def expert_samples(keys: list[str], n: int) -> dict[str, str]:
    """With ``n`` > 0: for each layer's expert linears of one role (``...experts.E.gate_proj``), ``n`` experts evenly
    spaced over E are measured; every other expert key maps to its group's name, whose measured experts stand for it.
    Returns key -> group for the keys that are not measured."""
    if n <= 0:
        return {}
    groups: dict[str, list[tuple[int, str]]] = {}
    for k in keys:
        g = _expert_group(k)
        if g is not None:
            groups.setdefault(g, []).append((int(_EXPERT.search(k).group(1)), k))
    out = {}
    for g, members in groups.items():
        members.sort()
        if len(members) <= n:
            continue
        pick = set(even_indices(len(members), n))
        out.update({k: g for j, (_e, k) in enumerate(members) if j not in pick})
    return out


def read_journal(path: Path, check: Callable[[dict], object]) -> list[dict]:
    """The records of a JSON-lines journal up to the first line that does not parse or pass ``check`` (a kill
    mid-write), and the file cut back to them, so that the next appended record starts on a line of its own."""
    if not path.exists():
        return []
    recs, good = [], 0
    data = path.read_bytes()
    for line in data.splitlines(keepends=True):
        try:
            rec = json.loads(line)
            check(rec)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            break
        if not line.endswith(b"\n"):
            break
        recs.append(rec)
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return recs


def _journal_row(rec: dict) -> dict:
    """A journal line as kept in memory: {"cost": rate -> cost} for a measured linear, {"base", "group"} for a
    stand-in expert; "base" is trace(W^T H W)."""
    row: dict = {"base": float(rec["base"])}
    if "cost" in rec:
        row["cost"] = {parse_rate(r): float(v) for r, v in rec["cost"].items()}
    else:
        row["group"] = str(rec["group"])
    return row


def _fill_stand_ins(done: dict[str, dict], keys: list[str]) -> dict[str, dict[float, float]]:
    """Every key's costs: measured ones as they are; a stand-in's = its base x the mean relative error (cost / base)
    of its group's measured experts at each rate."""
    rel: dict[str, dict[float, list[float]]] = {}
    for k in keys:
        g = _expert_group(k)
        if g is not None and "cost" in done[k]:
            for r, c in done[k]["cost"].items():
                rel.setdefault(g, {}).setdefault(r, []).append(c / done[k]["base"] if done[k]["base"] else 0.0)
    out: dict[str, dict[float, float]] = {}
    for k in keys:
        row = done[k]
        if "cost" in row:
            out[k] = row["cost"]
            continue
        curve = rel.get(row["group"])
        if not curve:
            raise Exl3Error(f"expert {k}: no measured expert in its group {row['group']}")
        out[k] = {r: row["base"] * sum(v) / len(v) for r, v in sorted(curve.items())}
    return out


def measure_exl3(model_dir: str | Path, out: str | Path, *, imatrix: str | Path | None = None,
                 rates: tuple[float, ...] = RATES, device: str = "cuda", progress: bool = True,
                 sensitivity: bool = False, probe_rate: float = 3, chunks: int = 2, n_ctx: int = 512,
                 texts: list[str | Path] | None = None, expert_sample: int = 0,
                 quantize: Quantizer | None = None) -> Measurement:
    """Quantize each budgeted linear at each rate with exllamav3 and write the measurement file ``out``.
    ``sensitivity``: also measure each tensor's output KLD at ``probe_rate`` (measurement.exl3_sensitivity), so
    that the plan minimizes predicted KLD rather than the summed proxy error. ``expert_sample``: measure that many
    experts per layer and role, the others costed from their measured siblings' relative error curve times their
    own trace(W^T H W) (quantize_exl3 runs at ~8 M weights/s on an H100: GLM-4.6's experts at 11 rates would take
    days). ``quantize``: (weight [out, in], importance, rate, scratch dir) -> (dequantized, cost); default
    :func:`exl3_quantize` (exllamav3, CUDA); the CPU tests give their own."""
    if quantize is None:
        try:
            import exllamav3
            from exllamav3.modules.quant.exl3_lib.quantize import quantize_exl3  # noqa: F401
        except ImportError as e:
            raise Exl3Error(f"measuring EXL3 needs exllamav3 (pip install exllamav3; a CUDA toolkit builds its "
                            f"extension on first use): {e}") from None
        version = getattr(exllamav3, "__version__", "?")
        quantize = exl3_quantize
    else:
        version = f"custom:{getattr(quantize, '__name__', 'quantizer')}"
    from tqdm import tqdm

    from quantmix.model.checkpoint import Checkpoint
    model_dir, out = Path(model_dir), Path(out)
    imatrix = Path(imatrix) if imatrix else None
    model = exl3_model(model_dir)
    imp = input_weights(model_dir, imatrix)
    key = _key(model_dir, imatrix, tuple(rates), f"{version};experts={expert_sample}")
    journal = out.with_name(out.name + f".{key}.jsonl")
    done = {rec["key"]: _journal_row(rec) for rec in read_journal(journal, _journal_row)}
    ck = Checkpoint(model_dir)
    keys = [m.key for m in model.budgeted()]
    stand_in = expert_samples(keys, expert_sample)  # key -> its group, for the experts not quantized
    todo = [k for k in keys if k not in done]
    with open(journal, "a") as jf:
        for k in tqdm(todo, desc="exl3 measure", unit="linear", disable=not progress):
            w = ck.get(k + ".weight").to(device=device, dtype=torch.float32)  # [out, in]
            d = torch.from_numpy(imp[k + ".weight"]).to(device).float() if k + ".weight" in imp else None
            base = float(torch.sum((w * w) * (d[None, :] if d is not None else 1.0)))  # trace(W^T H W)
            if k in stand_in:  # costed from its group's measured experts
                rec = {"key": k, "base": base, "group": stand_in[k]}
            else:
                rec = {"key": k, "base": base, "cost": {str(r): quantize(w, d, r, str(out.parent))[1] for r in rates}}
            jf.write(json.dumps(rec) + "\n")
            jf.flush()
            os.fsync(jf.fileno())
            done[k] = _journal_row(rec)
    costs = _fill_stand_ins(done, keys)
    source = {"model": str(model_dir), "imatrix": str(imatrix) if imatrix else None,
              "quantizer": f"exllamav3 {version} quantize_exl3, mul1, H = diag(imatrix)",
              "rates": list(rates), "key": key}
    coefs: dict[str, float] = {}
    if sensitivity:
        from quantmix.measurement.exl3_sensitivity import exl3_coefficients
        coefs = exl3_coefficients(model_dir, key, journal.with_name(out.name + ".sensitivity"), imatrix=imatrix,
                                  probe_rate=probe_rate, n_ctx=n_ctx, chunks=chunks, texts=texts, device=device,
                                  progress=progress, quantize=quantize,
                                  expert_sample=expert_sample)
        source["sensitivity"] = {"probe_rate": probe_rate, "chunks": chunks, "n_ctx": n_ctx,
                                 "texts": [str(t) for t in texts] if texts else ["wiki-calib"]}
    if stand_in:
        source["expert_sample"] = {"per_group": expert_sample, "stand_ins": len(stand_in)}
    meas = Measurement(costs, source, coefs)
    write_measurement(out, meas)
    return meas
