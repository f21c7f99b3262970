"""The Pareto plot quant makers publish: mean KLD and perplexity against file size, one line per family.

Families: ``quantmix`` (our optimized mixes; a row without ``family`` is one), ``stock`` (llama.cpp's own
mixes, each point labelled with its name), ``uniform`` (one type everywhere), ``proxy`` (the proxy-only
allocator), or any other name. Rows are the flat records of :mod:`quantmix.evaluation.runs`.

The PNG is drawn without pyplot (no global figure state, no display) under matplotlib's default style, with a
fixed size and dpi and no Software/date metadata, so the same rows give byte-identical files.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_pareto_plot", "check_rows", "row_family", "FAMILY_LABELS", "save_png"]

GIB = 1024**3

FAMILY_LABELS: dict[str, str] = {
    "quantmix": "quantmix",
    "stock": "llama.cpp stock mixes",
    "uniform": "uniform types",
    "proxy": "proxy-only allocator",
}
# marker, line style, colour: fixed per known family; other families take the spares in sorted order
_STYLES = {
    "quantmix": ("o", "-", "#1f77b4"),
    "stock": ("s", "--", "#d62728"),
    "uniform": ("^", ":", "#2ca02c"),
    "proxy": ("D", "-.", "#9467bd"),
}
_SPARE = [("v", "-", "#ff7f0e"), ("P", "--", "#8c564b"), ("X", ":", "#e377c2"), ("*", "-.", "#7f7f7f"),
          ("h", "-", "#bcbd22"), ("<", "--", "#17becf")]

# rcParams on top of matplotlib's default style: nothing from a user's matplotlibrc changes the bytes
RC: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.dpi": 110,
    "path.simplify": False,
}


def _label(row: dict, i: int) -> str:
    return repr(row.get("quant")) if row.get("quant") is not None else f"#{i}"


def _number(row: dict, i: int, key: str, *, required: bool = False) -> float | None:
    """``row[key]`` as a finite float, None when absent/None/NaN; a ValueError names the quant otherwise."""
    v = row.get(key)
    if v is None:
        if required:
            raise ValueError(f"evaluation row {_label(row, i)} has no {key!r}")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            import numpy as np

            if isinstance(v, np.generic) and np.issubdtype(type(v), np.number):
                v = float(v)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise ValueError(f"evaluation row {_label(row, i)}: {key} = {v!r} is not a number") from None
    v = float(v)
    if math.isnan(v):
        if required:
            raise ValueError(f"evaluation row {_label(row, i)}: {key} is NaN")
        return None
    if math.isinf(v):
        raise ValueError(f"evaluation row {_label(row, i)}: {key} is infinite")
    return v


def check_rows(rows: Iterable[dict], required: Sequence[str] = ("size_bytes",)) -> list[dict]:
    """The rows as a list, after checking each is a dict with a positive ``size_bytes`` and the ``required``
    numbers; a ValueError names the offending row's quant."""
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"evaluation row #{i} is a {type(r).__name__}, not a dict")
        for key in required:
            _number(r, i, key, required=True)
        size = _number(r, i, "size_bytes", required=True)
        if size is None or size <= 0:
            raise ValueError(f"evaluation row {_label(r, i)}: size_bytes = {r.get('size_bytes')!r} must be > 0")
        fam = r.get("family")
        if fam is not None and (not isinstance(fam, str) or not fam):
            raise ValueError(f"evaluation row {_label(r, i)}: family = {fam!r} is not a name")
        out.append(r)
    return out


def row_family(row: dict) -> str:
    """The row's family; rows that name none are quantmix's own."""
    return row.get("family") or "quantmix"


def _families(rows: Sequence[dict]) -> list[str]:
    present = {row_family(r) for r in rows}
    return [f for f in _STYLES if f in present] + sorted(present - set(_STYLES))


def _style(fam: str, others: list[str]) -> tuple[str, str, str]:
    return _STYLES.get(fam) or _SPARE[others.index(fam) % len(_SPARE)]


