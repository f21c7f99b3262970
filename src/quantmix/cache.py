"""What the cache (``$QUANTMIX_CACHE``, default ``~/.cache/quantmix``) holds, and pruning it.

Every entry is keyed by the inputs it was computed from, so a stale entry is never reused, only kept: the
converted float GGUFs of big models (hundreds of GB) and the per-(tensor, type) error entries would otherwise
grow without bound. ``quantmix cache`` reports each folder; ``quantmix cache --prune NAME... [--older-than
DAYS]`` removes entries (by modification time), all of them rebuilt on demand when needed again.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from quantmix.paths import cache_dir

__all__ = ["CacheFolder", "FOLDERS", "DERIVED", "cache_report", "prune", "format_report"]

# folder -> what it holds (all rebuilt on demand)
FOLDERS = {
    "converted": "float GGUFs converted from Hugging Face directories",
    "errors": "error-table entries, one per (tensor, type)",
    "sensitivity": "sensitivity-probe results",
    "refine": "refinement search states",
    "imatrix": "importance matrices computed by optimize / run",
    "reference": "evaluation reference logits",
    "imatrix-ref": "llama-imatrix outputs the tests compare with",
    "fingerprints": "file hashes, remembered per file version",
    "spill": "hidden states a running engine spilled to disk",
    "gpu": "compiled GPU kernels",
    "codebooks": "codebook tables of the IQ types",
    "fixtures": "built test models (rebuilt when missing: minutes)",
    "src": "llama.cpp source and the tools built from it (rebuilt: about 6 minutes)",
    "text": "built-in calibration and evaluation texts",
    "tests": "outputs kept by the tests",
    "bench-quality": "bench/quality.py's GGUFs and results",
    "locks": "inter-process locks",
}
# what --prune derived removes: results of measurement, not the models, tools and texts they are measured on
DERIVED = ("converted", "errors", "sensitivity", "refine", "imatrix", "reference", "spill")


@dataclass(frozen=True)
class CacheFolder:
    name: str
    what: str
    files: int
    n_bytes: int
    newest: float | None  # modification time of the newest file


def _files(d: Path) -> list[Path]:
    out = []
    for root, _, names in os.walk(d):
        out.extend(Path(root) / n for n in names)
    return out


def cache_report(root: Path | None = None) -> list[CacheFolder]:
    """One row per folder of the cache (known ones first, then any other), with file count and bytes."""
    root = cache_dir() if root is None else root
    names = [n for n in FOLDERS if (root / n).is_dir()]
    names += sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in FOLDERS)
    rows = []
    for n in names:
        files = _files(root / n)
        sizes, newest = 0, None
        for f in files:
            try:
                st = f.lstat()
            except OSError:
                continue
            sizes += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size  # sparse files as stored
            newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
        rows.append(CacheFolder(n, FOLDERS.get(n, "(not quantmix's)"), len(files), sizes, newest))
    return rows


def prune(names: list[str], older_than_days: float | None = None, root: Path | None = None) -> tuple[int, int]:
    """Remove the files of cache folders ``names`` (``derived``: :data:`DERIVED`; ``all``: every folder but
    locks), only those not modified for ``older_than_days`` when given. Returns (files, bytes) removed."""
    root = cache_dir() if root is None else root
    want: list[str] = []
    for n in names:
        if n == "derived":
            want += list(DERIVED)
        elif n == "all":
            want += [f for f in FOLDERS if f != "locks"]
        elif n in FOLDERS and n != "locks":
            want.append(n)
        else:
            raise ValueError(f"--prune {n!r}: not a cache folder (choose from derived, all, "
                             f"{', '.join(f for f in FOLDERS if f != 'locks')})")
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    n_files = n_bytes = 0
    for n in dict.fromkeys(want):
        d = root / n
        if not d.is_dir():
            continue
        if cutoff is None:
            for f in _files(d):
                n_files, n_bytes = n_files + 1, n_bytes + f.lstat().st_blocks * 512
            shutil.rmtree(d)
            continue
        for f in _files(d):
            st = f.lstat()
            if st.st_mtime < cutoff:
                f.unlink()
                n_files, n_bytes = n_files + 1, n_bytes + st.st_blocks * 512
    return n_files, n_bytes


def format_report(rows: list[CacheFolder], root: Path) -> str:
    def size(b: int) -> str:
        for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if b >= k:
                return f"{b / k:.1f} {unit}"
        return f"{b} B"

    lines = [f"cache {root}", f"{'folder':<14} {'size':>10} {'files':>7}  {'newest':<16}  holds"]
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.newest)) if r.newest else "-"
        lines.append(f"{r.name:<14} {size(r.n_bytes):>10} {r.files:>7}  {when:<16}  {r.what}")
    lines.append(f"{'total':<14} {size(sum(r.n_bytes for r in rows)):>10} {sum(r.files for r in rows):>7}")
    lines.append("prune: quantmix cache --prune derived|all|FOLDER... [--older-than DAYS] (rebuilt when needed)")
    return "\n".join(lines)
