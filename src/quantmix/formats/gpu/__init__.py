"""Fast GPU numerics for the block quants (Q2_K .. Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS),
byte-exact with ggml.

CUDA kernels (``blockquants.cu``, compiled at first use with NVRTC) that quantize with or without an imatrix
and, fused with the same kernels, compute quant_error's per-row sums without materializing the bytes.
They repeat ggml-quants.c's float32 arithmetic op for op (no FMA contraction, sequential sums, IEEE
division and sqrt, ggml's nearest_int and fp16 rounding), so their bytes equal ggml's; the same source is
compiled for the host by :mod:`hostbuild` so CI checks that arithmetic against ggml without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmix.formats.gpu.driver import KERNEL_TYPES
from quantmix.formats.gpu.nvrtc import KernelBuildError

__all__ = ["KERNEL_TYPES", "KernelBuildError", "error_rows", "has_kernel", "prepare", "quantize_rows"]


def has_kernel(qtype: str) -> bool:
    """True when ``qtype`` has CUDA kernels here (whether a GPU is present or not)."""
    return qtype.upper() in KERNEL_TYPES


def _launcher(device: torch.device):  # type: ignore[no-untyped-def]
    from quantmix.formats.gpu import nvrtc

    if device.type != "cuda":
        raise ValueError(f"the block-quant kernels run on CUDA devices, not {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return nvrtc.launcher(index)


def prepare(qtypes: list[str] | None = None, device: torch.device | str | None = None) -> None:
    """Compile (or load from the cache) the kernels of ``qtypes`` (all by default) ahead of use."""
    from quantmix.formats.gpu import nvrtc

    dev = torch.device(device) if device is not None else torch.device("cuda")
    names = [q.upper() for q in (qtypes or list(KERNEL_TYPES))]
    paths = [f"{KERNEL_TYPES[q].stem}_{m}" for q in names for m in ("ref", "imat")]
    if any(KERNEL_TYPES[q].row_sigma for q in names):
        paths.append(nvrtc.ROWSQ)
    _launcher(dev).prepare(paths)


def quantize_rows(qtype: str, x: Tensor, imatrix: Tensor | None) -> Tensor:
    """float32 rows [rows, n] on a CUDA device -> the type's block bytes uint8 [rows, row_bytes] (ggml's)."""
    from quantmix.formats.gpu import driver

    out = driver.run(_launcher(x.device), qtype.upper(), x, imatrix)
    assert isinstance(out, Tensor)
    return out


def error_rows(
    qtype: str, x: Tensor, imatrix: Tensor | None, act_mean: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row float64 (sum w e^2, sum w x^2, sum a e) of quantizing ``x`` (w = imatrix, 1 without)."""
    from quantmix.formats.gpu import driver

    res = driver.run(_launcher(x.device), qtype.upper(), x, imatrix, errors=True, act_mean=act_mean)
    assert isinstance(res, tuple)
    return res
