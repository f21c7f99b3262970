"""Write a quantized GGUF from a float GGUF: each tensor in its recipe type, with quantmix's own numerics.

The output is laid out as llama-quantize lays it out (src/llama-quant.cpp ``llama_model_quantize_impl``), so the
two tools' files can be compared byte for byte:

- key-values: the source's, in order, split keys removed; then ``general.quantization_version`` = 2 and
  ``general.file_type`` = the recipe's file type (each removed from where it was and appended, as
  ``gguf_set_val_*`` does); with an imatrix, ``quantize.imatrix.file`` / ``.dataset`` / ``.entries_count`` /
  ``.chunks_count`` the same way (tools/quantize/quantize.cpp). Values are copied as raw bytes.
- tensors ordered as llama.cpp's model loader keys them (``weight_name_comparer``: layer number, then name;
  non-layer tensors first), dims written as ``ggml_n_dims`` counts them, data aligned to 32 bytes.
- a tensor whose type does not change is copied; a float one is converted row-slab by row-slab to float32 and
  quantized with :func:`quantmix.formats.api.quantize`, per expert for 3-D tensors (each expert its own imatrix
  row). A quantized source tensor (gpt-oss's MXFP4 experts, as the converter keeps them) is copied when the recipe
  keeps its type; another type for it is refused, as llama-quantize refuses it ("requantizing from type ... is
  disabled"), unless ``allow_requantize`` (its ``--allow-requantize``): then it is dequantized to float32 first,
  bit-exactly as ggml's ``to_float``, and quantized from that, as llama-quantize does.

Split output follows llama-gguf-split (tools/gguf-split/gguf-split.cpp): shards ``PREFIX-0000i-of-0000N.gguf``;
shard 1 holds every key-value, each shard has ``split.no`` (u16), ``split.count`` (u16) and
``split.tensors.count`` (i32); a new shard starts when the running sum of padded tensor sizes would exceed
``split_max_size``. Split input is read through any one of its shards.

We write the format ourselves rather than through gguf-py's GGUFWriter: copying key-values as raw bytes keeps
their exact types, and the whole header is known before any data is written (every size follows from the
recipe), so data streams straight to disk, one slab at a time, from the source's memory map.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantmix.calibration.imatrix_io import Imatrix, read_imatrix
from quantmix.formats.ggml_backend import preferred_backend
from quantmix.formats.registry import get_type
from quantmix.formats.staging import SlabFeeder
from quantmix.model.gguf_header import GGUFHeaderError, read_gguf_header
from quantmix.paths import remove_stale_temps
from quantmix.planning.llama_rules import llama_tensor_order
from quantmix.planning.recipe import NOMINAL_FTYPE, RecipeSpec, Resolution, resolve

__all__ = ["GGUFSource", "GGUFWriteError", "open_source", "quantize_gguf", "split_shard_paths", "parse_split_size",
           "needs_imatrix"]

GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
GGML_QNT_VERSION = 2
# Weights per slab converted to float32 and quantized at once: bounds memory (a slab is 64 MiB of float32 on
# CPU) whatever the tensor's size.
SLAB_WEIGHTS = 1 << 24
SLAB_WEIGHTS_GPU = 1 << 26
KV_OVERRIDE_STR_MAX = 127  # llama_model_kv_override.val_str holds 128 bytes, NUL included

_FLOAT_SOURCES = ("F32", "F16", "BF16")
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

# GGUF value type ids (gguf.h)
_U16, _I32, _U32, _STR = 2, 5, 4, 8


class GGUFWriteError(ValueError):
    """The source, recipe or imatrix cannot make this file; the message names the file or tensor."""


# ------------------------------------------------------------------------------------------------ source


@dataclass(frozen=True)
class _SourceTensor:
    name: str
    shape: tuple[int, ...]  # ggml order, ne0 first
    type_name: str
    data: np.ndarray  # uint8 view into the shard's memory map
    shard: Path
    file_offset: int = 0  # where the data starts in the shard

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.data.size)


class _CheckpointTensor:
    """A source tensor read from the Hugging Face checkpoint when it is written (F32, as the converter's F32
    GGUF holds it; an MXFP4 one as the converter repacks the release's blocks), then dropped: the writer never
    needs the float GGUF on disk."""

    def __init__(self, base: _SourceTensor, hf: object) -> None:
        self.name, self.shape, self.shard, self.file_offset = base.name, base.shape, base.shard, base.file_offset
        self.type_name = base.type_name
        self._nbytes = base.nbytes
        self.hf = hf
        self._data: np.ndarray | None = None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            if self.type_name == "MXFP4":
                self._data = self.hf.mxfp4_bytes(self.name)
            else:
                self._data = self.hf.get(self.name).numpy().reshape(-1).view(np.uint8)
        return self._data

    def drop(self) -> None:
        self._data = None


@dataclass
class GGUFSource:
    paths: list[Path]
    kv: dict[str, bytes]  # key -> raw GGUF bytes of the whole key-value (key, type, value), in file order
    tensors: list[_SourceTensor]

    def kv_u32(self, key: str) -> int | None:
        raw = self.kv.get(key)
        if raw is None:
            return None
        klen = struct.unpack_from("<Q", raw, 0)[0]
        vtype = struct.unpack_from("<I", raw, 8 + klen)[0]
        if vtype != _U32:
            return None
        return int(struct.unpack_from("<I", raw, 12 + klen)[0])

    def kv_str(self, key: str) -> str | None:
        raw = self.kv.get(key)
        if raw is None:
            return None
        klen = struct.unpack_from("<Q", raw, 0)[0]
        if struct.unpack_from("<I", raw, 8 + klen)[0] != _STR:
            return None
        n = struct.unpack_from("<Q", raw, 12 + klen)[0]
        return raw[20 + klen:20 + klen + n].decode("utf-8", "replace")


def open_checkpoint_source(model_dir: Path) -> GGUFSource:
    """A Hugging Face directory as a writer's source: the header of its conversion (metadata only, no data on
    disk: :func:`quantmix.model.hf_tensors.converted_metadata`) and its tensors read from the safetensors."""
    from quantmix.model.hf_tensors import HFTensors, converted_metadata

    source = open_source(converted_metadata(model_dir))
    hf = HFTensors(model_dir)
    lazy = []
    for t in source.tensors:
        if t.type_name not in ("F32", "MXFP4"):
            raise GGUFWriteError(f"{model_dir}: tensor {t.name} is {t.type_name} in the conversion; writing it "
                                 f"straight from the directory is not supported: convert the model to a float GGUF "
                                 f"first and quantize that")
        lazy.append(_CheckpointTensor(t, hf))
    source.tensors = lazy
    return source


def open_source(src: Path) -> GGUFSource:
    """The source GGUF (every shard): its key-values as raw bytes, and its tensors as views into memory maps."""
    try:
        header = read_gguf_header(src)
    except GGUFHeaderError as e:
        raise GGUFWriteError(str(e)) from None
    kv = {k: v for k, v in header.raw_fields.items() if k not in _SPLIT_KEYS}
    maps = {p: np.memmap(p, dtype=np.uint8, mode="r") for p in header.paths}
    tensors: list[_SourceTensor] = []
    seen: set[str] = set()
    for t in header.tensors:
        if t.name in seen:
            raise GGUFWriteError(f"{src}: tensor {t.name} appears twice")
        seen.add(t.name)
        lo = header.data_offsets[t.shard] + t.offset
        tensors.append(_SourceTensor(t.name, t.shape, t.type_name, maps[t.shard][lo:lo + t.n_bytes], t.shard, lo))
    return GGUFSource(header.paths, kv, tensors)


# ------------------------------------------------------------------------------------------------ planning


def needs_imatrix(name: str, qtype: str, ftype: str | None) -> bool:
    """llama-quantize's tensor_requires_imatrix: types flagged in the registry (Q2_K only in a Q2_K_S file),
    never token_embd / per_layer_token_embd / output."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    t = get_type(qtype)
    return bool(t.llama_quantize_requires_imatrix) or (t.name == "Q2_K" and (ftype or "").upper() == "Q2_K_S")


