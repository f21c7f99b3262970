"""The per-tensor error table: for every quantizable tensor and candidate type, the importance-weighted
relative quantization error, the planner's cost input (the allocation method of Addario, llama.cpp PR #15550,
computed over ALL rows instead of a sample).

For a tensor with rows x_i, error e_i = dequant(quant(x_i)) - x_i, importance w = in_sum2/counts and mean
activation a = in_sum/counts (llama.cpp imatrix statistics)::

    rel_err   = sum_i sum_j w_j e_ij^2 / sum_i sum_j w_j x_ij^2
    bias_term = sum_i [(sum_j w_j a_j e_ij)^2 / (sum_j w_j a_j^2)] / sum_i sum_j w_j x_ij^2
    cost      = rel_err + lambda * bias_term

bias_term is the part of the weighted error that lies along the mean activation (by Cauchy-Schwarz it never
exceeds rel_err): errors that shift every output in the same direction instead of averaging out. It is 0 and
flagged off when the imatrix has no ``in_sum`` (mainline llama-imatrix files) or there is no imatrix (then w=1).

Routed experts (3-D tensors) are measured per expert, each with its own imatrix row (the one llama-quantize
quantizes it with), and combined weighted by the expert's token count; experts never routed to (count 0)
weigh nothing and are skipped. Without counts (no imatrix) the experts weigh equally.

Each tensor is read once: slab by slab (one expert at a time for routed experts) its raw bytes go to the device
(through pinned memory on CUDA), are converted to float32 there, and every candidate type not yet cached is
measured while the slab is resident; the float64 sums stay on the device and are read back once per tensor.

Results are cached per (tensor, type) under ``cache_dir()/errors``, keyed by a hash of the tensor's full bytes,
the imatrix values used, the type, :data:`NUMERICS_VERSION` and the backend, written atomically; an interrupted
run resumes where it stopped (the entries of the tensor whose pass was cut off are measured again) and gives
the identical table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from quantmix.calibration.imatrix_io import Imatrix, read_imatrix
from quantmix.formats import api as _api
from quantmix.formats.api import quant_error, supported_types
from quantmix.formats.registry import RELEASE_QUANT_TYPES, get_type
from quantmix.formats.staging import SlabFeeder
from quantmix.model.catalog import catalog_from_gguf
from quantmix.paths import cache_dir

__all__ = ["ErrorRow", "ErrorTable", "ErrorTableError", "error_table", "load_costs"]

NUMERICS_VERSION: str = getattr(_api, "NUMERICS_VERSION", "1")
TABLE_FORMAT = 1
FLOAT_TYPES = ("F32", "F16", "BF16")
# Weights per slab converted to float32 and handed to quant_error (bounded memory).
SLAB_WEIGHTS = 1 << 22
SLAB_WEIGHTS_GPU = 1 << 26
HASH_PIECE = 1 << 26  # bytes per independently hashed piece of a tensor
_ENTRY_VERSION = 2  # layout of one cache entry and of its key (2: piece-wise tensor hash)


class ErrorTableError(ValueError):
    """Bad input to the error table (names the file / tensor and what is wrong)."""


@dataclass(frozen=True)
class ErrorRow:
    """One (tensor, type) measurement. ``experts``: per expert [count, rel_err, bias_term] for 3-D tensors."""

    tensor: str
    type: str
    bytes: int
    rel_err: float
    bias_term: float
    backend: str
    experts: list[list[float]] | None = None


@dataclass
class ErrorTable:
    """Rows in catalog order, types in ggml order; ``bias`` False when the bias term is off (see ``bias_note``)."""

    gguf: str
    imatrix: str | None
    bias: bool
    bias_note: str
    bias_lambda: float
    rows: list[ErrorRow] = field(default_factory=list)
    computed: int = 0  # entries measured by this call (the others came from the cache)

    def cost(self, row: ErrorRow, bias_lambda: float | None = None) -> float:
        lam = self.bias_lambda if bias_lambda is None else bias_lambda
        return row.rel_err + lam * row.bias_term

    def to_costs(self, bias_lambda: float | None = None) -> dict[str, dict[str, float]]:
        """tensor -> type -> cost, the input of :func:`quantmix.planning.solver.optimize`."""
        out: dict[str, dict[str, float]] = {}
        for r in self.rows:
            out.setdefault(r.tensor, {})[r.type] = self.cost(r, bias_lambda)
        return out

    def to_json(self) -> dict:
        # ``computed`` is this call's count, not part of the table
        d = {k: v for k, v in asdict(self).items() if k not in ("rows", "computed")}
        d["format"] = TABLE_FORMAT
        d["numerics_version"] = NUMERICS_VERSION
        d["rows"] = [asdict(r) for r in self.rows]
        return d

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (atomically)."""
        p = Path(path)
        _atomic_write(p, json.dumps(self.to_json(), indent=1, sort_keys=True).encode())
        return p

    @classmethod
    def load(cls, path: str | Path) -> ErrorTable:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
            if d.get("format") != TABLE_FORMAT:
                raise ErrorTableError(f"{p}: error-table format {d.get('format')!r}, expected {TABLE_FORMAT}")
            rows = [ErrorRow(**r) for r in d["rows"]]
            return cls(d["gguf"], d["imatrix"], bool(d["bias"]), d["bias_note"], float(d["bias_lambda"]), rows)
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, ErrorTableError):
                raise
            raise ErrorTableError(f"{p}: not a readable error table ({type(e).__name__}: {e})") from None


