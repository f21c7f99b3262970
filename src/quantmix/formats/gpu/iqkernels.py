"""Fast numerics for the codebook quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S).

Why: the torch numerics of these types (iq1.py / iq2.py / iq3.py) are exact but run a few hundred
thousand small tensor ops per chunk; on a GPU they reach well under 1 G weights/s. ``iqgrids.cu`` runs
ggml's quantizers (one warp per super-block for IQ2_XS / IQ3_XXS / IQ3_S, one thread for the others)
with ggml's float32 arithmetic op for op, so the bytes are ggml's. The same source is compiled for the
host with g++ (``host_quantize_rows``) so that CI, without a GPU, checks the kernels' arithmetic against
ggml's C quantizer.

The iq modules call :func:`quantize_rows` for CUDA tensors (unless ``QUANTMIX_IQ_KERNELS=0`` is set or
the kernels cannot be built, then they keep their torch path).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from quantmix.formats.gpu.nvrtc import KernelBuildError
from quantmix.paths import cache_dir, file_lock

SOURCE = Path(__file__).with_name("iqgrids.cu")
QK_K = 256
TPB = 64  # per-thread kernels (IQ1_S, IQ1_M, IQ2_XXS, IQ2_S): threads = super-blocks per CUDA block
WTPB = 64  # the warp-per-super-block kernels: threads per CUDA block, WTPB // 32 super-blocks
_BUILT_TPB, _BUILT_WTPB = TPB, WTPB  # what the cubin is compiled for (-DIQ_TPB / -DIQ_WTPB)
WARP_TYPES = frozenset({"IQ2_XS", "IQ3_XXS", "IQ3_S"})  # one warp per super-block (iqgrids.cu says why)
# name -> (kernel stem in iqgrids.cu, bytes per 256 weights)
TYPES: dict[str, tuple[str, int]] = {
    "IQ2_XXS": ("iq2_xxs", 66),
    "IQ2_XS": ("iq2_xs", 74),
    "IQ2_S": ("iq2_s", 82),
    "IQ3_XXS": ("iq3_xxs", 98),
    "IQ3_S": ("iq3_s", 110),
    "IQ1_S": ("iq1_s", 50),
    "IQ1_M": ("iq1_m", 56),
}
HOST_FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-x", "c++"]
ENV_SWITCH = "QUANTMIX_IQ_KERNELS"  # "0": the iq modules keep their torch path on CUDA tensors

_lock = threading.Lock()
_warned = False


# ---- tables: ggml's map and neighbour lists in one flat layout ---------------------------------------


@functools.lru_cache(maxsize=None)
def tables_np(qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(map int32 [keys], nbr uint16 [...], grid uint16 [G]) as iqgrids.cu reads them (see its header):
    the neighbour lists hold the neighbours' keys.

    Built from the same tables the torch numerics use (iq2.neighbour_tables / codebook.codebook), which
    reproduce ggml's iq2xs_init_impl / iq3xs_init_impl lists in ggml's order."""
    if qtype.startswith("IQ3"):
        from quantmix.formats import codebook

        cb = codebook.codebook(qtype)
        kmap = cb.kmap.numpy()
        lists = [cb.neighbours[k, : int(cb.counts[k])].numpy() for k in range(kmap.size)]
        levels = cb.levels.numpy()
        bits = 3
    else:
        from quantmix.formats import iq2

        t = iq2.neighbour_tables(qtype, "cpu")
        kmap = t.kmap.numpy()
        start, count, flat = t.start.numpy(), t.count.numpy(), t.flat.numpy()
        lists = [flat[start[k]: start[k] + count[k]] for k in range(kmap.size)]
        levels = t.levels.numpy()
        bits = 2
    shifts = np.arange(levels.shape[1]) * bits
    grid = (levels.astype(np.int64) << shifts).sum(axis=1)  # the key of each grid point
    out_map = np.empty(kmap.size, dtype=np.int32)
    nbr: list[np.ndarray] = [np.array([1, 0], dtype=np.int64)]  # entry 0: for keys no quantizer can make
    pos = 2
    for k in range(kmap.size):
        if kmap[k] >= 0:
            out_map[k] = kmap[k]
        elif len(lists[k]):
            out_map[k] = -(pos + 1)
            nbr.append(np.concatenate([[len(lists[k])], grid[lists[k]]]))
            pos += len(lists[k]) + 1
        else:
            out_map[k] = -1
    return out_map, np.concatenate(nbr).astype(np.uint16), grid.astype(np.uint16)


@functools.lru_cache(maxsize=None)
def _tables_dev(qtype: str, device: str) -> tuple[Tensor, Tensor, Tensor]:
    m, n, g = tables_np(qtype)
    dev = torch.device(device)
    return (torch.from_numpy(m).to(dev), torch.from_numpy(n.view(np.int16)).to(dev),
            torch.from_numpy(g.view(np.int16)).to(dev))


def _check(qtype: str, x: Tensor) -> tuple[str, int, int, int]:
    if qtype not in TYPES:
        raise ValueError(f"{qtype}: no codebook kernel (have {', '.join(TYPES)})")
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of {QK_K}")
    stem, ts = TYPES[qtype]
    return stem, ts, rows, n


