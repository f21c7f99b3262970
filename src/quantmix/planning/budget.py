"""Size budgets for the optimizer: a file size, a bits-per-weight target, or the memory of the machine that runs it.

A budget is a list of *pools*, each with a capacity in bytes, and a rule saying which pools each tensor is
charged to and for how many bytes:

- ``--target-size 24GiB`` / ``--target-bpw 3.5``: one pool, ``file``; every tensor is charged its data bytes
  (BPW = 8 x bytes / all elements, F32 tensors included, as in :mod:`quantmix.planning.size`).
- ``--vram 24GiB --ctx 32768 --kv-type q8_0``: one pool, ``vram``, whose capacity is the card's memory less the
  KV cache llama.cpp allocates for that context (computed as ``llama_kv_cache`` does) and a stated compute
  margin (:class:`ComputeMargin`). Tensors are charged what the CUDA backend allocates for them (row padding
  and 128-byte alignment included). Tensors that do not live in VRAM are not charged: llama.cpp always keeps
  ``token_embd`` on the CPU ("input layer"), and does not load GLM's NextN/MTP layers unless MTP speculative
  decoding is on.
- ``--vram X --ram Y``: two pools. Tensors whose name matches a regex (default: the routed experts,
  ``ffn_.*_exps``) live in system RAM (``-ot "REGEX=CPU"``), with ``token_embd``; the rest in VRAM. With op
  offload on (llama.cpp's default), the CUDA backend copies a CPU-resident weight into its compute buffer to
  run a large batch on the GPU, one weight at a time: the VRAM pool reserves room for the largest of them.
- a file pool can be added to the memory pools (``--target-size`` with ``--vram``).

Assumptions (stated, not hidden): one GPU, every layer offloaded (``-ngl 999``), unified KV cache, models
without sliding-window attention. ``max_context`` answers the reverse question for a chosen recipe.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import TYPE_CHECKING

from quantmix.formats.registry import get_type
from quantmix.model.catalog import Catalog, ModelHParams, TensorInfo
from quantmix.planning.llama_rules import is_quantized_type

if TYPE_CHECKING:
    from quantmix.planning.recipe import Resolution

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4


class BudgetError(ValueError):
    """A budget cannot be built: a malformed size, an unknown KV type, or a context that does not fit."""


# --------------------------------------------------------------------------------------------------- sizes

_UNITS = {
    "b": 1, "": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """``24GiB`` -> 25769803776, ``24GB`` -> 24000000000, ``1.5 MiB``, ``1000`` (bytes).

    Binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) units are exact; a fractional byte count is rounded
    down, so a budget never grows. Bare ``K``/``M``/``G``/``T`` are refused: they mean either.
    """
    if isinstance(text, int):
        if text < 0:
            raise BudgetError(f"size {text}: must not be negative")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise BudgetError(f"size {text!r}: expected a number and a unit, e.g. 24GiB, 24GB, 512MiB or 1000000")
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        hint = f" (write {unit.upper()}iB for powers of 1024 or {unit.upper()}B for powers of 1000)" \
            if unit in ("k", "m", "g", "t") else ""
        raise BudgetError(f"size {text!r}: unknown unit {m.group(2)!r}{hint}; "
                          f"use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    try:
        value = Fraction(Decimal(number)) * _UNITS[unit]
    except InvalidOperation:
        raise BudgetError(f"size {text!r}: {number!r} is not a number") from None
    return int(value)  # floor: value >= 0


def format_bytes(n: int) -> str:
    """``25769803776`` -> ``24.000 GiB (25,769,803,776 bytes)``."""
    return f"{n / GIB:.3f} GiB ({n:,} bytes)"


def bpw_bytes(catalog: Catalog, bpw: float | str) -> int:
    """The byte budget of a bits-per-weight target: floor(bpw x all elements / 8), decimal-exact (``3.5``)."""
    try:
        d = Decimal(str(bpw).strip())
    except InvalidOperation:
        raise BudgetError(f"--target-bpw {bpw!r}: not a number") from None
    if not d.is_finite():
        raise BudgetError(f"--target-bpw {bpw!r}: must be a finite number of bits per weight, e.g. 3.5")
    b = Fraction(d)
    if b <= 0:
        raise BudgetError(f"--target-bpw {bpw!r}: must be positive")
    return int(b * catalog.n_elements / 8)


# ------------------------------------------------------------------------------------------------ KV cache

KV_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1")  # common/arg.cpp kv_cache_types
KV_PAD = 256  # llama_context pads n_ctx (and n_ctx_seq) up to a multiple of 256


def kv_type(name: str) -> str:
    """A ``--cache-type-k/-v`` name (``q8_0``) -> GGML type name, or an error listing what llama.cpp accepts."""
    t = str(name).strip().upper()
    if t not in KV_TYPES:
        raise BudgetError(f"KV cache type {name!r}: llama.cpp accepts {', '.join(k.lower() for k in KV_TYPES)}")
    return t


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def kv_cells(ctx: int, n_seq: int = 1, unified: bool = True) -> int:
    """Cells llama.cpp allocates per KV stream for ``-c ctx`` (n_ctx_seq; times the streams when not unified)."""
    if ctx <= 0:
        raise BudgetError(f"context {ctx}: must be positive")
    n_ctx = _pad(ctx, KV_PAD)
    if unified or n_seq == 1:
        return n_ctx
    return _pad(n_ctx // n_seq, KV_PAD)


@dataclass(frozen=True)
class KVCache:
    """The KV cache llama.cpp allocates: bytes of K and V (what its ``llama_kv_cache: size =`` line reports)."""

    n_ctx: int  # cells per stream
    n_stream: int
    n_layers: int  # layers with a cache
    type_k: str
    type_v: str
    k_bytes: int
    v_bytes: int
    vram_bytes: int  # as the CUDA backend allocates it (row padding, 128-byte alignment)

    @property
    def n_bytes(self) -> int:
        return self.k_bytes + self.v_bytes

    def describe(self) -> str:
        return (f"KV cache {self.n_bytes / MIB:.2f} MiB ({self.n_ctx} cells x {self.n_stream} stream(s), "
                f"{self.n_layers} layers, K {self.type_k.lower()} {self.k_bytes / MIB:.2f} MiB, "
                f"V {self.type_v.lower()} {self.v_bytes / MIB:.2f} MiB)")


def _kv_layers(hp: ModelHParams, mtp: bool) -> int:
    # The main context caches the trunk layers only (llama_model::create_memory filters il < n_layer()); with
    # MTP speculative decoding a second context caches the NextN layers: both then live on the GPU.
    return hp.n_layer if mtp else hp.n_layer - hp.n_nextn


def kv_cache(hp: ModelHParams, ctx: int, type_k: str = "f16", type_v: str | None = None, *, n_seq: int = 1,
             unified: bool = True, mtp: bool = False) -> KVCache:
    """KV cache bytes for ``-c ctx -ctk type_k -ctv type_v`` exactly as ``llama_kv_cache`` allocates them.

    Per layer: K = row bytes of ``n_embd_k_gqa`` in type_k x cells x streams, V likewise with ``n_embd_v_gqa``
    (block types by their blocks: q8_0 is 34 bytes per 32 values). MLA models (DeepSeek-V2/V3: ``kv_lora_rank``)
    cache one latent row of ``kv_lora_rank + rope dim`` per token in K and no V.
    """
    tk = kv_type(type_k)
    tv = kv_type(type_v if type_v is not None else type_k)
    cells = kv_cells(ctx, n_seq, unified)
    n_stream = 1 if unified else max(1, n_seq)
    n_layers = _kv_layers(hp, mtp)
    if hp.kv_lora_rank:
        k_row, v_row = hp.kv_lora_rank + hp.rope_dim_mla, 0
    else:
        if not (hp.n_head_kv and hp.head_dim_k and hp.head_dim_v):
            raise BudgetError(f"{hp.arch}: the catalog has no KV-head dimensions (n_head_kv, head_dim): "
                              f"cannot size the KV cache")
        k_row, v_row = hp.n_head_kv * hp.head_dim_k, hp.n_head_kv * hp.head_dim_v
    for row, t in ((k_row, tk), (v_row, tv)):
        if row and not get_type(t).fits_row(row):
            raise BudgetError(f"KV cache type {t.lower()}: rows of {row} values are not a multiple of its "
                              f"block ({get_type(t).block_size}); llama.cpp refuses this cache type")
    rows = cells * n_stream
    k_layer = get_type(tk).row_bytes(k_row) * rows
    v_layer = get_type(tv).row_bytes(v_row) * rows if v_row else 0
    vram = n_layers * (cuda_alloc_bytes(tk, (k_row, cells, n_stream))
                       + (cuda_alloc_bytes(tv, (v_row, cells, n_stream)) if v_row else 0))
    return KVCache(cells, n_stream, n_layers, tk, tv, n_layers * k_layer, n_layers * v_layer, vram)


# ------------------------------------------------------------------------------------------ device bytes

CUDA_ALIGNMENT = 128  # ggml_backend_cuda_buffer_type_get_alignment
CUDA_MATRIX_ROW_PADDING = 512  # ggml-cuda/common.cuh MATRIX_ROW_PADDING
CPU_ALIGNMENT = 32  # GGUF data alignment (the mmap'd file is what the CPU reads)


def cuda_alloc_bytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes the CUDA backend allocates for a tensor: its data, plus (quantized types) one padded partial row so
    the last row is a multiple of 512 values (``get_alloc_size``), rounded up to the 128-byte alignment."""
    t = get_type(qtype)
    size = t.tensor_bytes(shape)
    if is_quantized_type(t.name) and shape[0] % CUDA_MATRIX_ROW_PADDING:
        size += t.row_bytes(CUDA_MATRIX_ROW_PADDING - shape[0] % CUDA_MATRIX_ROW_PADDING)
    return _pad(size, CUDA_ALIGNMENT)


