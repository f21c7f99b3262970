"""Reading llama.cpp importance-matrix files (the GGUF format llama-imatrix writes, and the legacy .dat one).

What llama-quantize does with them (tools/quantize/quantize.cpp ``load_imatrix``, common/imatrix-loader.cpp):

- GGUF: per weight tensor NAME, ``NAME.in_sum2`` F32 ``[ne0, n_mat]`` (sum of squared inputs per input
  channel) and ``NAME.counts`` F32 ``[1, n_mat]`` (tokens seen, rounded to an integer on load). The weight
  llama-quantize hands the quantizer is ``in_sum2 / count`` per matrix (n_mat = n_expert for 3-D expert
  tensors, 1 otherwise), in float32; a matrix (expert) with count 0 gets 1.0 everywhere. A file without the
  ``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size`` keys is refused.
- Legacy .dat: ``int32 n_entries``, then per entry ``int32 len, name, int32 ncall, int32 nval, float[nval]``
  (sums already divided by the per-call token count and multiplied by ncall), then optionally
  ``int32 chunk_count, int32 len, dataset``. The weight is ``sums / ncall`` (the raw sums when ncall is 0).

Writing (:func:`write_imatrix`) follows llama-imatrix's ``save_imatrix`` byte for byte: GGUF v3, key-values
``general.type`` = "imatrix", ``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (u32) in that order; entries sorted by name, each ``NAME.in_sum2`` then ``NAME.counts``,
then (Addario's fork, ignored by llama.cpp's loader) ``NAME.in_sum`` where the entry has it; dims as
``ggml_n_dims`` counts them; data aligned to 32 bytes, zero padded.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantmix.paths import temp_beside

__all__ = ["ImatrixError", "ImatrixEntry", "Imatrix", "read_imatrix", "write_imatrix", "imatrix_bytes"]

_SUM2 = ".in_sum2"
_COUNTS = ".counts"


class ImatrixError(ValueError):
    """An imatrix file is missing, malformed, or does not fit a tensor; the message names file and tensor."""


@dataclass(frozen=True)
class ImatrixEntry:
    """One weight tensor's statistics: ``sums`` float32 [n_mat, ne0] and ``counts`` int64 [n_mat]."""

    sums: np.ndarray
    counts: np.ndarray
    in_sum: np.ndarray | None = None  # mean-activation sums, where the file has them (Addario's fork)

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_per_row(self) -> int:
        return int(self.sums.shape[1])