def load_costs(path: str | Path, bias_lambda: float | None = None) -> dict[str, dict[str, float]]:
    """The planner's cost table from a saved error table."""
    return ErrorTable.load(path).to_costs(bias_lambda)


# ------------------------------------------------------------------------------------------------ helpers


def _atomic_write(p: Path, data: bytes) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _hash_bytes(data: np.ndarray, threads: int | None = None) -> str:
    """A digest of the full buffer: blake2b of every 64 MiB piece (in a thread pool: hashlib releases the GIL,
    so pieces hash in parallel), then blake2b of the byte length and the piece digests in order. Any changed,
    added or removed byte changes a piece digest or the length, hence the key. A memmap is never read whole
    into memory. ``threads`` default: ``torch.get_num_threads()``."""
    flat = data.reshape(-1).view(np.uint8)
    starts = range(0, flat.size, HASH_PIECE)

    def piece(o: int) -> bytes:
        return hashlib.blake2b(memoryview(np.ascontiguousarray(flat[o:o + HASH_PIECE])), digest_size=32).digest()

    k = min(len(starts), threads or torch.get_num_threads())
    if k > 1:
        with ThreadPoolExecutor(k) as ex:
            digests = list(ex.map(piece, starts))
    else:
        digests = [piece(o) for o in starts]
    h = hashlib.blake2b(digest_size=20, person=b"qm-pieces")
    h.update(int(flat.size).to_bytes(8, "little"))
    for d in digests:
        h.update(d)
    return h.hexdigest()


def _hash_arrays(*arrays: np.ndarray | None) -> str:
    h = hashlib.blake2b(digest_size=20)
    for a in arrays:
        if a is None:
            h.update(b"none")
        else:
            b = np.ascontiguousarray(a)
            h.update(f"{b.dtype.str}{b.shape}".encode())
            h.update(memoryview(b.view(np.uint8).reshape(-1)))
    return h.hexdigest()


def _backend(qtype: str, device: torch.device) -> str:
    """The backend that measures ``qtype`` on ``device``: ggml's C for the codebook types on a CPU when
    llama.cpp is built (same bytes, ~10x faster than the torch numerics there), else CUDA kernels or torch."""
    from quantmix.formats import gpu
    from quantmix.formats.ggml_backend import preferred_backend

    if preferred_backend(qtype, device) == "ggml":
        return "ggml"
    return "cuda" if device.type == "cuda" and gpu.has_kernel(qtype) else "torch"


@dataclass(frozen=True)
class _Stats:
    """The imatrix statistics of one tensor: per matrix (expert) weights, mean activations, counts."""

    w: np.ndarray | None  # float32 [n_mat, ne0] (None: no imatrix entry, unweighted)
    a: np.ndarray | None  # float32 [n_mat, ne0] (None: no in_sum)
    counts: np.ndarray | None  # int64 [n_mat]


def _stats(im: Imatrix | None, name: str, shape: tuple[int, ...]) -> _Stats:
    if im is None:
        return _Stats(None, None, None)
    w = im.weights_for(name, shape)
    if w is None:
        return _Stats(None, None, None)
    e = im.entries[name]
    n_mat = w.shape[0]
    counts = e.counts.reshape(-1).astype(np.int64)
    if counts.size != n_mat:
        counts = np.repeat(counts[:1], n_mat)
    a = None
    if e.in_sum is not None:
        s = e.in_sum.reshape(n_mat, w.shape[1]).astype(np.float32)
        c = np.maximum(counts, 1).astype(np.float32)[:, None]
        a = np.where(counts[:, None] > 0, s / c, np.float32(0.0)).astype(np.float32)
    return _Stats(w, a, counts)


