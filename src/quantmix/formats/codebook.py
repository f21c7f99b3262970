"""Codebook grids of the IQ1 / IQ2 / IQ3 formats and the lookup tables ggml derives from them.

Why this exists: the grids are data (gguf-py ships them as hex strings next to its dequantizers); ggml
derives from each grid an index map (point -> grid index) and, for every point off the grid, a list of
neighbouring grid points (``iq2xs_init_impl`` / ``iq3xs_init_impl`` in ggml-quants.c). The quantizers'
tie-breaking depends on the exact order of those lists, so they are rebuilt here the same way: all grid
points at the ``nwant`` smallest distinct squared distances, sorted by (distance, grid index).

Coordinates: a grid point has D coordinates, each a level index l (0..7 for IQ3, 0..2 for IQ2/IQ1); the
quantizers work on the odd integers 2*l + 1 and key a point as ``sum_k l_k << (bits * k)``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# qtype -> (bits per coordinate in a map key, ggml's kmap_size, nwant) as iq2xs_init_impl / iq3xs_init_impl set them
GGML_TABLE_PARAMS: dict[str, tuple[int, int, int]] = {
    "IQ2_XXS": (2, 43692, 2),
    "IQ2_XS": (2, 43692, 2),
    "IQ2_S": (2, 43692, 1),
    "IQ1_S": (2, 43692, 3),
    "IQ1_M": (2, 43692, 3),
    "IQ3_XXS": (3, 4096, 2),
    "IQ3_S": (3, 4096, 3),
}

_KEY_CHUNK = 4096  # off-grid keys per distance-matrix slice (bounds memory for the 2048-point grids)
_BIG = 1 << 30  # past any d2 * G + j (d2 <= 8 * 14^2, G <= 2048)


def _gguf_quant_class(qtype: str):  # type: ignore[no-untyped-def]
    import gguf.quants as gq

    cls = getattr(gq, qtype, None)
    if cls is None or getattr(cls, "grid_hex", None) is None:
        raise ValueError(f"{qtype}: gguf-py has no codebook grid for this type")
    return cls


@functools.lru_cache(maxsize=None)
def _levels_np(qtype: str) -> np.ndarray:
    cls = _gguf_quant_class(qtype)
    n_levels = len(cls.grid_map)
    bits = max(1, (n_levels - 1).bit_length())  # as gguf-py: ceil(log2(len(grid_map)))
    per_byte = 8 // bits
    raw = bytes.fromhex(cls.grid_hex.decode("ascii"))
    b = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    shifts = np.arange(per_byte, dtype=np.int64) * (8 // per_byte)
    lv = ((b[:, None] >> shifts[None, :]) & ((1 << bits) - 1)).reshape(-1)
    g, d = cls.grid_shape
    if lv.size != g * d:
        raise ValueError(f"{qtype}: gguf grid has {lv.size} coordinates, expected {g}x{d}")
    if int(lv.max()) >= n_levels:
        raise ValueError(f"{qtype}: gguf grid uses level {int(lv.max())} of {n_levels}")
    out = lv.reshape(g, d).astype(np.uint8)
    out.setflags(write=False)
    return out


def grid_levels(qtype: str) -> np.ndarray:
    """The grid of ``qtype`` as level indices, uint8 ``[G, D]`` (read-only), decoded from gguf-py."""
    return _levels_np(qtype)


def grid_values(qtype: str) -> np.ndarray:
    """The grid as the dequantizers read it: gguf-py's ``grid_map`` applied to the levels, float32 ``[G, D]``."""
    cls = _gguf_quant_class(qtype)
    return np.asarray(cls.grid_map, dtype=np.float32)[grid_levels(qtype)]


@dataclass(frozen=True)
class Codebook:
    """A grid with ggml's index map and neighbour lists (one device).

    levels: int64 [G, D] level indices; kmap: int64 [kmap_size], the grid index of the point with that
    key or -1; neighbours: int64 [kmap_size, K], for each off-grid key its neighbour grid indices in
    ggml's search order, padded with -1 (rows of on-grid keys are all -1); counts: int64 [kmap_size]."""

    qtype: str
    bits: int
    nwant: int
    levels: Tensor
    kmap: Tensor
    neighbours: Tensor
    counts: Tensor

    @property
    def size(self) -> int:
        return int(self.levels.shape[0])

    @property
    def dim(self) -> int:
        return int(self.levels.shape[1])

    def key(self, lv: Tensor) -> Tensor:
        """Map keys (int64 ``[...]``) of points given as level indices ``[..., D]``."""
        shifts = torch.arange(self.dim, device=lv.device, dtype=torch.int64) * self.bits
        return (lv.to(torch.int64) << shifts).sum(dim=-1)

    def to(self, device: torch.device | str) -> Codebook:
        """This codebook's tables on ``device`` (cached per device)."""
        return _on_device(self.qtype, self.nwant, str(torch.device(device)))


