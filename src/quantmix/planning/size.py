"""Exact size accounting: bytes of tensor data per tensor, per class and in total, under a recipe.

Units, used everywhere in quantmix: size = bytes of tensor data (what llama-quantize reports as the quant
size, header and alignment padding excluded); BPW = 8 x bytes / all elements, F32 tensors included. The size
of a file with its metadata is reported separately where a GGUF is at hand.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from quantmix.planning.recipe import Resolution

GIB = 1024**3
MIB = 1024**2


@dataclass
class SizeRow:
    """Totals of one group of tensors (a tensor class, or the whole model)."""

    label: str
    n_tensors: int = 0
    n_elements: int = 0
    n_bytes: int = 0
    types: dict[str, int] = field(default_factory=dict)  # type -> elements

    @property
    def bpw(self) -> float:
        return 8.0 * self.n_bytes / self.n_elements if self.n_elements else 0.0

    def add(self, n_elements: int, n_bytes: int, qtype: str) -> None:
        self.n_tensors += 1
        self.n_elements += n_elements
        self.n_bytes += n_bytes
        self.types[qtype] = self.types.get(qtype, 0) + n_elements


@dataclass
class SizeReport:
    """Sizes of a resolved recipe: per tensor class and in total."""

    resolution: Resolution
    by_class: dict[str, SizeRow]
    total: SizeRow

    @property
    def n_bytes(self) -> int:
        return self.total.n_bytes

    @property
    def bpw(self) -> float:
        return self.total.bpw

    def headline(self) -> str:
        """``NNN.NN GiB (N.NNN BPW)``, the way llama.cpp reports a model's size."""
        return format_size(self.total.n_bytes, self.total.n_elements)


def format_size(n_bytes: int, n_elements: int) -> str:
    return f"{n_bytes / GIB:.2f} GiB ({8.0 * n_bytes / n_elements:.3f} BPW)"


def size_report(resolution: Resolution) -> SizeReport:
    """Bytes of every tensor under the resolved recipe, grouped by tensor class."""
    by_class: dict[str, SizeRow] = defaultdict(lambda: SizeRow(""))
    total = SizeRow("total")
    for a in resolution.assignments:
        n_el, n_b = a.tensor.n_elements, a.n_bytes
        row = by_class[a.tensor.tensor_class]
        row.label = a.tensor.tensor_class
        row.add(n_el, n_b, a.qtype)
        total.add(n_el, n_b, a.qtype)
    return SizeReport(resolution, dict(by_class), total)


def render_size_table(report: SizeReport) -> str:
    """A plain-text table per tensor class, then the total."""
    head = f"{'class':<16} {'tensors':>7} {'elements':>15} {'MiB':>11} {'BPW':>7}  types"
    lines = [head, "-" * len(head)]
    for label in sorted(report.by_class, key=lambda k: -report.by_class[k].n_bytes):
        r = report.by_class[label]
        types = ", ".join(f"{t}" for t in sorted(r.types, key=lambda t: -r.types[t]))
        lines.append(f"{label:<16} {r.n_tensors:>7} {r.n_elements:>15,} {r.n_bytes / MIB:>11.2f} {r.bpw:>7.3f}  {types}")
    lines.append("-" * len(head))
    t = report.total
    lines.append(f"{'total':<16} {t.n_tensors:>7} {t.n_elements:>15,} {t.n_bytes / MIB:>11.2f} {t.bpw:>7.3f}")
    lines.append(f"size: {report.headline()}  [{report.resolution.spec.describe()}]")
    fb = report.resolution.fallbacks
    if fb:
        lines.append(f"note: {len(fb)} tensor(s) fell back to a 32-block type because their rows do not fit the "
                     f"requested type's block (first: {fb[0].tensor.name}: {fb[0].requested} -> {fb[0].qtype})")
    return "\n".join(lines)
