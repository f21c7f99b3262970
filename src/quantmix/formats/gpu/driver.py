"""Runs the k-quant kernels of ``kquants.cu``: buffers, argument block and launch order, for either backend.

The same three launches run on the GPU (NVRTC build, :mod:`quantmix.formats.gpu.nvrtc`) and on the host
(g++ build, :mod:`quantmix.formats.gpu.hostbuild`, which lets CI check the kernels' arithmetic against ggml
without a GPU): per-super-block sums of squares (imatrix paths), the per-group scale search, and the
per-super-block finish that writes block bytes (mode 0) or the fused error sums (mode 1).
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
    """One k-quant's kernel family: name stem in kquants.cu, weights per search group, bytes per block."""

    stem: str
    group: int
    type_size: int
    sumx2_with_imatrix: bool  # its imatrix path needs sum(x^2) over the super-block


KERNEL_TYPES: dict[str, KernelType] = {
    "Q2_K": KernelType("q2k", 16, 84, True),
    "Q3_K": KernelType("q3k", 16, 110, True),
    "Q4_K": KernelType("q4k", 32, 144, True),
    "Q5_K": KernelType("q5k", 32, 176, True),
    "Q6_K": KernelType("q6k", 16, 210, False),
}


class Args(ctypes.Structure):
    """``struct Args`` of kquants.cu (same field order; natural alignment on both sides)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("qw", ctypes.c_void_p),
        ("act", ctypes.c_void_p),
        ("sumx2", ctypes.c_void_p),
        ("s_scale", ctypes.c_void_p),
        ("s_min", ctypes.c_void_p),
        ("s_sw", ctypes.c_void_p),
        ("L", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("err", ctypes.c_void_p),
        ("ref", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("sb_per_row", ctypes.c_int),
        ("has_qw", ctypes.c_int),
        ("has_act", ctypes.c_int),
    ]


class Launcher(Protocol):
    """What a backend provides: run kernel ``name`` over ``n`` items with the argument block."""

    device: torch.device
    backend: str

    def launch(self, name: str, args: Args, n: int, threads: int, *extra: int) -> None: ...


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
    error_weights: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor | None]:
    """Quantize float32 rows ``x [rows, n]`` (n a multiple of 256) with ``imatrix [n]`` or None.

    Returns the block bytes uint8 [rows, n/256*type_size], or with ``errors`` the per-row float64 sums
    (sum w e^2, sum w x^2, sum a e or None), w = ``error_weights`` (1 where None), e = dequant - x."""
    kt = KERNEL_TYPES[qtype]
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of {QK_K}")
    dev = launcher.device
    x = x.to(device=dev, dtype=torch.float32).contiguous()
    nbr = n // QK_K
    nsb = rows * nbr
    nsub = nsb * (QK_K // kt.group)
    if nsb == 0:
        if errors:
            z = torch.zeros(rows, dtype=torch.float64, device=dev)
            return z, z.clone(), (z.clone() if act_mean is not None else None)
        return torch.empty((rows, nbr * kt.type_size), dtype=torch.uint8, device=dev)
    if nsub >= 2**31:
        raise ValueError(f"{qtype}: {rows}x{n} is too large for one kernel launch; quantize fewer rows per call")
    f32 = dict(dtype=torch.float32, device=dev)
    qw = _aligned(imatrix.to(**f32).contiguous()) if imatrix is not None else None
    x = _aligned(x)
    sumx2 = torch.empty(nsb, **f32) if (qw is not None and kt.sumx2_with_imatrix) else None
    s_scale = torch.empty(nsub, **f32)
    s_min = torch.empty(nsub, **f32)
    s_sw = torch.empty(nsub, **f32)
    L = torch.empty(nsb * QK_K, dtype=torch.uint8, device=dev)
    out = err = ref = bias = None
    ew = act = None
    if errors:
        err = torch.empty(nsb, dtype=torch.float64, device=dev)
        ref = torch.empty_like(err)
        ew = error_weights.to(**f32).contiguous() if error_weights is not None else None
        if act_mean is not None:
            act = act_mean.to(**f32).contiguous()
            bias = torch.empty_like(err)
    else:
        out = torch.empty((rows, nbr * kt.type_size), dtype=torch.uint8, device=dev)
    mode = "imat" if qw is not None else "ref"

    def args_for(qw_ptr: Tensor | None) -> Args:
        return Args(
            _ptr(x), _ptr(qw_ptr), _ptr(act), _ptr(sumx2), _ptr(s_scale), _ptr(s_min), _ptr(s_sw), _ptr(L),
            _ptr(out), _ptr(err), _ptr(ref), _ptr(bias), nbr, int(ew is not None), int(act is not None),
        )

    a = args_for(qw)
    if sumx2 is not None:
        launcher.launch("qm_sumx2", a, nsb, 128)
    launcher.launch(f"qm_search_{kt.stem}_{mode}", a, nsub, getattr(launcher, "search_threads", 128))
    if errors:
        # the finish reads the error weights through qw (the quantizer is done with the imatrix by then)
        launcher.launch(f"qm_finish_{kt.stem}_{mode}", args_for(ew), nsb, 64, 1)
        assert err is not None and ref is not None
        per_row = (err.view(rows, nbr).sum(dim=1), ref.view(rows, nbr).sum(dim=1))
        return per_row[0], per_row[1], (bias.view(rows, nbr).sum(dim=1) if bias is not None else None)
    launcher.launch(f"qm_finish_{kt.stem}_{mode}", a, nsb, 64, 0)
    assert out is not None
    return out