@dataclass(frozen=True)
class _Planned:
    src: _SourceTensor
    qtype: str
    imatrix: np.ndarray | None  # float32 [n_mat, ne0] when quantized with one

    @property
    def copy(self) -> bool:
        return self.qtype == self.src.type_name

    @property
    def n_bytes(self) -> int:
        return self.src.nbytes if self.copy else int(get_type(self.qtype).tensor_bytes(self.src.shape))


def _plan(source: GGUFSource, resolution: Resolution, imatrix: Imatrix | None, ftype: str | None,
          allow_requantize: bool = False) -> list[_Planned]:
    from quantmix.formats.api import UnsupportedTypeError, numerics

    by_src = {t.name: t for t in source.tensors}
    by_res = {a.tensor.name: a for a in resolution.assignments}
    extra = sorted(set(by_res) - set(by_src))
    if extra:
        raise GGUFWriteError(f"{source.paths[0]}: the recipe types tensor {extra[0]}, which the GGUF does not have"
                             f" ({len(extra)} such tensors)")
    missing = sorted(set(by_src) - set(by_res))
    if missing:
        raise GGUFWriteError(f"{source.paths[0]}: the resolved recipe has no type for tensor {missing[0]}"
                             f" ({len(missing)} such tensors): resolve it against this GGUF's catalog")
    plan = []
    no_data: list[str] = []
    for name in llama_tensor_order(list(by_src)):
        st, a = by_src[name], by_res[name]
        if tuple(a.tensor.shape) != st.shape:
            raise GGUFWriteError(f"{source.paths[0]}: tensor {name} has shape {list(st.shape)}, the recipe's catalog "
                                 f"says {list(a.tensor.shape)}")
        qtype = st.type_name if a.reason.startswith("not quantized") else get_type(a.qtype).name
        w = None
        if qtype != st.type_name:
            if st.type_name not in _FLOAT_SOURCES and not allow_requantize:
                raise GGUFWriteError(f"{st.shard}: tensor {name} is stored as {st.type_name} and the recipe asks for "
                                     f"{qtype}: requantizing is disabled, as in llama-quantize (\"requantizing from "
                                     f"type {st.type_name.lower()} is disabled\"); keep it {st.type_name} in the recipe, "
                                     f"or pass allow_requantize (llama-quantize's --allow-requantize)")
            if st.type_name not in _FLOAT_SOURCES:
                try:
                    numerics(st.type_name)
                except UnsupportedTypeError as e:
                    raise GGUFWriteError(f"tensor {name}: cannot dequantize its {st.type_name} data ({e})") from None
            if not get_type(qtype).fits_row(st.shape[0]):
                raise GGUFWriteError(f"tensor {name}: rows of {st.shape[0]} do not fit {qtype}'s block of "
                                     f"{get_type(qtype).block_size}")
            if imatrix is not None:
                try:
                    w = imatrix.weights_for(name, st.shape)
                except ValueError as e:
                    raise GGUFWriteError(str(e)) from None
            if w is None and imatrix is not None and name != "token_embd.weight":
                no_data.append(name)
            if w is None and needs_imatrix(name, qtype, ftype):
                why = "no imatrix was given" if imatrix is None else f"{imatrix.path} has no entry for it"
                raise GGUFWriteError(f"tensor {name}: type {qtype} needs an importance matrix (imatrix) and {why}; "
                                     f"llama-quantize refuses this too (pass --imatrix, or pick another type)")
            numerics(qtype)  # UnsupportedTypeError now, before anything is written
        plan.append(_Planned(st, qtype, w))
    if no_data:  # llama-quantize names each: "did not find weights for ..."
        shown = ", ".join(no_data[:12]) + (f" and {len(no_data) - 12} more" if len(no_data) > 12 else "")
        _warn(f"the imatrix {imatrix.path} has no data for {len(no_data)} of the tensors being quantized, which "
              f"are quantized without one: {shown}")
    return plan


