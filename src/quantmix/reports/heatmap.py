"""Where the KLD comes from: contributions per layer and tensor class, as a heatmap and as tables.

This is the sensitivity report quant makers read (what ExLlamaV3's ``measure -l2/-l3`` gives them): which
layers and which tensor classes deserve the bits. Input: ``{(layer, tensor_class): predicted KLD}``, layer -1
for the tensors outside the blocks (token_embd, output), drawn as a separate "non-layer" row. Classes are
ordered as a block runs (attention, then FFN, dense, routed experts, shared experts); unknown classes follow,
sorted. Totals use exact summation (``math.fsum``), so they equal the input sum whatever the order.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from quantmix.reports.pareto import RC, save_png

__all__ = ["write_sensitivity_heatmap", "render_sensitivity_table", "class_order", "NON_LAYER"]

NON_LAYER = -1

_CLASS_ORDER = [
    "token_embd", "embedding",
    "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output",
    "ffn_gate", "ffn_up", "ffn_down",
    "router", "ffn_gate_inp",
    "ffn_gate_up_exps", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
    "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
    "nextn", "output",
]


def class_order(classes: set[str] | list[str]) -> list[str]:
    """Known classes in block order, then the others sorted."""
    cs = set(classes)
    return [c for c in _CLASS_ORDER if c in cs] + sorted(cs - set(_CLASS_ORDER))


def _checked(contrib: Mapping[tuple[int, str], float]) -> dict[tuple[int, str], float]:
    """Keys as (int layer >= -1, non-empty class), values finite floats; a ValueError names the bad cell."""
    if not isinstance(contrib, Mapping):
        raise ValueError(f"contributions must be a mapping (layer, class) -> KLD, got {type(contrib).__name__}")
    out: dict[tuple[int, str], float] = {}
    for key, v in contrib.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"contribution key {key!r} is not a (layer, tensor_class) pair")
        layer, cls = key
        try:
            if isinstance(layer, bool):
                raise TypeError
            layer = operator.index(layer)
        except TypeError:
            raise ValueError(f"contribution {key!r}: layer {layer!r} is not an integer") from None
        if layer < NON_LAYER:
            raise ValueError(f"contribution {key!r}: layer {layer} (use -1 for token_embd/output)")
        if not isinstance(cls, str) or not cls:
            raise ValueError(f"contribution {key!r}: tensor class {cls!r} is not a name")
        try:
            if isinstance(v, bool):
                raise TypeError
            fv = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"contribution {key!r}: {v!r} is not a number") from None
        if not math.isfinite(fv):
            raise ValueError(f"contribution {key!r}: {fv} is not finite")
        if (layer, cls) in out:
            raise ValueError(f"contribution {key!r} given twice")
        out[(layer, cls)] = fv
    return out


def _layer_name(layer: int) -> str:
    return "non-layer" if layer == NON_LAYER else str(layer)


def write_sensitivity_heatmap(contrib: Mapping[tuple[int, str], float], out: Path, title: str) -> Path:
    """A layer x tensor-class heatmap PNG of KLD contributions, log colour scale with a colourbar; the
    non-layer tensors on their own first row; cells with no tensor (or a contribution <= 0, which a log scale
    cannot show) left grey. Small grids carry their values. Returns ``out``."""
    import matplotlib.style
    import numpy as np
    from matplotlib import rc_context
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    cells = _checked(contrib)
    if not cells:
        raise ValueError(f"no contributions to draw for {out}")
    layers = sorted({layer for layer, _ in cells})
    classes = class_order({c for _, c in cells})
    grid = np.full((len(layers), len(classes)), np.nan)
    li = {layer: i for i, layer in enumerate(layers)}
    ci = {c: j for j, c in enumerate(classes)}
    for (layer, c), v in cells.items():
        grid[li[layer], ci[c]] = v
    pos = grid[np.isfinite(grid) & (grid > 0)]
    if pos.size:
        vmin, vmax = float(pos.min()), float(pos.max())
        if vmax <= vmin * 1.0001:
            vmin, vmax = vmin / 2, vmax * 2
        norm: Normalize = LogNorm(vmin=vmin, vmax=vmax)
    else:
        norm = Normalize(vmin=0.0, vmax=1.0)
    shown = np.ma.masked_where(~(np.isfinite(grid) & (grid > 0)), grid)

    nr, nc = len(layers), len(classes)
    width = min(max(4.5 + 0.62 * nc, 6.0), 22.0)
    height = min(max(1.6 + 0.24 * nr, 3.5), 40.0)
    with matplotlib.style.context("default"), rc_context(RC):
        fig = Figure(figsize=(round(width, 2), round(height, 2)), dpi=100, layout="constrained")
        ax = fig.subplots()
        ax.set_facecolor("#d9d9d9")
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
        im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_xticks(range(nc), classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        step = max(1, math.ceil(nr / 64))
        ax.set_yticks(range(0, nr, step), [_layer_name(layers[i]) for i in range(0, nr, step)], fontsize=7)
        ax.grid(False)
        if layers[0] == NON_LAYER and nr > 1:
            ax.axhline(0.5, color="white", linewidth=2.5)  # the non-layer row is not block -1
        ax.set_xlabel("tensor class")
        ax.set_ylabel("layer")
        if nr * nc <= 300:
            for i in range(nr):
                for j in range(nc):
                    v = grid[i, j]
                    if np.isfinite(v):
                        dark = v > 0 and pos.size and norm(v) < 0.6
                        ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                                color="white" if dark else "black")
        cb = fig.colorbar(im, ax=ax)
        cb.set_label("KLD contribution" + (" (log scale)" if pos.size else " (none positive)"))
        ax.set_title(title)
        return save_png(fig, Path(out))


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _share(x: float, total: float) -> str:
    return f"{100.0 * x / total:.1f}%" if total > 0 else "—"


def _table(head: list[str], body: list[list[str]]) -> str:
    align = ["---"] + ["--:"] * (len(head) - 1)
    return "\n".join(["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
                     + ["| " + " | ".join(r) + " |" for r in body])


def render_sensitivity_table(contrib: Mapping[tuple[int, str], float], top: int = 20) -> str:
    """Markdown: the total, then KLD per tensor class (total, share, cells; largest first), per layer (block
    order, "non-layer" first, naming its classes), and the ``top`` largest (layer, class) cells with their
    cumulative share."""
    cells = _checked(contrib)
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be a non-negative integer, got {top!r}")
    total = math.fsum(cells.values())
    by_class: dict[str, list[float]] = defaultdict(list)
    by_layer: dict[int, list[float]] = defaultdict(list)
    for (layer, c), v in cells.items():
        by_class[c].append(v)
        by_layer[layer].append(v)
    order = class_order(set(by_class))
    class_tot = {c: math.fsum(by_class[c]) for c in order}
    classes = sorted(order, key=lambda c: (-class_tot[c], order.index(c)))
    parts = [f"Total predicted KLD: {_fmt(total)} over {len(cells)} (layer, class) cells."]

    body = [[c, _fmt(class_tot[c]), _share(class_tot[c], total), str(len(by_class[c]))] for c in classes]
    body.append(["**total**", _fmt(total), _share(total, total), str(len(cells))])
    parts += ["### KLD per tensor class", _table(["Class", "KLD", "Share", "Cells"], body)]

    body = []
    for layer in sorted(by_layer):
        name = _layer_name(layer)
        if layer == NON_LAYER:
            name += " (" + ", ".join(class_order({c for (lay, c) in cells if lay == NON_LAYER})) + ")"
        t = math.fsum(by_layer[layer])
        body.append([name, _fmt(t), _share(t, total)])
    body.append(["**total**", _fmt(total), _share(total, total)])
    parts += ["### KLD per layer", _table(["Layer", "KLD", "Share"], body)]

    ranked = sorted(cells.items(), key=lambda kv: (-kv[1], kv[0][0], order.index(kv[0][1])))[:top]
    body, cum = [], []
    for rank, ((layer, c), v) in enumerate(ranked, 1):
        cum.append(v)
        body.append([str(rank), _layer_name(layer), c, _fmt(v), _share(v, total), _share(math.fsum(cum), total)])
    parts += [f"### Top {len(ranked)} cells",
              _table(["Rank", "Layer", "Class", "KLD", "Share", "Cumulative"], body)]
    return "\n\n".join(parts) + "\n"
