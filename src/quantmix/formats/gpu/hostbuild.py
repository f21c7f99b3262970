"""The block-quant kernels of ``blockquants.cu`` compiled for the host CPU with g++ (plain loops over the same bodies).

Why: the GPU source must stay byte-exact with ggml, but CI has no GPU. Built with ``-ffp-contract=off``
(x86-64 SSE float32: IEEE, no FMA) it runs the very arithmetic the GPU runs, so the tests can compare it
with ggml's C quantizer everywhere. Slow (single-threaded, unvectorized): for tests, not for use.
Cached under ``cache_dir()/gpu`` by a hash of the source and flags; rebuilt when either changes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from quantmix.formats.gpu import driver
from quantmix.paths import cache_dir, file_lock

SOURCE = Path(__file__).with_name("blockquants.cu")
FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-x", "c++"]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) found: the host build of the block-quant kernels needs one")
    return cxx


@functools.lru_cache(maxsize=1)
def library_path() -> Path:
    """Build (once per source version) and return the shared library."""
    src = SOURCE.read_bytes()
    cxx = _compiler()
    key = hashlib.sha256(src + " ".join([cxx, *FLAGS]).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"blockquants-host-{key}.so"
    with file_lock(f"blockquants-host-{key}"):
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=out_dir) as td:
                tmp = Path(td) / lib.name
                proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"g++ failed to build {SOURCE}:\n{proc.stderr[-4000:]}")
                os.replace(tmp, lib)
    return lib


class HostLauncher:
    """driver.Launcher over the g++ build: every 'kernel' is a loop over its blocks, phases one after another."""

    device = torch.device("cpu")
    backend = "host"

    def __init__(self) -> None:
        self._lib = ctypes.CDLL(str(library_path()))

    def launch(self, name: str, args: driver.Args, nsub: int, mode: int) -> None:
        fn = getattr(self._lib, name)
        fn.restype = None
        fn(ctypes.byref(args), ctypes.c_int(nsub), ctypes.c_int(mode))


@functools.lru_cache(maxsize=1)
def launcher() -> HostLauncher:
    return HostLauncher()
