"""NVRTC build and launch of the block-quant kernels of ``blockquants.cu`` on a CUDA device.

Compiled with ``--fmad=false`` (ggml's reference quantizers have no fused multiply-adds) and NVRTC's IEEE
defaults for division and square root, so the kernels give ggml's bytes. One small program per type and
path (``-DQM_ONLY=q4k_imat``), built on first use, several at once in threads (NVRTC releases the GIL), and
cached as cubin under ``cache_dir()/gpu`` keyed by source, options, GPU architecture and NVRTC version.
Uses torch's NVRTC/driver helpers (``torch.cuda._utils``), so it needs no extra package.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from quantmix.formats.gpu import driver
from quantmix.paths import cache_dir

SOURCE = Path(__file__).with_name("blockquants.cu")
OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false", "-std=c++17")
ROWSQ = "rowsq"  # the row sums of squares that the 32-weight types' imatrix paths need first
PATHS = [f"{kt.stem}_{m}" for kt in driver.KERNEL_TYPES.values() for m in ("ref", "imat")] + [ROWSQ]
TPB = 128  # threads per block = groups per block (blockquants.cu's TPB)

_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    """The block-quant kernels could not be compiled or loaded on this CUDA device."""


def _load_module() -> Any:
    try:
        from torch.cuda._utils import _cuda_load_module
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise KernelBuildError(f"this torch ({torch.__version__}) cannot load CUDA modules: {e}") from e
    return _cuda_load_module


@functools.lru_cache(maxsize=1)
def _libnvrtc() -> ctypes.CDLL:
    """The NVRTC library torch itself uses (its CUDA wheels ship it)."""
    try:
        from torch.cuda._utils import _get_gpu_rtc_library

        return _get_gpu_rtc_library()
    except Exception as e:  # noqa: BLE001 - fall back to a search of the usual places
        first = e
    roots = [Path(torch.__file__).parent.parent / "nvidia", Path("/usr/local/cuda/lib64"), Path("/usr/lib/x86_64-linux-gnu")]
    roots += sorted(Path("/usr/local").glob("cuda-*/lib64"))
    for root in roots:
        for cand in sorted(root.rglob("libnvrtc.so*")) if root.exists() else []:
            if "builtins" in cand.name or "alt" in cand.name:
                continue
            try:
                return ctypes.CDLL(str(cand))
            except OSError:
                continue
    raise KernelBuildError(f"NVRTC library not found (torch {torch.__version__}: {first})")


def _nvrtc_version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _libnvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def _compile(src: str, opts: list[str], arch: str, what: str) -> bytes:
    """NVRTC: CUDA C++ source -> cubin for sm_<arch>."""
    lib = _libnvrtc()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"blockquants.cu", 0, None, None) != 0:
        raise KernelBuildError(f"nvrtcCreateProgram failed for {what}")
    try:
        all_opts = [f"--gpu-architecture=sm_{arch}".encode(), *(o.encode() for o in opts)]
        arr = (ctypes.c_char_p * len(all_opts))(*all_opts)
        res = lib.nvrtcCompileProgram(prog, len(all_opts), arr)
        if res != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise KernelBuildError(f"NVRTC failed on {SOURCE} ({what}), error {res}:\n{log.value.decode()[-4000:]}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, buf)
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _arch(device: torch.device) -> str:
    p = torch.cuda.get_device_properties(device)
    return f"{p.major}{p.minor}"


def _cubin(path: str, arch: str, defines: tuple[str, ...]) -> bytes:
    """The cubin of one program, from the cache or NVRTC."""
    src = SOURCE.read_text()
    only = "-DQM_ROWSQ_ONLY" if path == ROWSQ else f"-DQM_ONLY={path}"
    opts = [*OPTIONS, only, *(f"-D{d}" for d in defines)]
    key = hashlib.sha256("\0".join([src, *opts, arch, _nvrtc_version(), torch.version.cuda or ""]).encode())
    f = cache_dir() / "gpu" / f"blockquants-{path}-sm{arch}-{key.hexdigest()[:16]}.cubin"
    if f.exists():
        return f.read_bytes()
    cubin = _compile(src, opts, arch, path)
    f.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=f.parent, delete=False) as tmp:
        tmp.write(cubin)
    os.replace(tmp.name, f)
    return cubin


class CudaLauncher:
    """driver.Launcher on one CUDA device; kernels are compiled per type/path on first use."""

    backend = "cuda"

    def __init__(self, device: torch.device, defines: tuple[str, ...] = ()) -> None:
        self.device = device
        self.defines = defines
        self.arch = _arch(device)
        self._kernels: dict[str, Any] = {}

    def prepare(self, paths: list[str] | None = None) -> None:
        """Compile and load the given programs (all by default), several at once."""
        todo = [p for p in (paths or PATHS) if f"qm_kq_{p}" not in self._kernels]
        if not todo:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as ex:
            cubins = dict(zip(todo, ex.map(lambda p: _cubin(p, self.arch, self.defines), todo)))
        load = _load_module()
        with _lock, torch.cuda.device(self.device):
            for p, cubin in cubins.items():
                name = f"qm_kq_{p}"
                try:
                    self._kernels[name] = load(cubin, [name])[name]
                except Exception as e:  # noqa: BLE001 - re-raised with what failed
                    raise KernelBuildError(f"loading {name} ({SOURCE}) failed: {e}") from e

    def launch(self, name: str, args: driver.Args, nsub: int, mode: int) -> None:
        if name not in self._kernels:
            self.prepare([name[len("qm_kq_"):]])
        blob = torch.frombuffer(bytearray(bytes(args)), dtype=torch.uint8).to(self.device)
        with torch.cuda.device(self.device):
            self._kernels[name](grid=((nsub + TPB - 1) // TPB, 1, 1), block=(TPB, 1, 1), args=[blob, nsub, mode])


@functools.lru_cache(maxsize=None)
def launcher(device_index: int, defines: tuple[str, ...] = ()) -> CudaLauncher:
    return CudaLauncher(torch.device("cuda", device_index), defines)