def _known_arches() -> set[str]:
    import gguf

    return set(gguf.MODEL_ARCH_NAMES.values())


def _warn(msg: str) -> None:
    import sys

    print(f"quantmix quantize: warning: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ encoding


def _kv_key(key: str) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k


def _kv_u32(key: str, v: int) -> bytes:
    return _kv_key(key) + struct.pack("<II", _U32, v)


def _kv_u16(key: str, v: int) -> bytes:
    return _kv_key(key) + struct.pack("<IH", _U16, v)


def _kv_i32(key: str, v: int) -> bytes:
    return _kv_key(key) + struct.pack("<Ii", _I32, v)


def _kv_str(key: str, v: bytes) -> bytes:
    return _kv_key(key) + struct.pack("<IQ", _STR, len(v)) + v


def _set(kv: dict[str, bytes], key: str, raw: bytes) -> None:
    """gguf_set_val_*: remove the key wherever it is, append it at the end."""
    kv.pop(key, None)
    kv[key] = raw


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of 1 are not written."""
    for i in range(len(shape) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


def _header(kv: dict[str, bytes], tensors: list[_Planned], align: int) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv)), *kv.values()]
    offset = 0
    for p in tensors:
        shape = p.src.shape[:_n_dims(p.src.shape)]
        out.append(_kv_key(p.src.name))
        out.append(struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape))
        out.append(struct.pack("<IQ", get_type(p.qtype).type_id, offset))
        offset += _pad(p.n_bytes, align)
    head = b"".join(out)
    return head + b"\0" * (_pad(len(head), align) - len(head))


def _output_kv(source: GGUFSource, resolution: Resolution, imatrix: Imatrix | None,
               imatrix_label: str | None) -> dict[str, bytes]:
    from quantmix.planning.llama_rules import ftype_id

    kv = dict(source.kv)
    spec = resolution.spec
    _set(kv, "general.quantization_version", _kv_u32("general.quantization_version", GGML_QNT_VERSION))
    if spec.keep_source or (spec.ftype or "").upper() == "COPY":
        old = source.kv_u32("general.file_type")
        if old is not None:
            _set(kv, "general.file_type", _kv_u32("general.file_type", old))
    else:
        _set(kv, "general.file_type", _kv_u32("general.file_type", ftype_id(spec.ftype or NOMINAL_FTYPE)))
    if imatrix is not None and len(imatrix):
        label = (imatrix_label if imatrix_label is not None else str(imatrix.path)).encode()
        _set(kv, "quantize.imatrix.file", _kv_str("quantize.imatrix.file", label[:KV_OVERRIDE_STR_MAX]))
        if imatrix.datasets:
            ds = imatrix.datasets[0].encode()[:KV_OVERRIDE_STR_MAX]
            _set(kv, "quantize.imatrix.dataset", _kv_str("quantize.imatrix.dataset", ds))
        _set(kv, "quantize.imatrix.entries_count", _kv_u32("quantize.imatrix.entries_count", len(imatrix)))
        if imatrix.chunk_count > 0:
            _set(kv, "quantize.imatrix.chunks_count", _kv_u32("quantize.imatrix.chunks_count", imatrix.chunk_count))
    return kv


# ------------------------------------------------------------------------------------------------ splitting


def split_shard_paths(out: Path, n_split: int) -> list[Path]:
    """llama_split_path: ``PREFIX-00001-of-0000N.gguf`` where PREFIX is ``out`` without ``.gguf``."""
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return [out.with_name(f"{stem}-{i:05d}-of-{n_split:05d}.gguf") for i in range(1, n_split + 1)]


def parse_split_size(text: str) -> int:
    """llama-gguf-split's ``--split-max-size``: ``N`` followed by M (10^6 bytes) or G (10^9 bytes); a plain
    number is bytes."""
    t = str(text).strip()
    unit = {"M": 10**6, "G": 10**9}.get(t[-1:].upper(), 1)
    digits = t[:-1] if unit > 1 else t
    if not digits.isdigit() or int(digits) <= 0:
        raise GGUFWriteError(f"split size {text!r}: expected a positive number followed by M or G (e.g. 45G)")
    return int(digits) * unit


def _split(plan: list[_Planned], max_bytes: int, align: int) -> list[list[_Planned]]:
    """gguf-split's size strategy: a new shard when the running padded tensor size would exceed the limit
    (a shard always gets at least one tensor)."""
    shards: list[list[_Planned]] = [[]]
    cur = 0
    for p in plan:
        n = _pad(p.n_bytes, align)
        if shards[-1] and cur + n > max_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(p)
        cur += n
    return shards


# ------------------------------------------------------------------------------------------------ data


def _to_f32(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Raw little-endian bytes of a tensor slab -> flat float32: exact for F16 and BF16; a quantized slab (whole
    blocks) is dequantized bit-exactly as ggml's to_float, which is what llama-quantize requantizes from."""
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32)  # copy: the map is read-only
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    from quantmix.formats.api import dequantize

    t = get_type(type_name)  # blocks are independent: dequantize them as rows of one block each
    return dequantize(torch.from_numpy(np.array(raw)), t, t.block_size).numpy().reshape(-1)