@dataclass
class Imatrix:
    """A loaded importance matrix: entries by GGUF tensor name, plus the file's metadata."""

    path: Path
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def weights(self, name: str) -> np.ndarray:
        """The importance weights llama-quantize passes to the quantizer for tensor ``name``:
        float32 [n_mat, ne0] (one row per expert). KeyError when the file has no entry for it."""
        e = self.entries[name]
        out = np.empty_like(e.sums)
        for j in range(e.n_mat):
            c = int(e.counts[j])
            if self.is_legacy:
                out[j] = e.sums[j] / np.float32(c) if c > 0 else e.sums[j]
            else:
                out[j] = e.sums[j] / np.float32(c) if c > 0 else np.float32(1.0)
        return out

    def weights_for(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """Weights for a GGUF tensor of ``shape`` (ggml order), as llama-quantize looks them up: None when the
        file has no entry; an ImatrixError when the sizes disagree (llama-quantize aborts too, except for
        token_embd, whose entry it ignores)."""
        if name not in self.entries:
            return None
        w = self.weights(name)
        n_mat = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        if w.size != shape[0] * n_mat:
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None
            raise ImatrixError(
                f"{self.path}: imatrix entry {name} has {w.size} values ({w.shape[0]} x {w.shape[1]}), "
                f"the tensor needs {shape[0]} x {n_mat} (shape {list(shape)}): wrong model for this imatrix?"
            )
        return w.reshape(n_mat, shape[0])


def read_imatrix(path: str | Path) -> Imatrix:
    """Read an imatrix file (GGUF, or the legacy .dat format when the file is not a GGUF)."""
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"{p}: no such imatrix file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return _read_gguf(p)
    return _read_legacy(p)


def _read_gguf(p: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(str(p), "r")
    except Exception as e:
        raise ImatrixError(f"{p}: not a readable GGUF imatrix ({e})") from None
    f = reader.fields
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in f]
    if missing:
        raise ImatrixError(f"{p}: missing imatrix metadata ({', '.join(missing)}); llama-quantize refuses it too")
    im = Imatrix(p)
    ds = f["imatrix.datasets"].contents()
    im.datasets = [str(x) for x in (ds if isinstance(ds, list) else [ds])]
    im.chunk_count = int(f["imatrix.chunk_count"].contents())
    im.chunk_size = int(f["imatrix.chunk_size"].contents())
    parts: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        for suffix in (_SUM2, _COUNTS, ".in_sum"):
            if t.name.endswith(suffix):
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = t
                break
    if not parts:
        raise ImatrixError(f"{p}: no data (no *.in_sum2 / *.counts tensors)")
    for name in sorted(parts):
        d = parts[name]
        if _SUM2 not in d or _COUNTS not in d:
            raise ImatrixError(f"{p}: mismatched sums and counts for {name}")
        s2, cn = d[_SUM2], d[_COUNTS]
        for t in (s2, cn):
            if int(t.tensor_type) != int(gguf.GGMLQuantizationType.F32):  # type: ignore[attr-defined]
                raise ImatrixError(f"{p}: {t.name} must be F32, is {t.tensor_type.name}")  # type: ignore[attr-defined]
        ne = [int(x) for x in s2.shape]  # type: ignore[attr-defined]
        ne0 = ne[0]
        sums = np.array(s2.data, dtype=np.float32).reshape(-1)  # type: ignore[attr-defined]
        raw_counts = np.array(cn.data, dtype=np.float32).reshape(-1)  # type: ignore[attr-defined]
        n_mat = raw_counts.size
        if n_mat == 0 or sums.size != n_mat * ne0:
            raise ImatrixError(f"{p}: {name}: {sums.size} sums do not split into {n_mat} matrices of {ne0}")
        if not np.all(np.isfinite(sums)) or not np.all(np.isfinite(raw_counts)):
            raise ImatrixError(f"{p}: {name}: non-finite values")
        r = raw_counts.astype(np.float64)
        counts = (np.sign(r) * np.floor(np.abs(r) + 0.5)).astype(np.int64)  # std::lround: half away from zero
        in_sum = None
        if ".in_sum" in d:
            in_sum = np.array(d[".in_sum"].data, dtype=np.float32).reshape(n_mat, ne0)  # type: ignore[attr-defined]
        im.entries[name] = ImatrixEntry(sums.reshape(n_mat, ne0), counts, in_sum)
    return im


def _read_legacy(p: Path) -> Imatrix:
    data = p.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{p}: truncated legacy imatrix at byte {pos}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ImatrixError(f"{p}: neither a GGUF nor a legacy imatrix with entries (first int32 = {n_entries})")
    im = Imatrix(p, is_legacy=True)
    for i in range(n_entries):
        (length,) = take("<i")
        if length <= 0 or pos + length > len(data):
            raise ImatrixError(f"{p}: entry {i + 1}: bad name length {length}")
        name = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{p}: entry {i + 1} ({name}): bad value count {nval}")
        if pos + 4 * nval > len(data):
            raise ImatrixError(f"{p}: entry {i + 1} ({name}): truncated values")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        im.entries[name] = ImatrixEntry(sums.reshape(1, nval), np.array([ncall], dtype=np.int64))
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(data):
                im.datasets.append(data[pos:pos + length].decode("utf-8", errors="replace"))
    return im


# ------------------------------------------------------------------------------------------------ writing

_GGUF_VERSION = 3
_ALIGN = 32
_T_U32, _T_STR, _T_ARR = 4, 8, 9  # gguf_type
_GGML_F32 = 0


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: the index of the last dimension above 1, plus one (at least 1)."""
    n = 1
    for i, d in enumerate(ne):
        if d > 1:
            n = i + 1
    return n


def _entry_tensors(name: str, e: ImatrixEntry) -> list[tuple[str, tuple[int, int], bytes]]:
    n_mat, ne0 = e.sums.shape
    if e.counts.shape != (n_mat,):
        raise ImatrixError(f"{name}: {e.counts.shape} counts for {n_mat} matrices")
    sums = np.ascontiguousarray(e.sums, dtype="<f4")
    if not np.all(np.isfinite(sums)):
        raise ImatrixError(f"{name}: non-finite sums")
    out = [(name + _SUM2, (ne0, n_mat), sums.tobytes()),
           (name + _COUNTS, (1, n_mat), np.ascontiguousarray(e.counts, dtype="<f4").tobytes())]
    if e.in_sum is not None:
        if e.in_sum.shape != e.sums.shape:
            raise ImatrixError(f"{name}: in_sum of shape {e.in_sum.shape}, in_sum2 {e.sums.shape}")
        out.append((name + ".in_sum", (ne0, n_mat), np.ascontiguousarray(e.in_sum, dtype="<f4").tobytes()))
    return out


def imatrix_bytes(im: Imatrix) -> bytes:
    """The GGUF imatrix file of ``im``, exactly as llama-imatrix would write the same statistics."""
    if not im.entries:
        raise ImatrixError(f"{im.path}: no entries to write")
    kv = [
        _gguf_str("general.type") + struct.pack("<I", _T_STR) + _gguf_str("imatrix"),
        _gguf_str("imatrix.datasets") + struct.pack("<IIQ", _T_ARR, _T_STR, len(im.datasets))
        + b"".join(_gguf_str(d) for d in im.datasets),
        _gguf_str("imatrix.chunk_count") + struct.pack("<II", _T_U32, im.chunk_count),
        _gguf_str("imatrix.chunk_size") + struct.pack("<II", _T_U32, im.chunk_size),
    ]
    tensors = [t for name in sorted(im.entries) for t in _entry_tensors(name, im.entries[name])]
    infos, offset = [], 0
    for tname, ne, data in tensors:
        nd = _n_dims(ne)
        infos.append(_gguf_str(tname) + struct.pack("<I", nd) + struct.pack(f"<{nd}q", *ne[:nd])
                     + struct.pack("<IQ", _GGML_F32, offset))
        offset += -(-len(data) // _ALIGN) * _ALIGN
    head = b"GGUF" + struct.pack("<IQQ", _GGUF_VERSION, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)
    parts = [head, b"\0" * (-len(head) % _ALIGN)]
    for _, _, data in tensors:
        parts += [data, b"\0" * (-len(data) % _ALIGN)]
    return b"".join(parts)


def write_imatrix(im: Imatrix, path: str | Path) -> Path:
    """Write ``im`` as a GGUF imatrix at ``path`` (atomically: a temp file renamed into place)."""
    p = Path(path)
    data = imatrix_bytes(im)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(p)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a plain file is what users expect
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