def host_alloc_bytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor occupies in system RAM: its data rounded up to the GGUF alignment (32)."""
    return _pad(get_type(qtype).tensor_bytes(shape), CPU_ALIGNMENT)


# -------------------------------------------------------------------------------------------- placement

DEFAULT_CPU_REGEX = r"ffn_.*_exps"


@dataclass(frozen=True)
class Placement:
    """Where llama.cpp keeps each tensor with every layer offloaded (``-ngl 999``) and ``-ot REGEX=CPU``.

    ``cpu_regex=None``: nothing is overridden. ``mtp``: MTP speculative decoding is on, so the NextN layers
    are loaded (and cached) too.
    """

    cpu_regex: str | None = None
    mtp: bool = False

    def __post_init__(self) -> None:
        if self.cpu_regex is not None:
            try:
                re.compile(self.cpu_regex)
            except re.error as e:
                raise BudgetError(f"--cpu-tensors {self.cpu_regex!r}: not a valid regex ({e})") from None

    def residence(self, catalog: Catalog) -> dict[str, tuple[str, ...]]:
        """Per tensor: the memories holding it, ``("cpu",)``, ``("gpu",)``, both (a tied embedding, duplicated
        for the output layer), or none (NextN layers not loaded)."""
        rx = re.compile(self.cpu_regex) if self.cpu_regex else None
        tied = not any(t.name == "output.weight" for t in catalog)
        first_nextn = catalog.hparams.n_layer - catalog.hparams.n_nextn
        out: dict[str, tuple[str, ...]] = {}
        for t in catalog:
            if catalog.hparams.n_nextn and t.layer is not None and t.layer >= first_nextn and not self.mtp:
                out[t.name] = ()
            elif t.name == "token_embd.weight":
                out[t.name] = ("cpu", "gpu") if tied else ("cpu",)
            elif rx is not None and rx.search(t.name):
                out[t.name] = ("cpu",)
            else:
                out[t.name] = ("gpu",)
        return out

    def override_tensor_arg(self) -> str | None:
        """The llama.cpp option that puts the CPU tensors in system RAM: ``-ot "ffn_.*_exps=CPU"``."""
        return f'-ot "{self.cpu_regex}=CPU"' if self.cpu_regex else None


# ----------------------------------------------------------------------------------------- compute margin


@dataclass(frozen=True)
class ComputeMargin:
    """VRAM that is neither weights nor KV cache, reserved from the ``--vram`` figure. An estimate, stated:

    - ``overhead`` (default 512 MiB): the CUDA context, cuBLAS workspaces and allocator slack, which llama.cpp
      does not count in its buffers but which occupy the card (typically 300-500 MiB on recent GPUs).
    - the compute buffer llama.cpp reserves for one micro-batch (``n_ubatch``, default 512): F32 logits
      (``4 x n_ubatch x n_vocab``, the largest term) plus activations, taken as ``4 x n_ubatch x 8 x n_embd``.
      Without flash attention the F32 attention scores add ``4 x n_ubatch x n_head x n_ctx``.
      Checked on the CPU backend (SmolLM2 fixture, ubatch 512): llama.cpp reports 100-104 MiB with flash
      attention and 169 MiB without at 8192 cells; this formula gives 108 MiB and 252 MiB.
    - with ``op_offload`` (llama.cpp's default) and weights in system RAM, the copy of the largest CPU-resident
      weight that the CUDA backend makes to run a big batch on the GPU: the solver reserves it exactly from the
      chosen types.
    """

    overhead: int = 512 * MIB
    n_ubatch: int = 512
    flash_attn: bool = True
    op_offload: bool = True

    def graph_bytes(self, hp: ModelHParams, n_ctx: int) -> int:
        """The compute-buffer estimate for this model and context (bytes)."""
        b = 4 * self.n_ubatch * (hp.vocab_size + 8 * hp.n_embd)
        if not self.flash_attn:
            b += 4 * self.n_ubatch * hp.n_head * n_ctx
        return b

    def total(self, hp: ModelHParams, n_ctx: int) -> int:
        return self.overhead + self.graph_bytes(hp, n_ctx)


# --------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Pool:
    """One capacity: ``file`` (tensor data bytes), ``vram`` or ``ram`` (device bytes), and how it was derived."""

    name: str
    capacity: int
    detail: str = ""


@dataclass
class Budget:
    """Pools and the rule charging each tensor to them. Build with :meth:`of_size`, :meth:`of_bpw`, :meth:`of_memory`."""

    pools: tuple[Pool, ...]
    placement: Placement | None = None  # None: no memory pools
    kv: KVCache | None = None
    margin: ComputeMargin | None = None
    notes: list[str] = field(default_factory=list)

    # ---- constructors

    @classmethod
    def of_size(cls, size: str | int) -> Budget:
        n = parse_size(size)
        return cls((Pool("file", n, f"--target-size {size}"),))

    @classmethod
    def of_bpw(cls, catalog: Catalog, bpw: float | str) -> Budget:
        n = bpw_bytes(catalog, bpw)
        return cls((Pool("file", n, f"--target-bpw {bpw}: {bpw} x {catalog.n_elements:,} elements / 8"),))

    @classmethod
    def of_memory(cls, catalog: Catalog, vram: str | int, ctx: int, type_k: str = "f16",
                  type_v: str | None = None, *, ram: str | int | None = None, cpu_regex: str | None = None,
                  margin: ComputeMargin | None = None, n_seq: int = 1, mtp: bool = False,
                  file_size: str | int | None = None) -> Budget:
        """VRAM (and optionally RAM) budget for running the model at context ``ctx``.

        With ``ram``, tensors matching ``cpu_regex`` (default ``ffn_.*_exps``) go to system RAM.
        """
        margin = margin or ComputeMargin()
        if ram is not None and cpu_regex is None:
            cpu_regex = DEFAULT_CPU_REGEX
        placement = Placement(cpu_regex, mtp)
        hp = catalog.hparams
        kv = kv_cache(hp, ctx, type_k, type_v, n_seq=n_seq, mtp=mtp)
        v = parse_size(vram)
        graph = margin.graph_bytes(hp, kv.n_ctx)
        cap = v - kv.vram_bytes - margin.overhead - graph
        notes = [(f"vram {format_bytes(v)} - {kv.describe()} [{format_bytes(kv.vram_bytes)} on the GPU]"
                  f" - overhead {format_bytes(margin.overhead)} - compute buffer {format_bytes(graph)}"
                  f" (ubatch {margin.n_ubatch}, flash attention {'on' if margin.flash_attn else 'off'})"
                  f" = {format_bytes(cap)} for weights")]
        if cap <= 0:
            raise BudgetError(f"--vram {vram}: the KV cache for {ctx} tokens and the compute margin alone need "
                              f"{format_bytes(v - cap)}; nothing is left for weights")
        pools = [Pool("vram", cap, notes[0])]
        if ram is None:
            notes.append("token_embd stays in system RAM (llama.cpp keeps the input layer on the CPU): no pool "
                         "limits it unless --target-size caps the file")
        if ram is not None:
            r = parse_size(ram)
            pools.append(Pool("ram", r, f"ram {format_bytes(r)} for tensors matching {cpu_regex!r} and token_embd"))
            if margin.op_offload:
                notes.append("op offload: the VRAM pool also holds a copy of the largest CPU-resident weight")
        if file_size is not None:
            pools.append(Pool("file", parse_size(file_size), f"--target-size {file_size}"))
        return cls(tuple(pools), placement, kv, margin, notes)

    # ---- charging

    def pool_index(self, name: str) -> int | None:
        return next((i for i, p in enumerate(self.pools) if p.name == name), None)

    def charger(self, catalog: Catalog) -> TensorCharger:
        """What each tensor costs in each pool, for any type: used by the solver and by :func:`usage`."""
        return TensorCharger(self, self.placement.residence(catalog) if self.placement else {})

    def override_tensor_arg(self) -> str | None:
        """The ``-ot`` option to run the planned model with (None when nothing goes to system RAM)."""
        if self.placement is None or self.pool_index("ram") is None:
            return None
        return self.placement.override_tensor_arg()

    def describe(self) -> str:
        lines = [f"pool {p.name}: {format_bytes(p.capacity)}  [{p.detail}]" for p in self.pools]
        return "\n".join(lines + [n for n in self.notes[1:]])


@dataclass
class TensorCharger:
    """Bytes a tensor of a given type takes in each pool of a budget."""

    budget: Budget
    residence: dict[str, tuple[str, ...]]

    def usage(self, t: TensorInfo, qtype: str) -> tuple[int, ...]:
        out = []
        where = self.residence.get(t.name, ())
        for p in self.budget.pools:
            if p.name == "file":
                out.append(get_type(qtype).tensor_bytes(t.shape))
            elif p.name == "vram":
                out.append(cuda_alloc_bytes(qtype, t.shape) if "gpu" in where else 0)
            elif p.name == "ram":
                out.append(host_alloc_bytes(qtype, t.shape) if "cpu" in where else 0)
            else:
                raise BudgetError(f"unknown pool {p.name!r}")
        return tuple(out)

    def reserve(self, t: TensorInfo, qtype: str) -> tuple[int, ...]:
        """Per pool, the room this tensor needs reserved while it is computed elsewhere: a CPU-resident weight
        that the CUDA backend copies to the GPU for large batches (op offload). token_embd (GET_ROWS) is never
        offloaded."""
        out = [0] * len(self.budget.pools)
        m = self.budget.margin
        iv = self.budget.pool_index("vram")
        if (iv is not None and m is not None and m.op_offload and self.residence.get(t.name) == ("cpu",)
                and t.name != "token_embd.weight" and len(t.shape) >= 2):
            out[iv] = cuda_alloc_bytes(qtype, t.shape)
        return tuple(out)

    @property
    def has_reserve(self) -> tuple[bool, ...]:
        m = self.budget.margin
        return tuple(p.name == "vram" and m is not None and m.op_offload for p in self.budget.pools)


def usage(budget: Budget, resolution: Resolution) -> tuple[int, ...]:
    """Bytes a resolved recipe uses in each pool of ``budget`` (op-offload reserve included)."""
    ch = budget.charger(resolution.catalog)
    total = [0] * len(budget.pools)
    reserve = [0] * len(budget.pools)
    for a in resolution.assignments:
        for i, b in enumerate(ch.usage(a.tensor, a.qtype)):
            total[i] += b
        for i, b in enumerate(ch.reserve(a.tensor, a.qtype)):
            reserve[i] = max(reserve[i], b)
    return tuple(t + r for t, r in zip(total, reserve))


# ------------------------------------------------------------------------------------------- max context


def max_context(catalog: Catalog, recipe: Resolution | int, vram: str | int, type_k: str = "f16",
                type_v: str | None = None, *, cpu_regex: str | None = None, margin: ComputeMargin | None = None,
                n_seq: int = 1, mtp: bool = False) -> int:
    """The largest context (a multiple of 256, as llama.cpp pads it) at which a recipe fits in ``vram``.

    ``recipe``: a resolved recipe, or the bytes it needs on the GPU (weights and op-offload reserve) as an int.
    Raises :class:`BudgetError` when not even 256 tokens fit.
    """
    margin = margin or ComputeMargin()
    v = parse_size(vram)
    if isinstance(recipe, int):
        weights = recipe
    else:
        pools = (Pool("vram", v),) + ((Pool("ram", 0),) if cpu_regex else ())
        weights = usage(Budget(pools, Placement(cpu_regex, mtp), None, margin), recipe)[0]

    def fits(n_ctx: int) -> bool:
        kv = kv_cache(catalog.hparams, n_ctx, type_k, type_v, n_seq=n_seq, mtp=mtp)
        return weights + kv.vram_bytes + margin.total(catalog.hparams, kv.n_ctx) <= v

    if not fits(KV_PAD):
        need = weights + kv_cache(catalog.hparams, KV_PAD, type_k, type_v, n_seq=n_seq, mtp=mtp).vram_bytes \
            + margin.total(catalog.hparams, KV_PAD)
        raise BudgetError(f"the recipe does not fit in {format_bytes(v)} even at 256 tokens of context "
                          f"(needs {format_bytes(need)})")
    lo, hi = 1, 2
    while fits(hi * KV_PAD):
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            break
    while hi - lo > 1:  # fits(lo), not fits(hi): memory grows with the context
        mid = (lo + hi) // 2
        if fits(mid * KV_PAD):
            lo = mid
        else:
            hi = mid
    return lo * KV_PAD


# --------------------------------------------------------------------------------------------------- CLI


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The budget options of ``quantmix optimize``."""
    g = parser.add_argument_group("budget (one of --target-bpw, --target-size, --vram; --target-size may join --vram)")
    g.add_argument("--target-bpw", help="bits per weight over all elements, F32 tensors included (e.g. 3.5)")
    g.add_argument("--target-size", help="bytes of tensor data: 24GiB (binary), 24GB (decimal), 512MiB, 1000000")
    g.add_argument("--vram", help="GPU memory to fit the model, its KV cache and a compute margin into (e.g. 24GiB)")
    g.add_argument("--ram", help="with --vram: system RAM for the tensors matching --cpu-tensors (and token_embd)")
    g.add_argument("--cpu-tensors", default=None,
                   help=f"with --ram: regex of the tensors kept in system RAM (default {DEFAULT_CPU_REGEX!r})")
    g.add_argument("--ctx", type=int, default=None, help="with --vram: context length (tokens) to leave room for")
    g.add_argument("--kv-type", default="f16", help="KV cache type for K (and V unless --kv-type-v): f16, q8_0, ...")
    g.add_argument("--kv-type-v", default=None, help="KV cache type for V (default: --kv-type)")
    g.add_argument("--parallel", type=int, default=1, help="sequences sharing the (unified) KV cache")
    g.add_argument("--vram-overhead", default="512MiB", help="VRAM kept for the CUDA context and allocator slack")
    g.add_argument("--ubatch", type=int, default=512, help="llama.cpp's micro-batch (-ub), which sizes the compute buffer")
    g.add_argument("--no-flash-attn", action="store_true", help="size the compute buffer for attention without FA")
    g.add_argument("--no-op-offload", action="store_true",
                   help="llama.cpp runs with --no-op-offload: no VRAM is reserved for copies of CPU weights")
    g.add_argument("--mtp", action="store_true", help="MTP speculative decoding on: NextN layers are loaded")


def budget_from_args(args: argparse.Namespace, catalog: Catalog) -> Budget:
    """Build the budget the options ask for, or a clear error naming the offending option."""
    if args.vram is None:
        for opt in ("ram", "ctx", "cpu_tensors"):
            if getattr(args, opt) is not None:
                raise BudgetError(f"--{opt.replace('_', '-')} needs --vram")
        if (args.target_bpw is None) == (args.target_size is None):
            raise BudgetError("give exactly one budget: --target-bpw, --target-size or --vram")
        return Budget.of_bpw(catalog, args.target_bpw) if args.target_bpw is not None \
            else Budget.of_size(args.target_size)
    if args.target_bpw is not None:
        raise BudgetError("--target-bpw and --vram do not combine; use --target-size to also cap the file")
    if args.ctx is None:
        raise BudgetError("--vram needs --ctx (the context length to leave KV-cache room for)")
    if args.cpu_tensors is not None and args.ram is None:
        raise BudgetError("--cpu-tensors needs --ram (the system RAM those tensors may use)")
    margin = ComputeMargin(parse_size(args.vram_overhead), args.ubatch, not args.no_flash_attn, not args.no_op_offload)
    return Budget.of_memory(catalog, args.vram, args.ctx, args.kv_type, args.kv_type_v, ram=args.ram,
                            cpu_regex=args.cpu_tensors, margin=margin, n_seq=args.parallel, mtp=args.mtp,
                            file_size=args.target_size)