def _write_tensor(fh, p: _Planned, device: torch.device, on_weights: Callable[[int], None],
                  feeder: SlabFeeder) -> int:
    """Write one tensor's data (unpadded); returns the bytes written. The source slabs come as float32 through
    ``feeder`` (the error table's conversion; on CUDA raw through pinned buffers, converted on the device)."""
    from quantmix.formats.api import quantize

    st = p.src
    if p.copy:
        tb = get_type(st.type_name).type_size
        step = max(1, (1 << 26) // tb) * tb  # whole blocks, so each part can be validated on its own
        for o in range(0, st.data.size, step):
            part = st.data[o:o + step]
            _check_finite(st.name, st.type_name, part, "has invalid data (inf or NaN) in its source")
            fh.write(memoryview(part))
        on_weights(st.n_elements)
        n = int(st.data.size)
        if isinstance(st, _CheckpointTensor):
            st.drop()
        return n
    ne0 = st.shape[0]
    rows_per_mat = int(np.prod(st.shape[1:2], dtype=np.int64)) if len(st.shape) > 1 else 1
    n_rows = st.n_elements // ne0
    n_mat = n_rows // rows_per_mat
    src_rb = st.data.size // n_rows
    slab = SLAB_WEIGHTS if device.type == "cpu" else SLAB_WEIGHTS_GPU
    step = max(1, slab // ne0)
    written = 0
    backend = preferred_backend(p.qtype, device)  # ggml's C on a CPU where it is faster: same bytes
    parts = [(e, r0, min(rows_per_mat, r0 + step)) for e in range(n_mat) for r0 in range(0, rows_per_mat, step)]
    raws = [st.data[(e * rows_per_mat + r0) * src_rb:(e * rows_per_mat + r1) * src_rb] for e, r0, r1 in parts]
    im, im_of = None, -1  # the imatrix row on the device, and which matrix (expert) it is for
    for (e, r0, r1), x in zip(parts, feeder.slabs(raws, st.type_name, ne0)):
        if p.imatrix is not None and (k := e if p.imatrix.shape[0] > 1 else 0) != im_of:
            im, im_of = torch.from_numpy(p.imatrix[k].copy()).to(device), k
        q = quantize(x, p.qtype, im, name=st.name, backend=backend)
        qb = q.cpu().numpy()  # (a non-finite source is refused by quantize itself)
        _check_finite(st.name, p.qtype, qb, lambda x=x: _overflow_hint(p.qtype, x))
        b = qb.tobytes()
        fh.write(b)
        written += len(b)
        on_weights((r1 - r0) * ne0)
    if isinstance(st, _CheckpointTensor):
        st.drop()
    return written


def _overflow_hint(qtype: str, x: torch.Tensor) -> str:
    big = float(x.abs().max()) if x.numel() else 0.0
    what = "F16's range" if qtype == "F16" else "the type's f16 block scale"
    return (f"cannot be stored as {qtype}: its largest magnitude {big:.3g} overflows {what}, so it would "
            f"dequantize to inf / NaN (llama-quantize: 'quantized data validation failed'); keep it in F32 or "
            f"BF16 (--pin 'NAME=BF16')")


def _check_finite(name: str, type_name: str, data: np.ndarray, why: str | Callable[[], str]) -> None:
    """Refuse what llama.cpp would refuse to load: blocks whose values or scales are inf / NaN (ggml's own
    ``ggml_validate_row_data`` where ggml's library is built, else a dequantize-and-look, same verdict)."""
    from quantmix.formats.ggml_backend import built

    t = get_type(type_name)
    if built() and t.type_id is not None and not t.ik_only:
        from quantmix.tools.ggml_oracle import oracle_validate

        ok = oracle_validate(data, t)
    else:
        ok = bool(np.isfinite(_to_f32(np.asarray(data).view(np.uint8).reshape(-1), type_name)).all())
    if not ok:
        raise GGUFWriteError(f"tensor {name} {why if isinstance(why, str) else why()}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------------------------ public


_RESUME_FORMAT = 1


def _resume_key(model_dir: Path | None, source: GGUFSource, im: Imatrix | None, headers: list[bytes],
                dev: torch.device, allow_requantize: bool) -> str:
    """Every input of the bytes written: the source (each of its files' version: path, size, inode, times, first
    64 KiB; any write changes it, and no byte beyond the head is read for it), the imatrix's content, every
    header (types, shapes, offsets, key-values), the numerics and where they ran."""
    import hashlib
    import json

    from quantmix.calibration.imatrix_io import imatrix_bytes
    from quantmix.formats.api import NUMERICS_VERSION
    from quantmix.model.fingerprint import file_version

    files = sorted(f for f in model_dir.iterdir() if f.is_file()) if model_dir is not None else source.paths
    ident = [file_version(f) for f in files]  # not a full hash: that would read a 1.4 TB source once more
    h = hashlib.sha256(json.dumps([_RESUME_FORMAT, ident, NUMERICS_VERSION, dev.type, allow_requantize]).encode())
    h.update(hashlib.sha256(imatrix_bytes(im)).digest() if im is not None else b"no imatrix")
    for head in headers:
        h.update(hashlib.sha256(head).digest())
    return h.hexdigest()


def _load_resume(state_path: Path, key: str, partials: list[Path], headers: list[bytes],
                 shards: list[list[_Planned]], align: int) -> dict | None:
    """The saved progress when it is of these inputs and the partial files hold what it says, else None."""
    import json

    try:
        st = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(st, dict) or st.get("key") != key:
        return None
    k, done, offset = st.get("shard"), st.get("tensors"), st.get("offset")
    if not all(isinstance(v, int) for v in (k, done, offset)) or not 0 <= k <= len(shards):
        return None

    def size(i: int, n: int) -> int:
        return len(headers[i]) + sum(_pad(p.n_bytes, align) for p in shards[i][:n])

    for i in range(min(k, len(shards))):
        if not partials[i].is_file() or partials[i].stat().st_size != size(i, len(shards[i])):
            return None
    if k < len(shards) and done > 0:  # within shard k (done = 0: it starts afresh)
        if not 0 < done <= len(shards[k]) or offset != size(k, done) or not partials[k].is_file() \
                or partials[k].stat().st_size < offset:
            return None
    return st


def _save_resume(fh, state_path: Path, key: str, shard: int, tensors: int) -> None:  # noqa: ANN001
    import json

    from quantmix.planning.recipe import atomic_write_text

    fh.flush()
    os.fsync(fh.fileno())  # the data the state vouches for is on disk before the state is
    atomic_write_text(state_path, json.dumps({"key": key, "shard": shard, "tensors": tensors,
                                              "offset": fh.tell() if tensors else 0}) + "\n")


def _check_space(out: Path, need: int, have_written: int) -> None:
    """Refuse before writing a byte when the output cannot fit the free space (a full disk hours in)."""
    import shutil

    free = shutil.disk_usage(out.parent).free + have_written
    if need > free:
        raise GGUFWriteError(f"{out}: the output takes {need / 2**30:.2f} GiB, {out.parent} has "
                             f"{free / 2**30:.2f} GiB free")


def _lock(fh, out: Path) -> None:  # noqa: ANN001
    import fcntl

    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise GGUFWriteError(f"{out}: another process is writing it now") from None


def quantize_gguf(
    src: str | Path,
    recipe: RecipeSpec | Resolution,
    out: str | Path,
    imatrix: str | Path | Imatrix | None = None,
    split_max_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    imatrix_label: str | None = None,
    on_tensor: Callable[[int, str], None] | None = None,
    allow_requantize: bool = False,
    save_every_s: float = 60.0,
) -> Path:
    """Quantize the float GGUF ``src`` (any shard of a split one), or a Hugging Face directory read straight
    from its safetensors (no float GGUF written: the same bytes), to ``out`` following ``recipe``.

    ``recipe``: a RecipeSpec (resolved here against ``src``'s catalog) or a Resolution made by
    :func:`quantmix.planning.recipe.resolve`. ``imatrix``: a llama.cpp imatrix file (GGUF or legacy .dat) or a
    loaded :class:`Imatrix`; ``imatrix_label`` is what ``quantize.imatrix.file`` records (default: its path).
    ``split_max_size``: bytes of tensor data per shard; the output is then llama-gguf-split's shards and the
    first one is returned. ``device``: where the quantizers run (default: CUDA when present).
    ``on_tensor(i, name)`` is called before tensor i is written. ``allow_requantize``: as llama-quantize's
    ``--allow-requantize``, a quantized source tensor (MXFP4 experts) given another type is dequantized and
    quantized again; without it that is an error naming the tensor (a tensor kept in its type is always copied).

    Everything is checked (types, imatrix needs, shapes) before a byte is written; the file is written to
    ``.OUT.partial`` next to ``out`` and renamed when complete, so no half-written file is ever at ``out``.
    Resumable: at most every ``save_every_s`` seconds (after a tensor, data synced first) the progress is saved in
    ``.OUT.partial.json`` under a key of every input (source files, imatrix, header, numerics, device type); after
    an interrupt or kill -9 the same call continues after the last saved tensor and gives the bytes of an
    uninterrupted run. An interrupt before anything was saved, or an error, leaves nothing behind.
    """
    from quantmix.model.catalog import catalog_from_gguf

    src, out = Path(src), Path(out)
    model_dir = src if src.is_dir() else None
    source = open_checkpoint_source(src) if src.is_dir() else open_source(src)
    if src.is_dir():
        src = source.paths[0]  # the conversion's header: the catalog and the messages name it
    if any(out.resolve() == p.resolve() for p in source.paths):
        raise GGUFWriteError(f"{out}: the output would overwrite its own source")
    im = read_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    if isinstance(recipe, Resolution):
        resolution = recipe
    elif isinstance(recipe, RecipeSpec):
        resolution = resolve(catalog_from_gguf(src), recipe, imatrix_present=im is not None)
    else:
        raise TypeError(f"recipe: expected a RecipeSpec or Resolution, got {type(recipe).__name__}")
    ftype = resolution.spec.ftype
    arch = source.kv_str("general.architecture")
    if arch is not None and arch not in _known_arches():
        _warn(f"{source.paths[0]}: general.architecture {arch!r} is not one llama.cpp's gguf-py knows: the file "
              f"is written, but llama.cpp may not load it")
    plan = _plan(source, resolution, im, ftype, allow_requantize)
    kv = _output_kv(source, resolution, im, imatrix_label)
    align = source.kv_u32("general.alignment") or DEFAULT_ALIGNMENT
    if align & (align - 1):
        raise GGUFWriteError(f"{source.paths[0]}: general.alignment {align} is not a power of 2")

    if split_max_size is None:
        shards, paths = [plan], [out]
        headers = [_header(kv, plan, align)]
    else:
        if split_max_size <= 0:
            raise GGUFWriteError(f"split_max_size must be positive, got {split_max_size}")
        shards = _split(plan, split_max_size, align)
        paths = split_shard_paths(out, len(shards))
        headers = []
        for i, sh in enumerate(shards):
            skv = dict(kv) if i == 0 else {}
            _set(skv, "split.no", _kv_u16("split.no", i))
            _set(skv, "split.count", _kv_u16("split.count", len(shards)))
            _set(skv, "split.tensors.count", _kv_i32("split.tensors.count", len(plan)))
            headers.append(_header(skv, sh, align))

    dev = _default_device(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # the temporaries of earlier versions' killed writers
    key = _resume_key(model_dir, source, im, headers, dev, allow_requantize)
    partials = [pt.parent / f".{pt.name}.partial" for pt in paths]
    state_path = paths[0].parent / f".{paths[0].name}.partial.json"
    state = _load_resume(state_path, key, partials, headers, shards, align)
    _check_space(out, sum(len(h) for h in headers) + sum(_pad(p.n_bytes, align) for p in plan),
                 sum(pt.stat().st_size for pt in partials if pt.is_file()) if state is not None else 0)
    total = sum(p.src.n_elements for p in plan)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="w", unit_scale=True, desc=out.name, disable=not progress, leave=False)
    feeder = SlabFeeder(dev)
    saved = state is not None
    if state is not None and progress:
        _warn(f"{out}: resuming after {sum(len(sh) for sh in shards[:state['shard']]) + state['tensors']} of "
              f"{len(plan)} tensors (.{out.name}.partial)")
    try:
        i_tensor = 0
        last_save = time.monotonic()
        for si, (path, head, sh, part) in enumerate(zip(paths, headers, shards, partials)):
            if state is not None and si < state["shard"]:  # a finished shard
                i_tensor += len(sh)
                bar.update(sum(p.src.n_elements for p in sh))
                continue
            resume = state is not None and si == state["shard"] and state["tensors"] > 0
            with open(part, "r+b" if resume else "wb") as fh:
                _lock(fh, out)
                if resume:
                    fh.truncate(state["offset"])
                    fh.seek(state["offset"])
                    done = state["tensors"]
                    i_tensor += done
                    bar.update(sum(p.src.n_elements for p in sh[:done]))
                else:
                    os.chmod(part, 0o666 & ~_umask())
                    fh.write(head)
                    done = 0
                for j in range(done, len(sh)):
                    p = sh[j]
                    if on_tensor is not None:
                        on_tensor(i_tensor, p.src.name)
                    bar.set_postfix_str(p.src.name, refresh=False)
                    n = _write_tensor(fh, p, dev, bar.update, feeder)
                    if n != p.n_bytes:
                        raise RuntimeError(f"tensor {p.src.name}: wrote {n} bytes, expected {p.n_bytes}")
                    fh.write(b"\0" * (_pad(n, align) - n))
                    i_tensor += 1
                    if time.monotonic() - last_save >= save_every_s and j + 1 < len(sh):
                        _save_resume(fh, state_path, key, si, j + 1)
                        saved, last_save = True, time.monotonic()
                _save_resume(fh, state_path, key, si + 1, 0)  # the shard is complete (synced)
                saved = True
        for part, path in zip(partials, paths):
            os.replace(part, path)
        state_path.unlink(missing_ok=True)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and saved:
            _warn(f"{out}: interrupted; the tensors written so far are kept in .{out.name}.partial: the same "
                  f"command continues from them")
        else:
            for part in partials:
                part.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
        raise
    finally:
        feeder.close()
        bar.close()
    return paths[0]
