"""Public quantize / dequantize / error API over the GGML type registry.

Numerics are attached to registry types by name through :func:`register_numerics`; each module that
implements types (simple.py, iq4.py, kquants.py, ...) registers them when imported, and this module imports
them lazily on first use (so importing ``quantmix.formats`` stays cheap and free of cycles).

All quantizers reproduce ``ggml_quantize_chunk`` byte for byte: without an imatrix the ``*_ref`` paths,
with one the ``*_impl`` paths (see quantmix.tools.ggml_oracle, which the tests compare against).

Backends: ``"torch"`` is the reference implementation of every type (CPU or GPU tensors). ``"cuda"`` is
the fused CUDA kernels of :mod:`quantmix.formats.gpu` (the block quants: k-quants, Q4_0..Q8_0, IQ4_NL, IQ4_XS): the same bytes (they repeat ggml's
float32 arithmetic exactly; tests check them against ggml and against the torch path), hundreds of times
faster on a GPU, and a quant_error that never materializes the bytes. ``"ggml"`` is ggml's own C quantizer
on CPU tensors (:mod:`quantmix.formats.ggml_backend`, needs the cached llama.cpp build): the same bytes by
definition, used where the torch numerics are slow on a CPU (the codebook types). ``"auto"`` (the default)
takes ``"cuda"`` for CUDA tensors of a type that has kernels and ``"torch"`` otherwise; it never picks
``"ggml"``, so the torch numerics stay what the tests compare with ggml. QuantError records which backend
computed it, so caches can tell.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from quantmix.formats.registry import GGMLType, all_types, get_type

QuantizeRows = Callable[[Tensor, "Tensor | None"], Tensor]
DequantizeRows = Callable[[Tensor, int], Tensor]

# Modules that register numerics when imported; missing ones are skipped (owned by other helpers).
NUMERICS_MODULES = (
    "quantmix.formats.simple",
    "quantmix.formats.iq4",
    "quantmix.formats.kquants",
    "quantmix.formats.iq3",
    "quantmix.formats.iq2",
    "quantmix.formats.iq1",
    "quantmix.formats.mxfp4",
)

# Rows per call into a type's quantize_rows are chosen so that one call sees about this many weights:
# bounded memory (the solvers hold ~20 temporaries of the chunk's size) with little per-call overhead.
# GPUs take bigger chunks: their cost is per kernel launch, and the per-position loops launch many.
CHUNK_WEIGHTS = 1 << 21
CHUNK_WEIGHTS_GPU = 1 << 25
# The CUDA kernels hold ~7 bytes of scratch per weight: 2^27 weights per launch keeps that under 1 GB.
CHUNK_WEIGHTS_KERNEL = 1 << 27

BACKENDS = ("auto", "torch", "cuda", "ggml")

# Bump when any numerics change what quant_error returns: keys the cached error tables (measurement.error_table).
NUMERICS_VERSION = "1"


class UnsupportedTypeError(NotImplementedError):
    """The type is known to the registry but quantmix has no numerics for it (it can still be costed)."""


@dataclass(frozen=True)
class Numerics:
    """The numerics of one GGML type.

    quantize_rows(x float32 [rows, n], imatrix float32 [n] | None) -> uint8 [rows, row_bytes]
    dequantize_rows(q uint8 [rows, row_bytes], n) -> float32 [rows, n]
    uses_imatrix: False where the imatrix cannot change the bytes (Q8_0, float types).
    """

    name: str
    quantize_rows: QuantizeRows
    dequantize_rows: DequantizeRows
    uses_imatrix: bool = True


@dataclass(frozen=True)
class QuantError:
    """Per-row error sums of a quantization, float64 tensors of shape [rows].

    err_w = sum_j w_j e_j^2, ref_w = sum_j w_j x_j^2 (w = imatrix, 1 without), bias = sum_j a_j e_j
    (only when act_mean a was given), e = dequant(quant(x)) - x. ``backend``: "torch" or "cuda"; the two
    agree to float64 rounding (they sum in different orders)."""

    err_w: Tensor
    ref_w: Tensor
    bias: Tensor | None = None
    backend: str = "torch"  # what computed it: "torch" / "ggml" (through the bytes) or "cuda" (fused kernels)

    def relative(self) -> Tensor:
        """err_w / ref_w per row (0 where the row's reference energy is 0)."""
        return torch.where(self.ref_w > 0, self.err_w / self.ref_w.clamp_min(1e-300), torch.zeros_like(self.err_w))


_NUMERICS: dict[str, Numerics] = {}
_loaded = False


def register_numerics(
    name: str,
    quantize_rows: QuantizeRows,
    dequantize_rows: DequantizeRows,
    *,
    uses_imatrix: bool = True,
) -> None:
    """Attach numerics to registry type ``name`` (which must exist). Registering twice is an error."""
    t = get_type(name)
    if t.name in _NUMERICS:
        raise RuntimeError(f"numerics for {t.name} registered twice")
    _NUMERICS[t.name] = Numerics(t.name, quantize_rows, dequantize_rows, uses_imatrix)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in NUMERICS_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def numerics(qtype: str | type[GGMLType]) -> Numerics:
    """The registered numerics of a type; UnknownTypeError / UnsupportedTypeError otherwise."""
    t = get_type(qtype)
    _load_all()
    try:
        return _NUMERICS[t.name]
    except KeyError:
        raise UnsupportedTypeError(
            f"{t.name}: quantmix has no quantize/dequantize for this type; supported: {', '.join(supported_types())}"
        ) from None


def supported_types() -> list[str]:
    """Names of the types with numerics, in ggml enum order."""
    _load_all()
    return [t.name for t in all_types() if t.name in _NUMERICS]


# ---- input checks ---------------------------------------------------------------------------------


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def _as_tensor(x: Tensor | np.ndarray, what: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _check_weights(x: Tensor | np.ndarray, name: str | None) -> Tensor:
    lab = _label(name)
    x = _as_tensor(x, lab)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # exact
    if x.dtype != torch.float32:
        raise ValueError(f"{lab}: expected float32 weights, got {x.dtype} (convert explicitly; ggml quantizes float32)")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{lab}: expected a 2-D [rows, n_per_row] tensor, got shape {tuple(x.shape)}")
    _check_finite(x, lab)
    return x.contiguous()


def _check_finite(x: Tensor, lab: str) -> None:
    if x.numel() and bool(torch.isfinite(x.sum())):
        return  # a finite sum proves every value finite (one cheap pass); else find the first bad value
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{lab}: non-finite value {float(x[r, c])} at row {r}, column {c}")


def _check_imatrix(imatrix: Tensor | np.ndarray | None, n: int, x: Tensor, lab: str) -> Tensor | None:
    if imatrix is None:
        return None
    im = _as_tensor(imatrix, f"{lab} imatrix")
    if not im.is_floating_point():
        raise ValueError(f"{lab}: imatrix must be floating point, got {im.dtype}")
    im = im.to(device=x.device, dtype=torch.float32).reshape(-1)
    if im.numel() != n:
        raise ValueError(f"{lab}: imatrix has {im.numel()} values, the rows have {n}")
    bad = ~torch.isfinite(im)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"{lab}: imatrix value {float(im[j])} at column {j} is not finite")
    if bool((im < 0).any()):
        j = int((im < 0).nonzero()[0, 0])
        raise ValueError(f"{lab}: imatrix value {float(im[j])} at column {j} is negative")
    return im.contiguous()


def _check_act(act_mean: Tensor | np.ndarray | None, n: int, x: Tensor, lab: str) -> Tensor | None:
    if act_mean is None:
        return None
    a = _as_tensor(act_mean, f"{lab} act_mean").to(device=x.device, dtype=torch.float64).reshape(-1)
    if a.numel() != n:
        raise ValueError(f"{lab}: act_mean has {a.numel()} values, the rows have {n}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{lab}: act_mean has non-finite values")
    return a


@dataclass(frozen=True)
class CheckedInputs:
    """Weights, imatrix and act_mean already validated by :func:`check_inputs`: quantize and quant_error take
    this in place of ``x`` and skip their own checks (each is a pass over the data and a device sync), so a
    caller that measures many types on one slab checks it once."""

    x: Tensor
    imatrix: Tensor | None
    act_mean: Tensor | None
    name: str | None


def check_inputs(
    x: Tensor | np.ndarray,
    imatrix: Tensor | np.ndarray | None = None,
    act_mean: Tensor | np.ndarray | None = None,
    *,
    name: str | None = None,
) -> CheckedInputs:
    """Validate rows ``x`` (finite float32, 2-D), ``imatrix`` and ``act_mean`` once (the errors quantize and
    quant_error would raise), for any number of quantize / quant_error calls on them."""
    lab = _label(name)
    xc = _check_weights(x, name)
    n = xc.shape[1]
    return CheckedInputs(xc, _check_imatrix(imatrix, n, xc, lab), _check_act(act_mean, n, xc, lab), name)


def _unpack(x: Tensor | np.ndarray | CheckedInputs, imatrix: Tensor | np.ndarray | None,
            act_mean: Tensor | np.ndarray | None, name: str | None) -> CheckedInputs:
    if isinstance(x, CheckedInputs):
        if imatrix is not None or act_mean is not None:
            raise ValueError(f"{_label(x.name)}: give the imatrix and act_mean to check_inputs, not here")
        return x
    return check_inputs(x, imatrix, act_mean, name=name)


def _chunk_rows(n: int, device: torch.device) -> int:
    budget = CHUNK_WEIGHTS if device.type == "cpu" else max(CHUNK_WEIGHTS, CHUNK_WEIGHTS_GPU)
    return max(1, budget // max(n, 1))


def _chunk_rows_kernel(n: int) -> int:
    return max(1, CHUNK_WEIGHTS_KERNEL // max(n, 1))


_warned_fallback = False


def _pick_backend(backend: str, t: type[GGMLType], device: torch.device, lab: str) -> str:
    """Resolve ``backend`` ("auto" / "torch" / "cuda") for type ``t`` on ``device``."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"{lab}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "ggml":
        if device.type != "cpu":
            raise ValueError(f"{lab}: backend 'ggml' runs ggml's C quantizer on CPU tensors; this one is on {device}")
        return "ggml"
    from quantmix.formats import gpu

    usable = device.type == "cuda" and gpu.has_kernel(t.name)
    if backend == "cuda":
        if not gpu.has_kernel(t.name):
            raise ValueError(f"{lab}: backend 'cuda' has no kernel for {t.name} (it has {', '.join(gpu.KERNEL_TYPES)})")
        if device.type != "cuda":
            raise ValueError(f"{lab}: backend 'cuda' needs a CUDA tensor; this one is on {device}")
        gpu.prepare([t.name], device)
        return "cuda"
    if not usable:
        return "torch"
    try:
        gpu.prepare([t.name], device)
    except gpu.KernelBuildError as e:
        if not _warned_fallback:
            warnings.warn(f"CUDA block-quant kernels unavailable, using the torch numerics: {e}", stacklevel=3)
            _warned_fallback = True
        return "torch"
    return "cuda"


# ---- public API -----------------------------------------------------------------------------------


def quantize(
    x: Tensor | np.ndarray | CheckedInputs,
    qtype: str | type[GGMLType],
    imatrix: Tensor | np.ndarray | None = None,
    *,
    name: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """Quantize float32 rows ``x [rows, n_per_row]`` to GGUF bytes ``uint8 [rows, row_bytes]`` (on x's device).

    Byte-identical to ``ggml_quantize_chunk(type, x, ..., imatrix)`` on every backend (see the module
    docstring). ``imatrix``: importance weights ``[n_per_row]`` (the mean of squared activations per input
    column). Raises ValueError, naming ``name``, for non-finite weights, a row length the type's block does
    not divide, a type that needs an imatrix without one, a malformed imatrix, or an unusable backend."""
    t = get_type(qtype)
    num = numerics(t)
    ci = _unpack(x, imatrix, None, name)
    lab = _label(ci.name)
    x, im = ci.x, ci.imatrix
    if t.requires_imatrix and im is None:
        raise ValueError(f"{lab}: {t.name} cannot be made without an importance matrix (imatrix)")
    rows, n = x.shape
    if not t.fits_row(n):
        raise ValueError(f"{lab}: row length {n} is not a multiple of {t.name}'s block size {t.block_size}")
    if not num.uses_imatrix:
        im = None
    rb = t.row_bytes(n)
    chosen = _pick_backend(backend, t, x.device, lab)
    if chosen == "ggml":
        from quantmix.formats import ggml_backend

        q = ggml_backend.quantize_rows(t.name, x.numpy(), None if im is None else im.numpy())
        return torch.from_numpy(q)
    out = torch.empty((rows, rb), dtype=torch.uint8, device=x.device)
    if chosen == "cuda":
        from quantmix.formats import gpu

        step = _chunk_rows_kernel(n)
        for r0 in range(0, rows, step):
            out[r0:r0 + step] = gpu.quantize_rows(t.name, x[r0:r0 + step], im)
        return out
    step = _chunk_rows(n, x.device)
    for r0 in range(0, rows, step):
        q = num.quantize_rows(x[r0:r0 + step], im)
        if q.shape != (min(step, rows - r0), rb) or q.dtype != torch.uint8:
            raise RuntimeError(f"{t.name}: quantize_rows returned {tuple(q.shape)} {q.dtype}, expected (*, {rb}) uint8")
        out[r0:r0 + step] = q
    return out


def dequantize(q: Tensor | np.ndarray, qtype: str | type[GGMLType], n_per_row: int, *, name: str | None = None) -> Tensor:
    """GGUF bytes ``uint8 [rows, row_bytes]`` (or a flat byte buffer) -> float32 ``[rows, n_per_row]``.

    Bit-identical to ggml's ``to_float`` and to gguf-py's ``gguf.quants.dequantize``."""
    t = get_type(qtype)
    lab = _label(name)
    num = numerics(t)
    q = _as_tensor(q, lab)
    if q.dtype != torch.uint8:
        raise ValueError(f"{lab}: expected uint8 bytes, got {q.dtype}")
    if not t.fits_row(n_per_row):
        raise ValueError(f"{lab}: row length {n_per_row} is not a multiple of {t.name}'s block size {t.block_size}")
    rb = t.row_bytes(n_per_row)
    if q.dim() != 2 or q.shape[-1] != rb:
        if q.numel() % rb:
            raise ValueError(f"{lab}: {q.numel()} bytes is not a whole number of {t.name} rows of {rb} bytes")
        q = q.reshape(-1, rb)
    q = q.contiguous()
    rows = q.shape[0]
    out = torch.empty((rows, n_per_row), dtype=torch.float32, device=q.device)
    step = _chunk_rows(n_per_row, q.device)
    for r0 in range(0, rows, step):
        out[r0:r0 + step] = num.dequantize_rows(q[r0:r0 + step], n_per_row)
    return out


def quant_error(
    x: Tensor | np.ndarray | CheckedInputs,
    qtype: str | type[GGMLType],
    imatrix: Tensor | np.ndarray | None = None,
    act_mean: Tensor | np.ndarray | None = None,
    *,
    name: str | None = None,
    backend: str = "auto",
) -> QuantError:
    """Per-row error sums of quantizing ``x`` to ``qtype`` (see :class:`QuantError`), in float64.

    The torch backend goes through the exact bytes (quantize then dequantize), chunked over rows to bound
    memory; the cuda backend computes the same errors inside the quantization kernels (never writing the
    bytes). Both use ggml's quantization of x (the imatrix paths when ``imatrix`` is given)."""
    t = get_type(qtype)
    ci = _unpack(x, imatrix, act_mean, name)
    lab = _label(ci.name)
    x, im, a = ci.x, ci.imatrix, ci.act_mean
    rows, n = x.shape
    chosen = _pick_backend(backend, t, x.device, lab)
    if chosen == "cuda":
        from quantmix.formats import gpu

        errs, refs, biases = [], [], []
        step = _chunk_rows_kernel(n)
        for r0 in range(0, rows, step):
            e_, r_, b_ = gpu.error_rows(t.name, x[r0:r0 + step], im, None if a is None else a.float())
            errs.append(e_)
            refs.append(r_)
            biases.append(b_)
        bias_cat = torch.cat(biases) if a is not None else None  # type: ignore[arg-type]
        return QuantError(torch.cat(errs), torch.cat(refs), bias_cat, backend="cuda")
    w = im.double() if im is not None else None
    err = torch.empty(rows, dtype=torch.float64, device=x.device)
    ref = torch.empty_like(err)
    bias = torch.empty_like(err) if a is not None else None
    step = _chunk_rows(n, x.device)
    if chosen == "ggml":
        from quantmix.formats import ggml_backend

        step = max(step, step * ggml_backend.threads())  # one chunk feeds every thread
    for r0 in range(0, rows, step):
        xc = x[r0:r0 + step]
        q = quantize(CheckedInputs(xc, im, None, ci.name), t, backend=chosen)
        if chosen == "ggml":
            e = torch.from_numpy(ggml_backend.dequantize_rows(t.name, q.numpy(), n)).double() - xc.double()
        else:
            e = dequantize(q, t, n).double() - xc.double()
        x2 = xc.double().square()
        e2 = e.square()
        err[r0:r0 + step] = (e2 @ w) if w is not None else e2.sum(dim=1)
        ref[r0:r0 + step] = (x2 @ w) if w is not None else x2.sum(dim=1)
        if bias is not None:
            bias[r0:r0 + step] = e @ a
    return QuantError(err, ref, bias, backend="ggml" if chosen == "ggml" else "torch")