# ---- host build (tests) -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _host_lib() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) found: the host build of iqgrids.cu needs one")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cxx, *HOST_FLAGS]).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"iqgrids-host-{key}.so"
    with file_lock(f"iqgrids-host-{key}"):
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=out_dir) as td:
                tmp = Path(td) / lib.name
                proc = subprocess.run([cxx, *HOST_FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"g++ failed to build {SOURCE}:\n{proc.stderr[-4000:]}")
                os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


def host_quantize_rows(qtype: str, x: Tensor, imatrix: Tensor | None) -> Tensor:
    """The kernels' arithmetic on the CPU (g++ build, one thread): float32 [rows, n] -> bytes."""
    stem, ts, rows, n = _check(qtype, x)
    x = x.to(torch.float32).contiguous()
    m, nb, g = (torch.from_numpy(a) for a in tables_np(qtype))
    qw = imatrix.to(torch.float32).contiguous() if imatrix is not None else torch.zeros(1)
    nsb = rows * (n // QK_K)
    out = torch.empty((rows, (n // QK_K) * ts), dtype=torch.uint8)
    fn = getattr(_host_lib(), f"qm_iq_{stem}")
    fn.restype = None
    p = ctypes.c_void_p
    fn(p(x.data_ptr()), p(qw.data_ptr()), p(out.data_ptr()), p(m.data_ptr()), p(nb.data_ptr()), p(g.data_ptr()),
       ctypes.c_int(nsb), ctypes.c_int(max(1, n // QK_K)), ctypes.c_int(int(imatrix is not None)))
    return out


# ---- CUDA (NVRTC) -------------------------------------------------------------------------------


def _cubin(arch: str) -> bytes:
    from quantmix.formats.gpu import nvrtc

    src = SOURCE.read_text()
    opts = [*nvrtc.OPTIONS, f"-DIQ_TPB={_BUILT_TPB}", f"-DIQ_WTPB={_BUILT_WTPB}"]  # block sizes (shared scratch)
    key = hashlib.sha256("\0".join([src, *opts, arch, nvrtc._nvrtc_version(), torch.version.cuda or ""]).encode())
    f = cache_dir() / "gpu" / f"iqgrids-sm{arch}-{key.hexdigest()[:16]}.cubin"
    if f.exists():
        return f.read_bytes()
    cubin = nvrtc._compile(src, opts, arch, "iqgrids")
    f.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=f.parent, delete=False) as tmp:
        tmp.write(cubin)
    os.replace(tmp.name, f)
    return cubin


@functools.lru_cache(maxsize=None)
def _kernels(device_index: int) -> dict[str, Any]:
    from quantmix.formats.gpu import nvrtc

    dev = torch.device("cuda", device_index)
    p = torch.cuda.get_device_properties(dev)
    cubin = _cubin(f"{p.major}{p.minor}")
    names = [f"qm_iq_{stem}" for stem, _ in TYPES.values()]
    with _lock, torch.cuda.device(dev):
        try:
            return nvrtc._load_module()(cubin, names)
        except Exception as e:  # noqa: BLE001 - re-raised with what failed
            raise KernelBuildError(f"loading the codebook kernels ({SOURCE}) failed: {e}") from e


def quantize_rows(qtype: str, x: Tensor, imatrix: Tensor | None) -> Tensor:
    """float32 rows [rows, n] on a CUDA device -> ggml's bytes of ``qtype`` uint8 [rows, n/256*type_size]."""
    stem, ts, rows, n = _check(qtype, x)
    dev = x.device
    if dev.type != "cuda":
        raise ValueError(f"{qtype}: the codebook kernels run on CUDA tensors, not {dev}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    kern = _kernels(index)[f"qm_iq_{stem}"]
    x = x.to(torch.float32).contiguous()
    m, nb, g = _tables_dev(qtype, str(torch.device("cuda", index)))
    qw = imatrix.to(device=dev, dtype=torch.float32).contiguous() if imatrix is not None else m
    nsb = rows * (n // QK_K)
    out = torch.empty((rows, (n // QK_K) * ts), dtype=torch.uint8, device=dev)
    if nsb == 0:
        return out
    if nsb >= 2**31:
        raise ValueError(f"{qtype}: {rows}x{n} is too large for one launch; quantize fewer rows per call")
    tpb, per_block = (_BUILT_WTPB, _BUILT_WTPB // 32) if qtype in WARP_TYPES else (_BUILT_TPB, _BUILT_TPB)
    with torch.cuda.device(dev):
        kern(grid=((nsb + per_block - 1) // per_block, 1, 1), block=(tpb, 1, 1),
             args=[x, qw, out, m, nb, g, nsb, n // QK_K, int(imatrix is not None)])
    return out


def use_kernels(x: Tensor) -> bool:
    """True when ``x`` is a CUDA tensor and the kernels are usable (built on first call; a build failure
    warns once and turns them off for the process, so the torch numerics run instead)."""
    global _warned
    if _warned or x.device.type != "cuda" or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        _kernels(x.device.index if x.device.index is not None else torch.cuda.current_device())
        return True
    except KernelBuildError as e:
        warnings.warn(f"CUDA codebook kernels unavailable, using the torch numerics: {e}", stacklevel=3)
        _warned = True  # not retried in this process
        return False