def _measure(data: np.ndarray, src_type: str, shape: tuple[int, ...], qtypes: list[str], st: _Stats,
             device: torch.device, name: str, feeder: SlabFeeder | None = None) -> dict[str, dict]:
    """Error sums of one tensor quantized to each of ``qtypes``, per matrix, combined (see the module docstring).

    One pass over the tensor: each slab goes to the device once and every type is measured while it is there;
    the sums stay on the device (float64, added in the same order as one type at a time would) and are read
    back once at the end."""
    ne0 = shape[0]
    rows_per_mat = shape[1] if len(shape) > 1 else 1
    n_mat = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    src_rb = data.size // (rows_per_mat * n_mat)
    slab = SLAB_WEIGHTS if device.type == "cpu" else SLAB_WEIGHTS_GPU
    step = max(1, slab // ne0)
    counts = [int(st.counts[e]) if st.counts is not None else 1 for e in range(n_mat)]
    live = [e for e in range(n_mat) if not (st.counts is not None and counts[e] <= 0 and n_mat > 1)]
    # per expert imatrix weights (float32, as quant_error takes them), w*a and sum w a^2 (one read-back)
    w_dev: dict[int, torch.Tensor | None] = {}
    wa_dev: dict[int, torch.Tensor | None] = {}
    wa2_dev: list[torch.Tensor] = []
    for e in live:
        w = torch.from_numpy(st.w[e].copy()).to(device) if st.w is not None else None
        w_dev[e] = w
        wa_dev[e] = None
        if st.a is not None and w is not None:
            wd = w.double()
            ad = torch.from_numpy(st.a[e].copy()).to(device).double()
            wa_dev[e] = wd * ad  # quant_error's bias = sum_j act_mean_j e_j, so this gives sum_j w_j a_j e_j
            wa2_dev.append((wa_dev[e] * ad).sum())
    wa2: dict[int, float] = {}
    if wa2_dev:
        wa2 = dict(zip([e for e in live if wa_dev[e] is not None], torch.stack(wa2_dev).tolist(), strict=True))
    slabs = [(e, r0, min(rows_per_mat, r0 + step)) for e in live for r0 in range(0, rows_per_mat, step)]
    raws = [data[(e * rows_per_mat + r0) * src_rb:(e * rows_per_mat + r1) * src_rb] for e, r0, r1 in slabs]
    acc = torch.zeros((len(qtypes), n_mat, 3), dtype=torch.float64, device=device)  # err, ref, bias per expert
    backends: list[set[str]] = [set() for _ in qtypes]
    chosen = [_backend(q, device) for q in qtypes]
    own = feeder is None
    feeder = feeder if feeder is not None else SlabFeeder(device)
    try:
        for (e, _, _), x in zip(slabs, feeder.slabs(raws, src_type, ne0), strict=True):
            w, wa, a2 = w_dev[e], wa_dev[e], wa2.get(e, 0.0)
            ci = _api.check_inputs(x, w, wa if a2 > 0 else None, name=name)  # once for every type
            for i, q in enumerate(qtypes):
                r = quant_error(ci, q, backend="ggml" if chosen[i] == "ggml" else "auto")
                backends[i].add(r.backend)
                acc[i, e, 0] += r.err_w.sum()
                acc[i, e, 1] += r.ref_w.sum()
                if r.bias is not None:
                    acc[i, e, 2] += r.bias.double().square().sum() / a2
    finally:
        if own:
            feeder.close()
    sums = acc.cpu().tolist()
    out: dict[str, dict] = {}
    for i, q in enumerate(qtypes):
        per: list[tuple[int, float, float]] = []
        for e in range(n_mat):
            if e not in w_dev:
                per.append((0, 0.0, 0.0))  # never routed to: weighs nothing
                continue
            err, ref, bias = sums[i][e]
            per.append((counts[e], err / ref if ref > 0 else 0.0, bias / ref if ref > 0 else 0.0))
        tot = sum(c for c, _, _ in per)
        if tot > 0:
            rel = sum(c * r for c, r, _ in per) / tot
            bt = sum(c * b for c, _, b in per) / tot
        else:  # an entry whose every expert has count 0: llama-quantize uses w=1 for all; weigh equally
            rel = bt = 0.0
        out[q] = {"v": _ENTRY_VERSION, "rel_err": rel, "bias_term": bt,
                  "backend": "+".join(sorted(backends[i])) or "none",
                  "experts": [list(p) for p in per] if n_mat > 1 else None}
    return out


# ------------------------------------------------------------------------------------------------ public


def _n_bytes(s: object) -> int:
    return int(s.n_bytes) if isinstance(s, _HFSourceTensor) else int(s.data.size)


class _HFSourceTensor:
    """A tensor of a Hugging Face checkpoint as the F32 GGUF would hold it, read only when measured."""

    def __init__(self, hf: object, name: str) -> None:
        self.hf = hf
        self.name = name
        self.shape = hf.shape(name)
        self.type_name = "F32"
        self.n_bytes = 4 * int(np.prod(self.shape, dtype=np.int64))

    @property
    def data(self) -> np.ndarray:
        return self.hf.get(self.name).numpy().reshape(-1).view(np.uint8)


def _sources(path: Path) -> tuple[object, dict[str, object], str]:
    """The catalog, the tensors by name and how their identity is hashed, of a float GGUF or an HF directory."""
    from quantmix.export.gguf_writer import open_source
    from quantmix.model.catalog import catalog_from_config

    if path.is_dir():
        from quantmix.model.checkpoint import CheckpointError
        from quantmix.model.engine import EngineError
        from quantmix.model.hf_tensors import HFTensors

        try:
            hf = HFTensors(path)
        except (CheckpointError, EngineError) as e:
            raise ErrorTableError(str(e)) from None
        return catalog_from_config(path), {n: _HFSourceTensor(hf, n) for n in hf.names}, "hf"
    if not path.is_file():
        raise ErrorTableError(f"{path}: no such GGUF file or Hugging Face model directory")
    return catalog_from_gguf(path), {t.name: t for t in open_source(path).tensors}, "bytes"


def error_table(
    gguf_path: str | Path,
    imatrix_path: str | Path | None = None,
    candidates: list[str] | None = None,
    device: str | torch.device | None = None,
    cache: bool = True,
    progress: bool = True,
    *,
    bias_lambda: float = 1.0,
    cache_root: str | Path | None = None,
    on_compute: Callable[[str, str], None] | None = None,
    tensors: list[str] | None = None,
) -> ErrorTable:
    """Measure every quantizable tensor of a float GGUF (F32/F16/BF16; MXFP4 ones read dequantized), or of a
    Hugging Face directory read straight from its safetensors (:class:`quantmix.model.hf_tensors.HFTensors`: the
    values the converter's F32 GGUF would hold, no copy written), against every candidate type.

    ``candidates``: type names (default: every type with numerics except the float ones); a type whose block
    does not divide a tensor's rows is left out for that tensor. ``cache_root``: where the per-(tensor, type)
    results live (default ``cache_dir()/errors``). ``on_compute(tensor, type)`` is called for each entry that is
    not served from the cache, before its tensor's pass (progress hooks, tests); if it raises, the entries
    announced before it are measured and cached, then the exception propagates. ``tensors``: measure only these
    (default: every quantizable tensor)."""
    gp = Path(gguf_path)
    if not gp.exists():
        raise ErrorTableError(f"{gp}: no such GGUF file or Hugging Face model directory")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if candidates is None:
        cands = [q for q in supported_types() if q not in FLOAT_TYPES]
    else:
        cands = []
        for q in candidates:
            try:
                cands.append(get_type(q).name)
            except Exception as e:
                raise ErrorTableError(f"candidate type {q!r}: {e}") from None
        bad = [q for q in cands if q not in supported_types()]
        if bad:
            raise ErrorTableError(f"candidate types {', '.join(bad)} have no quantize numerics in quantmix")
    cands = [q for q in supported_types() if q in set(cands)]  # ggml order, no duplicates
    im = read_imatrix(imatrix_path) if imatrix_path is not None else None
    has_in_sum = im is not None and any(e.in_sum is not None for e in im.entries.values())
    if im is None:
        note = "no imatrix: unweighted errors, bias term off"
    elif not has_in_sum:
        note = "imatrix has no in_sum (mainline llama-imatrix): bias term off"
    else:
        note = "bias term on (imatrix in_sum)"
    root = Path(cache_root) if cache_root is not None else cache_dir() / "errors"

    cat, src, ident = _sources(gp)
    todo = [t for t in cat if t.quantizable]
    if tensors is not None:
        unknown = sorted(set(tensors) - {t.name for t in todo})
        if unknown:
            raise ErrorTableError(f"{gp}: tensor {unknown[0]} is not a quantizable tensor of this model")
        todo = [t for t in todo if t.name in set(tensors)]
    for t in todo:
        if src[t.name].type_name not in FLOAT_TYPES + RELEASE_QUANT_TYPES:
            raise ErrorTableError(f"{gp}: tensor {t.name} is {src[t.name].type_name}; the error table needs a "
                                  f"float (F32/F16/BF16) source GGUF (MXFP4 tensors are read dequantized)")
    table = ErrorTable(str(gp), str(imatrix_path) if imatrix_path is not None else None, has_in_sum, note,
                       float(bias_lambda))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(_n_bytes(src[t.name]) for t in todo), unit="B", unit_scale=True, desc="error table")
    feeder = SlabFeeder(dev)
    memos: dict[Path, object] = {}  # shard -> its remembered tensor hashes (model.fingerprint.VersionMemo)
    try:
        for t in todo:
            s = src[t.name]
            shape = tuple(int(d) for d in s.shape)
            st = _stats(im, t.name, shape)
            types = [q for q in cands if get_type(q).fits_row(shape[0])
                     and not (get_type(q).requires_imatrix and st.w is None)]
            t_hash = (s.hf.identity(t.name) if ident == "hf" else _tensor_hash(s, memos)) if cache else ""
            i_hash = _hash_arrays(st.w, st.a, st.counts) if cache else ""
            entries: dict[str, dict] = {}
            paths: dict[str, Path] = {}
            for q in types:
                if not cache:
                    continue
                key = hashlib.blake2b(json.dumps(
                    [_ENTRY_VERSION, NUMERICS_VERSION, t.name, shape, s.type_name, t_hash, i_hash, q,
                     _backend(q, dev)]).encode(), digest_size=20).hexdigest()
                paths[q] = path = root / key[:2] / f"{key}.json"
                if path.is_file():
                    try:
                        entry = json.loads(path.read_text())
                        if entry.get("v") == _ENTRY_VERSION:
                            entries[q] = entry
                    except (OSError, ValueError):
                        pass
            # announce each missing entry; a hook that raises stops before that entry, after the ones before
            # it are measured and cached (as if measured one at a time)
            go: list[str] = []
            stop: BaseException | None = None
            for q in types:
                if q in entries:
                    continue
                if on_compute is not None:
                    try:
                        on_compute(t.name, q)
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        stop = exc
                        break
                go.append(q)
            if go:
                data = s.data  # an HF tensor is read here, once
                for q, entry in _measure(data, s.type_name, shape, go, st, dev, t.name, feeder).items():
                    entries[q] = entry
                    table.computed += 1
                    if q in paths:
                        _atomic_write(paths[q], json.dumps(entry).encode())
            if stop is not None:
                raise stop
            for q in types:
                entry = entries[q]
                if not (math.isfinite(entry["rel_err"]) and math.isfinite(entry["bias_term"])):
                    raise ErrorTableError(
                        f"{gp}: tensor {t.name} cannot be stored as {q}: its quantization error is not finite "
                        f"(relative error {entry['rel_err']}), so some block's f16 scale overflows (a weight too "
                        f"large for {q}) or the source holds inf / NaN; keep it in F32 or BF16 "
                        f"(--pin '{t.name}=BF16') or leave {q} out of --types")
                table.rows.append(ErrorRow(t.name, q, get_type(q).tensor_bytes(shape), float(entry["rel_err"]),
                                           float(entry["bias_term"]), entry["backend"], entry["experts"]))
            if bar is not None:
                bar.update(_n_bytes(s))
    finally:
        feeder.close()
        for memo in memos.values():
            memo.save()
        if bar is not None:
            bar.close()
    return table


def _tensor_hash(s: object, memos: dict) -> str:
    """The digest of a GGUF tensor's bytes (:func:`_hash_bytes`), remembered per version of its file: a warm run
    hashes nothing (on a 355B model the hashing alone is minutes)."""
    from quantmix.model.fingerprint import VersionMemo

    shard = Path(s.shard)
    if shard not in memos:
        memos[shard] = VersionMemo(shard, "tensors")
    memo = memos[shard]
    key = f"{s.name}@{s.file_offset}:{s.type_name}:{list(s.shape)}"
    h = memo.get(key)
    if h is None:
        h = _hash_bytes(s.data)
        memo.put(key, h)
    return h

