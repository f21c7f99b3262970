"""llama.cpp, built from the source vendored in PyPI's llama-cpp-python sdist, cached outside the repo.

quantmix checks itself against llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity),
its converter (convert_hf_to_gguf.py) and its reference quantizer (ggml_quantize_chunk in libggml-base).
The first call downloads the sdist from PyPI (never a model hub) and builds the CPU tools (about 6 minutes
on 2 cores); later calls return the cached build.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from quantmix.paths import cache_dir, file_lock

SDIST_VERSION = "0.3.36"
TARGETS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-gguf-split")
CMAKE_FLAGS = (
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DGGML_NATIVE=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
)


class LlamaCppError(RuntimeError):
    """llama.cpp could not be fetched, built or run."""


@dataclass(frozen=True)
class LlamaCpp:
    """Paths into a built llama.cpp tree."""

    root: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def convert_script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def libggml_base(self) -> Path:
        return self.bin_dir / "libggml-base.so"

    def run(self, name: str, *args: str | os.PathLike[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run one of the built tools, capturing its output; raise with its stderr tail on failure."""
        cmd = [str(self.tool(name)), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            raise LlamaCppError(f"{name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        return proc

    def run_until(self, name: str, *args: str | os.PathLike[str], done: str, attempts: int = 4,
                  **kw: object) -> subprocess.CompletedProcess[str]:
        """``run`` (not checked), again while the tool exits 0 without printing ``done``: llama.cpp's logger is
        an asynchronous thread whose singleton is leaked on purpose at exit (common/log.cpp, llama.cpp issue
        22142: "logs may be lost if not flushed before the program exits"), so on a loaded machine a tool's last
        lines, its summary among them, can go unprinted. The caller checks the exit status and the output."""
        for _ in range(max(1, attempts)):
            proc = self.run(name, *args, check=False, **kw)
            if proc.returncode != 0 or done in proc.stdout + proc.stderr:
                break
        return proc

    def convert(self, model_dir: Path, out: Path, outtype: str = "f32", metadata_only: bool = False) -> Path:
        """Run convert_hf_to_gguf.py (the vendored one, with its own gguf-py) on an HF model directory.
        ``metadata_only``: the same file with its data left as a hole (:mod:`quantmix.tools.convert_meta`):
        the header of a full conversion, no weight read, no disk used for data."""
        tmp = out.with_name(out.name + ".tmp")
        if metadata_only:
            from quantmix.tools import convert_meta

            cmd = [sys.executable, convert_meta.__file__, str(self.root), str(model_dir), str(tmp), "--outtype",
                   outtype]
        else:
            cmd = [sys.executable, str(self.convert_script), str(model_dir), "--outfile", str(tmp), "--outtype",
                   outtype]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            log = out.with_name(out.name + ".convert.log")
            log.write_text(proc.stdout + proc.stderr)
            cause = next((ln.strip() for ln in reversed(proc.stderr.splitlines())
                          if re.match(r"^\w*(Error|Exception)\b.*:", ln.strip())), proc.stderr.strip()[-300:])
            raise LlamaCppError(f"convert_hf_to_gguf.py failed on {model_dir}: {cause} (its whole output: {log})")
        tmp.replace(out)
        return out


def _source_root() -> Path:
    return cache_dir() / "src" / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"


def _fetch_source() -> Path:
    root = _source_root()
    if (root / "CMakeLists.txt").exists():
        return root
    src = cache_dir() / "src"
    src.mkdir(parents=True, exist_ok=True)
    tarball = src / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not tarball.exists():
        print(f"quantmix: downloading llama-cpp-python=={SDIST_VERSION} sdist from PyPI", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={SDIST_VERSION}", "-d", str(src)],
            check=True,
        )
    with tarfile.open(tarball) as tf:
        tf.extractall(src, filter="data")
    if not (root / "CMakeLists.txt").exists():
        raise LlamaCppError(f"{tarball} has no vendor/llama.cpp")
    return root


def llamacpp_source() -> LlamaCpp:
    """The vendored llama.cpp source tree, fetched once but not built: enough for convert_hf_to_gguf.py, which
    needs no compiled tool (so building a fixture or converting a model does not cost the 6-minute build)."""
    with file_lock("llamacpp"):
        return LlamaCpp(_fetch_source())


_GGML_BASE_FAILED: list[str] = []  # why building libggml-base failed in this process (not retried)


def ensure_ggml_base() -> LlamaCpp | None:
    """The cached build's libggml-base (ggml's own C quantizers), building that one library when it is missing:
    about 12 s on 2 cores, where the whole set of tools takes 6 minutes. None, with one warning, when it cannot
    be built here (no cmake or C compiler): callers then use the torch numerics, which give the same bytes."""
    lc = LlamaCpp(_source_root())
    if lc.libggml_base.exists():
        return lc
    if _GGML_BASE_FAILED:
        return None
    with file_lock("llamacpp"):
        try:
            root = _fetch_source()
            lc = LlamaCpp(root)
            if lc.libggml_base.exists():
                return lc
            print("quantmix: building ggml's quantizers (libggml-base, about 12 s, once)", file=sys.stderr)
            for cmd in (["cmake", "-S", str(root), "-B", str(root / "build"), *CMAKE_FLAGS],
                        ["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 2), "--target",
                         "ggml-base"]):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise LlamaCppError(f"{' '.join(cmd[:2])} failed:\n{proc.stderr[-1500:]}")
        except (OSError, LlamaCppError) as e:  # OSError: no cmake on this machine
            _GGML_BASE_FAILED.append(str(e))
            print(f"quantmix: warning: cannot build ggml's quantizers ({str(e).splitlines()[0]}); using the "
                  "torch numerics on the CPU instead (same bytes, slower)", file=sys.stderr)
            return None
    return lc if lc.libggml_base.exists() else None


def ensure_llamacpp() -> LlamaCpp:
    """Return the cached llama.cpp build, building it first if any tool is missing."""
    with file_lock("llamacpp"):
        root = _fetch_source()
        lc = LlamaCpp(root)
        stamp = root / "build" / "quantmix-build.stamp"
        wanted = " ".join(CMAKE_FLAGS + TARGETS)
        if stamp.exists() and stamp.read_text() == wanted and all(lc.tool(t).exists() for t in TARGETS):
            return lc
        print("quantmix: building llama.cpp tools (about 6 minutes on 2 cores, once)", file=sys.stderr)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "-S", str(root), "-B", str(root / "build"), *CMAKE_FLAGS],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(root / "build"), "-j", jobs, "--target", *TARGETS],
                       check=True, stdout=subprocess.DEVNULL)
        stamp.write_text(wanted)
        return lc
