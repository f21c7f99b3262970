"""Runs the block-quant kernels of ``blockquants.cu``: buffers, argument block and launch order, for either backend.

The same launches run on the GPU (NVRTC build, :mod:`quantmix.formats.gpu.nvrtc`) and on the host
(g++ build, :mod:`quantmix.formats.gpu.hostbuild`, which lets CI check the kernels' arithmetic against ggml
without a GPU): one fused kernel per type and path that writes block bytes (mode 0) or the per-super-block
error sums (mode 1).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

QK_K = 256


@dataclass(frozen=True)
class KernelType:
    """One type's kernels: name stem in blockquants.cu, weights per group (one thread each), bytes per block,
    weights per block (256: a k-quant super-block; 32: the legacy blocks), and whether the imatrix path
    needs the row's sum of squares first (ggml's sigma2 of quantize_row_q{4,5}_{0,1}_impl)."""

    stem: str
    group: int
    type_size: int
    block: int = QK_K
    row_sigma: bool = False


KERNEL_TYPES: dict[str, KernelType] = {
    "Q2_K": KernelType("q2k", 16, 84),
    "Q3_K": KernelType("q3k", 16, 110),
    "Q4_K": KernelType("q4k", 32, 144),
    "Q5_K": KernelType("q5k", 32, 176),
    "Q6_K": KernelType("q6k", 16, 210),
    "Q4_0": KernelType("q4_0", 32, 18, 32, True),
    "Q4_1": KernelType("q4_1", 32, 20, 32, True),
    "Q5_0": KernelType("q5_0", 32, 22, 32, True),
    "Q5_1": KernelType("q5_1", 32, 24, 32, True),
    "Q8_0": KernelType("q8_0", 32, 34, 32),
    "IQ4_NL": KernelType("iq4_nl", 32, 18, 32),
    "IQ4_XS": KernelType("iq4_xs", 32, 136),
    "MXFP4": KernelType("mxfp4", 32, 17, 32),
}


class Args(ctypes.Structure):
    """``struct Args`` of blockquants.cu (same field order; natural alignment on both sides)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("qw", ctypes.c_void_p),
        ("act", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("err", ctypes.c_void_p),
        ("ref", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("rowx2", ctypes.c_void_p),
        ("sb_per_row", ctypes.c_int),
        ("n_per_row", ctypes.c_int),
        ("has_qw", ctypes.c_int),
        ("has_act", ctypes.c_int),
    ]


class Launcher(Protocol):
    """What a backend provides: run kernel ``name`` over ``nsub`` groups (blocks of TPB=128) in ``mode``
    (0: write block bytes, 1: error sums)."""

    device: torch.device
    backend: str

    def launch(self, name: str, args: Args, nsub: int, mode: int) -> None: ...


def _aligned(t: Tensor) -> Tensor:
    """The kernels read 16 bytes at a time: copy a view that starts off a 16-byte boundary."""
    return t.clone() if t.data_ptr() % 16 else t


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run(
    launcher: Launcher,
    qtype: str,
    x: Tensor,
    imatrix: Tensor | None,
    *,
    errors: bool = False,
    act_mean: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor | None]:
    """Quantize float32 rows ``x [rows, n]`` (n a multiple of the type's block) with ``imatrix [n]`` or None.

    Returns the block bytes uint8 [rows, n/256*type_size], or with ``errors`` the per-row float64 sums
    (sum w e^2, sum w x^2, sum a e or None), w = the imatrix (1 without), e = dequant - x."""
    kt = KERNEL_TYPES[qtype]
    rows, n = x.shape
    if n % kt.block:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of {kt.block}")
    dev = launcher.device
    nbr = n // kt.block
    nsb = rows * nbr
    nsub = nsb * (kt.block // kt.group)
    if nsb == 0:
        if errors:
            z = torch.zeros(rows, dtype=torch.float64, device=dev)
            return z, z.clone(), (z.clone() if act_mean is not None else None)
        return torch.empty((rows, nbr * kt.type_size), dtype=torch.uint8, device=dev)
    if nsub >= 2**31:
        raise ValueError(f"{qtype}: {rows}x{n} is too large for one kernel launch; quantize fewer rows per call")
    f32 = dict(dtype=torch.float32, device=dev)
    x = _aligned(x.to(**f32).contiguous())
    qw = _aligned(imatrix.to(**f32).contiguous()) if imatrix is not None else None
    out = err = ref = bias = act = None
    if errors:
        err = torch.empty(nsb, dtype=torch.float64, device=dev)
        ref = torch.empty_like(err)
        if act_mean is not None:
            act = act_mean.to(**f32).contiguous()
            bias = torch.empty_like(err)
    else:
        out = torch.empty((rows, nbr * kt.type_size), dtype=torch.uint8, device=dev)
    rowx2 = torch.empty(rows, **f32) if (kt.row_sigma and qw is not None) else None
    args = Args(_ptr(x), _ptr(qw), _ptr(act), _ptr(out), _ptr(err), _ptr(ref), _ptr(bias), _ptr(rowx2), nbr, n,
                int(qw is not None), int(act is not None))
    if rowx2 is not None:
        launcher.launch("qm_kq_rowsq", args, rows, 0)
    launcher.launch(f"qm_kq_{kt.stem}_{'imat' if qw is not None else 'ref'}", args, nsub, int(errors))
    if errors:
        assert err is not None and ref is not None
        sums = err.view(rows, nbr).sum(dim=1), ref.view(rows, nbr).sum(dim=1)
        return sums[0], sums[1], (bias.view(rows, nbr).sum(dim=1) if bias is not None else None)
    assert out is not None
    return out
