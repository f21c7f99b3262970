"""Sensitivity: the proxy error calibrated to measured output KLD, one coefficient per tensor.

The error table says how much each type damages each tensor (importance-weighted relative error); it does not
say how much that damage moves the model's output. Here each tensor (``full`` / ``quick``), or each tensor
class at a few layers (``large``), is quantized alone to a probe type and the KLD it causes on calibration
tokens is measured (:class:`~quantmix.measurement.kld_probe.KLDProbe`, partial replays from the changed layer).
Its coefficient is ``c_t = KLD_t / cost_t(probe)``, so that

    predicted KLD(recipe) = sum over tensors of c_t * cost_t(type_t)

(small perturbations: both KLD and the weighted squared error are quadratic in the weight error, so the ratio
carries over between types). The fit is then checked on a few single-tensor probes at other types (``checks``:
predicted vs measured). ``large`` probes every class at ``large_layers`` evenly spaced layers and interpolates
the coefficient over the layer index: for models whose per-tensor probes would cost too much; its cost is
stated in forward-pass tokens.

Calibration tokens come from the calibration text (never the evaluation text; wiki-calib unless the user gives
files). Results are cached per tensor under ``cache_dir()/sensitivity/KEY`` (KEY hashes the model files,
imatrix, tokens, probe type and numerics version), so an interrupted fit resumes and a changed input is never
reused: the key holds the probed token ids themselves, so a different text gets its own entries. The fit
records which text it ran on (name, bytes, sha256 per file).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantmix.measurement.kld_probe import KLDProbe, tensor_layer
from quantmix.model.catalog import beyond_decoder_layers

if TYPE_CHECKING:
    from quantmix.evaluation.evaluate import TextSource

__all__ = ["PROFILES", "Sensitivity", "SensitivityError", "fit_sensitivity", "spearman"]

# How much a nat of the NextN draft head's KLD (the token after next, speculative decoding's acceptance) counts
# against a nat of the output's KLD in the plan's objective.
NEXTN_WEIGHT = 1.0

PROFILES = {
    # chunks of 512 calibration tokens, single-type checks
    "full": {"chunks": 4, "checks": 8},
    "quick": {"chunks": 2, "checks": 4},
    "fast": {"chunks": 1, "checks": 4},  # quantmix run's default: the whole job in minutes on a 2-core CPU
    "large": {"chunks": 2, "checks": 4},
}
DEFAULT_PROBE_TYPE = "Q3_K"
CHECK_TYPES = ("Q2_K", "Q4_K", "Q5_K")
_FORMAT = 1


class SensitivityError(ValueError):
    """Bad input to the sensitivity fit (names the file or tensor)."""


@dataclass
class Sensitivity:
    """Fitted coefficients (KLD per unit of proxy cost) and how they were obtained."""

    profile: str
    probe_type: str
    coefficients: dict[str, float]
    probe_kld: dict[str, float]  # measured KLD of each probed tensor (or class x layer) at probe_type
    tensor_class: dict[str, str]
    checks: list[dict] = field(default_factory=list)  # tensor, type, predicted, measured
    n_tokens: int = 0
    forward_tokens: int = 0
    seconds: float = 0.0
    text: list[dict] = field(default_factory=list)  # the calibration text: name, bytes, sha256 per file

    def predict(self, types: Mapping[str, str], costs: Mapping[str, Mapping[str, float]]) -> float:
        """Predicted mean KLD of a recipe (tensor -> type); tensors not in ``costs`` (float) add nothing."""
        return sum(self.contribution(n, t, costs) for n, t in types.items())

    def contribution(self, name: str, qtype: str, costs: Mapping[str, Mapping[str, float]]) -> float:
        c = costs.get(name, {}).get(qtype)
        return 0.0 if c is None else self.coefficients.get(name, 0.0) * c

    def scaled_costs(self, costs: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
        """The solver's input: every (tensor, type) cost in predicted-KLD units."""
        return {n: {q: self.coefficients.get(n, 0.0) * v for q, v in row.items()} for n, row in costs.items()}

    def by_layer_class(self, values: Mapping[str, float]) -> dict[tuple[int, str], float]:
        """Per-tensor values summed per (layer, tensor class): the heatmap's cells (layer -1: non-layer)."""
        out: dict[tuple[int, str], float] = {}
        for n, v in values.items():
            key = (tensor_layer(n), self.tensor_class.get(n, n))
            out[key] = out.get(key, 0.0) + v
        return out

    def check_summary(self) -> str:
        if not self.checks:
            return "no single-tensor checks"
        r = [c["measured"] / c["predicted"] for c in self.checks if c["predicted"] > 0]
        rho = spearman([c["predicted"] for c in self.checks], [c["measured"] for c in self.checks])
        return (f"{len(self.checks)} single-tensor checks at other types: measured/predicted "
                f"{min(r):.2f}..{max(r):.2f} (geometric mean {math.exp(sum(map(math.log, r)) / len(r)):.2f}), "
                f"Spearman {rho:.3f}")

    def save(self, path: str | Path) -> Path:
        from quantmix.planning.recipe import atomic_write_text

        p = Path(path)
        atomic_write_text(p, json.dumps({"format": _FORMAT, **asdict(self)}, indent=1, sort_keys=True) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
            if d.pop("format", None) != _FORMAT:
                raise SensitivityError(f"{p}: not a sensitivity file of format {_FORMAT}")
            return cls(**d)
        except (OSError, ValueError, TypeError) as e:
            if isinstance(e, SensitivityError):
                raise
            raise SensitivityError(f"{p}: unreadable sensitivity file ({e})") from None


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman: need two sequences of the same length >= 2")
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den > 0 else 0.0


def _fit_key(model_fp: str, imatrix_sha: str, chunks: torch.Tensor, probe_type: str, device: str) -> str:
    from quantmix.formats.api import NUMERICS_VERSION

    h = hashlib.sha256()
    h.update(json.dumps([_FORMAT, model_fp, imatrix_sha, probe_type, NUMERICS_VERSION, device,
                         list(chunks.shape)]).encode())
    h.update(chunks.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _probe_cost(costs: Mapping[str, float], probe_type: str) -> tuple[str, float] | None:
    """The probe type, or (when it does not fit the tensor) the candidate whose cost is nearest Q3_K-like."""
    if probe_type in costs and costs[probe_type] > 0:
        return probe_type, costs[probe_type]
    usable = sorted((v, q) for q, v in costs.items() if v > 0)
    if not usable:
        return None
    v, q = usable[len(usable) // 2]
    return q, v


def _interpolate(layer: int, probed: dict[int, float]) -> float:
    """Piecewise-linear in the layer index between the probed layers (flat beyond the ends)."""
    ls = sorted(probed)
    if layer <= ls[0]:
        return probed[ls[0]]
    if layer >= ls[-1]:
        return probed[ls[-1]]
    for a, b in zip(ls, ls[1:]):
        if a <= layer <= b:
            f = (layer - a) / (b - a)
            return probed[a] * (1 - f) + probed[b] * f
    return probed[ls[-1]]


def fit_sensitivity(
    model_dir: str | Path,
    costs: Mapping[str, Mapping[str, float]],
    tensor_classes: Mapping[str, str],
    imatrix: str | Path | None = None,
    *,
    profile: str = "full",
    probe_type: str = DEFAULT_PROBE_TYPE,
    text: str | TextSource | None = None,
    n_ctx: int = 512,
    chunks: int | None = None,
    large_layers: int = 4,
    checks: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    cache: bool = True,
    probe: KLDProbe | None = None,
    dtype: torch.dtype = torch.float32,
) -> Sensitivity:
    """Fit per-tensor coefficients so that predicted KLD = sum_t c_t * cost_t(type).

    ``costs``: the error table's tensor -> type -> cost (:meth:`ErrorTable.to_costs`, same imatrix).
    ``tensor_classes``: tensor -> class (from the catalog). ``text``: calibration text, the content itself or a
    :class:`~quantmix.evaluation.evaluate.TextSource` (default wiki-calib). ``probe``: an existing
    :class:`KLDProbe` on the same tokens (refinement reuses it; then ``text`` only labels the result)."""
    from transformers import AutoTokenizer

    from quantmix.calibration.imatrix import calibration_tokens
    from quantmix.evaluation.evaluate import TextSource, _file_sha256, load_texts
    from quantmix.evaluation.reference import model_fingerprint
    from quantmix.paths import cache_dir

    if profile not in PROFILES:
        raise SensitivityError(f"profile {profile!r}: choose one of {', '.join(PROFILES)}")
    t0 = time.time()
    model_dir = Path(model_dir)
    prof = PROFILES[profile]
    n_chunks = chunks or prof["chunks"]
    n_checks = prof["checks"] if checks is None else checks
    if isinstance(text, str):
        src = TextSource(("(string)",), (text,), (hashlib.sha256(text.encode("utf-8")).hexdigest(),))
    else:
        src = None if text is None and probe is not None else load_texts(text, "wiki-calib")
    if probe is None:
        tok = AutoTokenizer.from_pretrained(model_dir)
        try:
            ids = calibration_tokens(tok, list(src.parts), n_ctx, n_chunks)
        except ValueError as e:  # too short for one chunk: say which text
            raise SensitivityError(f"{src.label}: {e}") from None
        probe = KLDProbe(model_dir, ids, imatrix, device, dtype=dtype)
    names = [n for n in costs if n in probe.tensor_names]
    n_main = len(probe.layers)
    # NextN / MTP layers (GLM-4.5's blk.N.nextn.*, after the decoder layers): the GGUF keeps them for speculative
    # decoding; the next-token forward never runs them, so the main probe cannot see them. Their probes measure
    # the NextN draft head's own KLD (measurement.nextn_probe), counted with weight NEXTN_WEIGHT; any the
    # draft-head probe cannot place are priced like the same class of the last decoder layer.
    off_path = [n for n in costs if n not in probe.tensor_names and beyond_decoder_layers(n, n_main)]
    nextn_probe = None
    if off_path:
        from quantmix.measurement.nextn_probe import NextNProbe

        nextn_probe = NextNProbe(probe)
    missing = [n for n in costs if n not in probe.tensor_names and n not in off_path]
    if missing:
        raise SensitivityError(f"tensor {missing[0]}: in the error table but not a weight of {model_dir}")
    key = _fit_key(model_fingerprint(model_dir), _file_sha256(Path(imatrix)) if imatrix else "none", probe.chunks.cpu(),
                   probe_type, probe.device.type + ("" if probe.engine.dtype == torch.float32 else
                                                    f"-{str(probe.engine.dtype).removeprefix('torch.')}"))
    root = cache_dir() / "sensitivity" / key
    if profile == "large":
        n_layers = len(probe.layers)
        pick = sorted({round(i * (n_layers - 1) / max(large_layers - 1, 1)) for i in range(large_layers)})
        todo = [n for n in names if tensor_layer(n) < 0 or tensor_layer(n) in pick]
    else:
        todo = list(names)
    on_nextn = [n for n in off_path if nextn_probe is not None and n in nextn_probe.tensor_names]
    todo += on_nextn
    probe_kld: dict[str, float] = {}
    coef: dict[str, float] = {}
    single: list[str] = []
    entries: dict[str, dict] = {}
    to_measure: list[tuple[str, str, float]] = []  # tensor, probe type, its proxy cost
    for n in todo:
        pc = _probe_cost(costs[n], probe_type)
        if pc is None:
            coef[n] = 0.0
            continue
        if len(costs[n]) == 1:
            # a single candidate: every plan gives this tensor the same type, so its coefficient cannot
            # change a decision; it still counts in the prediction, with the median coefficient (below)
            single.append(n)
            continue
        q, c = pc
        f = root / f"{n}.{q}.json"
        if cache and f.is_file():
            try:
                entries[n] = json.loads(f.read_text())
            except ValueError:
                pass
        if n not in entries:
            to_measure.append((n, q, c))

    def save(n: str, entry: dict) -> None:
        entries[n] = entry
        if cache:
            from quantmix.planning.recipe import atomic_write_text

            atomic_write_text(root / f"{n}.{entry['type']}.json", json.dumps(entry))

    main = [(n, q) for n, q, _ in to_measure if n not in on_nextn]
    if main:  # every main-path probe advances together through the layers (KLDProbe.kld_many)
        plan = probe.cost([{n: q} for n, q in main])
        if progress:
            print(f"sensitivity ({profile}): {len(main)} probes of {len(todo)} to measure "
                  f"({len(todo) - len(to_measure)} cached) on {probe.n_tokens} tokens: {plan['steps']} probe-layer "
                  f"steps, {plan['forward_tokens']} forward-pass tokens, {plan['layer_reads']} layers read from "
                  f"the checkpoint, {plan['groups']} group(s)", file=sys.stderr)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=plan["steps"], desc=f"sensitivity ({profile})", unit="step", file=sys.stderr)
        try:
            probe.kld_many([{n: q} for n, q in main], progress=bar.update if bar is not None else None,
                           done=lambda k, kl: save(main[k][0], {"type": main[k][1], "kld": float(kl.mean())}))
        finally:
            if bar is not None:
                bar.close()
            probe.release_images([n for n, _ in main])
    for n, q, _ in to_measure:
        if n in on_nextn:  # the draft head's KLD, weighted
            save(n, {"type": q, "kld": nextn_probe.kld(n, q), "head": "nextn"})
    for n in todo:
        if n in entries:
            c = _probe_cost(costs[n], probe_type)[1]
            probe_kld[n] = float(entries[n]["kld"])
            coef[n] = probe_kld[n] / c * (NEXTN_WEIGHT if n in on_nextn else 1.0)
    if single:
        measured = sorted(v for v in coef.values() if v > 0)
        for n in single:
            coef[n] = measured[len(measured) // 2] if measured else 0.0
    if off_path:
        last = {tensor_classes.get(n, n): v for n, v in coef.items() if tensor_layer(n) == n_main - 1}
        measured = sorted(v for v in coef.values() if v > 0)
        median = measured[len(measured) // 2] if measured else 0.0
        for n in off_path:
            if n not in coef:
                coef[n] = last.get(tensor_classes.get(n, n), median)
        names = names + off_path
    if profile == "large":  # per class: interpolate the probed layers' coefficients
        per_class: dict[str, dict[int, float]] = {}
        for n, v in coef.items():
            if tensor_layer(n) >= 0:
                per_class.setdefault(tensor_classes.get(n, n), {})[tensor_layer(n)] = v
        for n in names:
            if n not in coef:
                probed = per_class.get(tensor_classes.get(n, n))
                coef[n] = _interpolate(tensor_layer(n), probed) if probed else 0.0
    sens = Sensitivity(profile, probe_type, coef, probe_kld, {n: tensor_classes.get(n, n) for n in names},
                       n_tokens=probe.n_tokens, text=src.records() if src is not None else [])
    # checks: single tensors at other types, spread over classes and depths, most influential first
    ranked = sorted((n for n in probe_kld if n not in on_nextn), key=lambda n: -probe_kld[n])
    chosen = ranked[:: max(1, len(ranked) // max(n_checks, 1))][:n_checks]
    picked = []
    for i, n in enumerate(chosen):
        q = next((t for t in (CHECK_TYPES[i % len(CHECK_TYPES)], *CHECK_TYPES) if t in costs[n]), None)
        if q is not None and q != probe_type:
            picked.append((n, q))
    measured = probe.kld_many([{n: q} for n, q in picked])
    probe.release_images([n for n, _ in picked])
    for (n, q), kl in zip(picked, measured):
        sens.checks.append({"tensor": n, "type": q, "predicted": sens.contribution(n, q, costs),
                            "measured": float(kl.mean())})
    sens.forward_tokens = probe.forward_tokens
    sens.seconds = time.time() - t0
    return sens