def _build(qtype: str, bits: int, kmap_size: int, nwant: int) -> Codebook:
    lv = torch.from_numpy(grid_levels(qtype).astype(np.int64))  # [G, D]
    g, d = lv.shape
    shifts = torch.arange(d, dtype=torch.int64) * bits
    gkey = (lv << shifts).sum(dim=1)
    if int(gkey.max()) >= kmap_size:
        raise ValueError(f"{qtype}: grid key {int(gkey.max())} outside ggml's map of {kmap_size}")
    if torch.unique(gkey).numel() != g:
        raise ValueError(f"{qtype}: the gguf grid has duplicate points")
    kmap = torch.full((kmap_size,), -1, dtype=torch.int64)
    kmap[gkey] = torch.arange(g, dtype=torch.int64)
    off = (kmap < 0).nonzero().squeeze(1)
    gposf = (2 * lv + 1).to(torch.float32)  # [G, D]
    g2 = gposf.square().sum(1)
    jidx = torch.arange(g, dtype=torch.int32)[None, :]
    lists: list[Tensor] = []
    for c0 in range(0, off.numel(), _KEY_CHUNK):
        keys = off[c0:c0 + _KEY_CHUNK]
        pos = (2 * ((keys[:, None] >> shifts[None, :]) & ((1 << bits) - 1)) + 1).to(torch.float32)  # [M, D]
        # squared distances as |p|^2 + |g|^2 - 2 p.g: small integers, exact in float32 (< 2^24)
        d2 = (pos.square().sum(1, keepdim=True) + g2[None, :] - 2.0 * (pos @ gposf.t())).to(torch.int32)
        # C keeps every point whose distance is among the nwant smallest distinct ones ...
        thr = d2.amin(dim=1, keepdim=True)
        for _ in range(nwant - 1):
            nxt = torch.where(d2 > thr, d2, _BIG).amin(dim=1, keepdim=True)
            thr = torch.where(nxt < _BIG, nxt, thr)
        keep = d2 <= thr
        # ... in qsort's (d2, j) order: ascending d2 * G + j, the dropped points pushed past the end
        order_key = torch.where(keep, d2 * g + jidx, _BIG)
        k_here = int(keep.sum(dim=1).max())
        top = torch.topk(order_key, k_here, dim=1, largest=False, sorted=True).values
        lists.append(torch.where(top < _BIG, top % g, -1).to(torch.int64))
    kmax = max((t.shape[1] for t in lists), default=1)
    neighbours = torch.full((kmap_size, kmax), -1, dtype=torch.int64)
    if lists:
        padded = [torch.nn.functional.pad(t, (0, kmax - t.shape[1]), value=-1) for t in lists]
        neighbours[off] = torch.cat(padded)  # kept entries form a prefix of each row
    counts = (neighbours >= 0).sum(dim=1)
    return Codebook(qtype, bits, nwant, lv, kmap, neighbours.contiguous(), counts)


@functools.lru_cache(maxsize=None)
def _on_device(qtype: str, nwant: int, device: str) -> Codebook:
    base = codebook(qtype, nwant=nwant)
    if device == "cpu":
        return base
    dev = torch.device(device)
    return Codebook(base.qtype, base.bits, base.nwant, base.levels.to(dev), base.kmap.to(dev),
                    base.neighbours.to(dev), base.counts.to(dev))


_TABLE_VERSION = 1  # bump when _build changes what it computes


def _cache_path(qtype: str, bits: int, kmap_size: int, nwant: int) -> Path:
    """Disk cache file keyed by the grid's bytes and every build parameter (stale tables are never read)."""
    from quantmix.paths import cache_dir

    h = hashlib.sha256(grid_levels(qtype).tobytes())
    h.update(f"{qtype}:{bits}:{kmap_size}:{nwant}:{_TABLE_VERSION}".encode())
    return cache_dir() / "codebooks" / f"{qtype.lower()}-nwant{nwant}-{h.hexdigest()[:16]}.npz"


@functools.lru_cache(maxsize=None)
def _codebook_cpu(qtype: str, bits: int, kmap_size: int, nwant: int) -> Codebook:
    """Build once per process; the larger grids' neighbour lists take seconds, so they go to disk too."""
    path = _cache_path(qtype, bits, kmap_size, nwant)
    lv = torch.from_numpy(grid_levels(qtype).astype(np.int64))
    if path.exists():
        try:
            with np.load(path) as z:
                kmap = torch.from_numpy(z["kmap"].astype(np.int64))
                nb = torch.from_numpy(z["neighbours"].astype(np.int64))
            if kmap.shape == (kmap_size,) and nb.shape[0] == kmap_size:
                return Codebook(qtype, bits, nwant, lv, kmap, nb, (nb >= 0).sum(dim=1))
        except (OSError, ValueError, KeyError):
            pass  # unreadable: rebuild and overwrite
    cb = _build(qtype, bits, kmap_size, nwant)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, kmap=cb.kmap.numpy().astype(np.int32), neighbours=cb.neighbours.numpy().astype(np.int16))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return cb


def codebook(qtype: str, *, nwant: int | None = None, device: torch.device | str = "cpu") -> Codebook:
    """The grid of ``qtype`` with ggml's map and neighbour lists (built once per process, then cached).

    ``nwant`` defaults to ggml's value for the type (GGML_TABLE_PARAMS)."""
    if qtype not in GGML_TABLE_PARAMS:
        raise ValueError(f"{qtype}: no codebook tables known (have {', '.join(GGML_TABLE_PARAMS)})")
    bits, kmap_size, default_nwant = GGML_TABLE_PARAMS[qtype]
    cb = _codebook_cpu(qtype, bits, kmap_size, default_nwant if nwant is None else nwant)
    dev = torch.device(device)
    return cb if dev.type == "cpu" else _on_device(qtype, cb.nwant, str(dev))
