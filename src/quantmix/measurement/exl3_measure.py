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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quantmix.formats.exl3 import RATES, Exl3Error, exl3_model, parse_rate

__all__ = ["Measurement", "read_measurement", "write_measurement", "measure_exl3", "input_weights"]

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


def measure_exl3(model_dir: str | Path, out: str | Path, *, imatrix: str | Path | None = None,
                 rates: tuple[float, ...] = RATES, device: str = "cuda", progress: bool = True,
                 sensitivity: bool = False, probe_rate: float = 3, chunks: int = 2, n_ctx: int = 512,
                 texts: list[str | Path] | None = None) -> Measurement:
    """Quantize each budgeted linear at each rate with exllamav3 and write the measurement file ``out``.
    ``sensitivity``: also measure each tensor's output KLD at ``probe_rate`` (measurement.exl3_sensitivity), so
    that the plan minimizes predicted KLD rather than the summed proxy error."""
    try:
        import exllamav3
        from exllamav3.modules.quant.exl3_lib.quantize import quantize_exl3
    except ImportError as e:
        raise Exl3Error(f"measuring EXL3 needs exllamav3 (pip install exllamav3; a CUDA toolkit builds its "
                        f"extension on first use): {e}") from None
    from tqdm import tqdm

    from quantmix.model.checkpoint import Checkpoint
    model_dir, out = Path(model_dir), Path(out)
    imatrix = Path(imatrix) if imatrix else None
    model = exl3_model(model_dir)
    imp = input_weights(model_dir, imatrix)
    version = getattr(exllamav3, "__version__", "?")
    key = _key(model_dir, imatrix, tuple(rates), version)
    journal = out.with_name(out.name + f".{key}.jsonl")
    done: dict[str, dict[float, float]] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["key"]] = {parse_rate(r): v for r, v in rec["cost"].items()}
            except (json.JSONDecodeError, KeyError, Exl3Error):
                break  # a torn last line from a kill: redo that linear
    ck = Checkpoint(model_dir)
    todo = [m for m in model.budgeted() if m.key not in done]
    with open(journal, "a") as jf:
        for m in tqdm(todo, desc="exl3 measure", unit="linear", disable=not progress):
            w = ck.get(m.key + ".weight").to(device=device, dtype=torch.float32).T.contiguous()  # [in, out]
            d = torch.from_numpy(imp[m.key + ".weight"]).to(device) if m.key + ".weight" in imp \
                else torch.ones(m.in_features, device=device)
            h = torch.diag(d.float().clamp_min(1e-8))
            base = float(torch.sum((w * w) * d[:, None]))  # trace(W^T H W) with H diagonal
            cost = {}
            for r in rates:
                hd = {"H": h.clone(), "packed": False, "n": m.in_features, "first_key": m.key, "count": 1,
                      "finalized": False, "num_total": 0, "device": torch.device(device),
                      "inf_nan": torch.zeros(2, dtype=torch.long, device=device)}
                qa = {"seed": 0, "K": r, "devices": [torch.device(device).index or 0], "device_ratios": None,
                      "apply_out_scales": None, "debug_dir": str(out.parent), "mul1": True}
                _wq, proxy, _t = quantize_exl3(w, hd, qa, return_weight_q=False)
                cost[str(r)] = float(proxy) * base
            jf.write(json.dumps({"key": m.key, "cost": cost}) + "\n")
            jf.flush()
            os.fsync(jf.fileno())
            done[m.key] = {parse_rate(r): v for r, v in cost.items()}
    source = {"model": str(model_dir), "imatrix": str(imatrix) if imatrix else None,
              "quantizer": f"exllamav3 {version} quantize_exl3, mul1, H = diag(imatrix)",
              "rates": list(rates), "key": key}
    coefs: dict[str, float] = {}
    if sensitivity:
        from quantmix.measurement.exl3_sensitivity import exl3_coefficients
        coefs = exl3_coefficients(model_dir, key, journal.with_name(out.name + ".sensitivity"), imatrix=imatrix,
                                  probe_rate=probe_rate, n_ctx=n_ctx, chunks=chunks, texts=texts, device=device,
                                  progress=progress)
        source["sensitivity"] = {"probe_rate": probe_rate, "chunks": chunks, "n_ctx": n_ctx,
                                 "texts": [str(t) for t in texts] if texts else ["wiki-calib"]}
    meas = Measurement(done, source, coefs)
    write_measurement(out, meas)
    return meas