def save_png(fig: Any, out: Path) -> Path:
    """Render ``fig`` to PNG bytes without metadata, then write them through a temporary file and a rename."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _reference_ppl(rows: Sequence[dict]) -> float | None:
    for i, r in enumerate(rows):
        v = _number(r, i, "ppl_base")
        if v is not None:
            return v
    return None


def write_pareto_plot(rows: Sequence[dict], out: Path, title: str) -> Path:
    """Two panels against size in GiB: mean KLD (log scale, +- standard error where ``kld_se`` is given) and
    PPL (the reference PPL dashed). Points of one family are joined in size order; stock mixes are labelled.
    Rows without a positive KLD (0, None) are left off the log panel but still drawn on the PPL panel.
    Returns ``out``."""
    import matplotlib.style
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    rows = check_rows(rows)
    if not rows:
        raise ValueError(f"no evaluation rows to plot for {out}")
    fams = _families(rows)
    others = [f for f in fams if f not in _STYLES]
    ref_ppl = _reference_ppl(rows)

    with matplotlib.style.context("default"), rc_context(RC):
        fig = Figure(figsize=(11.0, 4.6), dpi=110, layout="constrained")
        ax_k, ax_p = fig.subplots(1, 2)
        any_kld = any_ppl = False
        off_log = [str(r.get("quant", f"#{i}")) for i, r in enumerate(rows)
                   if (k := _number(r, i, "kld")) is not None and k <= 0]
        for fam in fams:
            marker, ls, colour = _style(fam, others)
            pts = []
            for i, r in enumerate(rows):
                if row_family(r) == fam:
                    pts.append((_number(r, i, "size_bytes") / GIB, str(r.get("quant", "")),
                                _number(r, i, "kld"), _number(r, i, "kld_se"), _number(r, i, "ppl_q")))
            pts.sort(key=lambda p: (p[0], p[1]))
            label = FAMILY_LABELS.get(fam, fam)
            style = dict(marker=marker, linestyle=ls, color=colour, markersize=5, linewidth=1.3, label=label)

            kp = [p for p in pts if p[2] is not None and p[2] > 0]
            if kp:
                any_kld = True
                xs, ys = [p[0] for p in kp], [p[2] for p in kp]
                if any(p[3] is not None for p in kp):
                    # a log axis cannot show a bar reaching zero: the lower bar stops at 10 % of the value
                    se = [max(p[3] or 0.0, 0.0) for p in kp]
                    lo = [min(s, 0.9 * y) for s, y in zip(se, ys)]
                    ax_k.errorbar(xs, ys, yerr=[lo, se], capsize=2.5, elinewidth=0.9, **style)
                else:
                    ax_k.plot(xs, ys, **style)
            pp = [p for p in pts if p[4] is not None]
            if pp:
                any_ppl = True
                ax_p.plot([p[0] for p in pp], [p[4] for p in pp], **style)
            if fam == "stock":
                for ax, pts_ax, k in ((ax_k, kp, 2), (ax_p, pp, 4)):
                    for p in pts_ax:
                        ax.annotate(p[1], (p[0], p[k]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=colour)

        if any_kld:
            ax_k.set_yscale("log")
        else:
            ax_k.text(0.5, 0.5, "no positive KLD measured", transform=ax_k.transAxes, ha="center", va="center")
        if off_log:
            ax_k.text(0.01, 0.01, "KLD <= 0, not on the log axis: " + ", ".join(off_log), transform=ax_k.transAxes,
                      ha="left", va="bottom", fontsize=7)
        if ref_ppl is not None:
            ax_p.axhline(ref_ppl, linestyle="--", color="black", linewidth=1.0, label=f"reference PPL {ref_ppl:.3f}")
        if not any_ppl and ref_ppl is None:
            ax_p.text(0.5, 0.5, "no PPL measured", transform=ax_p.transAxes, ha="center", va="center")
        ax_k.set_xlabel("size (GiB of tensor data)")
        ax_k.set_ylabel("mean KLD (log scale)")
        ax_k.set_title("KL divergence to the reference")
        ax_p.set_xlabel("size (GiB of tensor data)")
        ax_p.set_ylabel("perplexity")
        ax_p.set_title("perplexity")
        for ax in (ax_k, ax_p):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize=8)
        fig.suptitle(title)
        return save_png(fig, Path(out))
