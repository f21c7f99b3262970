"""Read a GGUF's header (metadata and tensor infos) without touching tensor data; split shards included.

A small parser of its own: gguf.GGUFReader builds numpy views of every field, which takes seconds on a
49k-token vocabulary; this reads the header in milliseconds. String arrays (the vocabulary) are skipped and
stand as :class:`SkippedArray` with their length.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from quantmix.formats.registry import UnknownTypeError, type_from_id

if TYPE_CHECKING:
    from quantmix.model.catalog import ModelHParams

GGUF_MAGIC = 0x46554747
_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """A GGUF file is missing, truncated or malformed; the message names the file."""


@dataclass(frozen=True)
class SkippedArray:
    """A string array not kept in memory (the vocabulary); only its length is known."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order, ne0 first
    type_name: str
    n_bytes: int
    shard: Path
    offset: int  # from the shard's data section start

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFHeader:
    """What quantmix needs from a GGUF: its key-values, tensor infos and file sizes (all shards)."""

    paths: list[Path]
    fields: dict[str, Any] = field(default_factory=dict)
    raw_fields: dict[str, bytes] = field(default_factory=dict)  # first shard: each key-value's bytes, in order
    tensors: list[GGUFTensor] = field(default_factory=list)
    data_offsets: dict[Path, int] = field(default_factory=dict)
    file_bytes: int = 0

    @property
    def arch(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    @property
    def data_offset(self) -> int:
        """Where tensor data starts in the first shard."""
        return self.data_offsets[self.paths[0]]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def get(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped key: ``get("block_count")`` reads ``{arch}.block_count``."""
        return self.fields.get(f"{self.arch}.{key}", self.fields.get(key, default))

    def hparams(self) -> ModelHParams:
        from quantmix.model.catalog import ModelHParams

        def first(v: Any) -> int:  # per-layer arrays: layer 0
            return int(v[0] if isinstance(v, list) else v or 0)

        n_head = first(self.get("attention.head_count", 0))
        n_embd = first(self.get("embedding_length", 0))
        head_k = first(self.get("attention.key_length", 0)) or (n_embd // n_head if n_head else 0)
        vocab = first(self.get("vocab_size", 0)) or len(self.fields.get("tokenizer.ggml.tokens") or [])
        kv_lora = first(self.get("attention.kv_lora_rank", 0))
        return ModelHParams(
            arch=self.arch,
            n_layer=first(self.get("block_count", 0)),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=first(self.get("attention.head_count_kv", n_head)),
            head_dim_k=head_k,
            head_dim_v=first(self.get("attention.value_length", 0)) or head_k,
            n_expert=first(self.get("expert_count", 0)),
            n_expert_used=first(self.get("expert_used_count", 0)),
            n_nextn=first(self.get("nextn_predict_layers", 0)),
            vocab_size=vocab,
            n_ctx_train=first(self.get("context_length", 0)),
            kv_lora_rank=kv_lora,
            rope_dim_mla=first(self.get("rope.dimension_count", 0)) if kv_lora else 0,
        )


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split GGUF given any one of them (gguf-split naming), or just the file."""
    m = _SHARD_RE.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise GGUFHeaderError(f"{path}: split GGUF is missing shard(s): {', '.join(p.name for p in missing)}")
    return paths


class _Cursor:
    """Buffered little-endian reads from the start of a file."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self.fh, self.path, self.buf, self.pos = fh, path, b"", 0
        self.size = path.stat().st_size

    def _need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise GGUFHeaderError(f"{self.path}: truncated or corrupt GGUF header (at byte {self.pos})")
        while self.pos + n > len(self.buf):
            more = self.fh.read(max(1 << 20, n))
            if not more:
                raise GGUFHeaderError(f"{self.path}: truncated GGUF header (at byte {self.pos})")
            self.buf += more

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        self._need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS:
                size = struct.calcsize(_SCALARS[itype])
                self._need(size * n)
                vals = list(struct.unpack_from(f"<{n}{_SCALARS[itype][1]}", self.buf, self.pos))
                self.pos += size * n
                return vals
            for _ in range(n):  # strings, arrays of arrays: walk them, keep their count
                if itype == _STRING:
                    k = self.unpack("<Q")
                    self._need(k)
                    self.pos += k
                else:
                    self.value(itype)
            return SkippedArray(n)
        raise GGUFHeaderError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def _parse(path: Path) -> tuple[dict[str, Any], dict[str, bytes], list[tuple[str, tuple[int, ...], int, int]], int]:
    """One GGUF file: key-values (decoded, and as raw bytes for copying), tensor infos (name, shape, ggml type
    id, offset) and the data offset."""
    with open(path, "rb") as fh:
        c = _Cursor(fh, path)
        if c.unpack("<I") != GGUF_MAGIC:
            raise GGUFHeaderError(f"{path}: not a GGUF file (bad magic)")
        version = c.unpack("<I")
        if version not in (2, 3):
            raise GGUFHeaderError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        kv, raw = {}, {}
        for _ in range(n_kv):
            start = c.pos
            key = c.string()
            kv[key] = c.value(c.unpack("<I"))
            raw[key] = bytes(c.buf[start:c.pos])
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            nd = c.unpack("<I")
            if not 1 <= nd <= 4:
                raise GGUFHeaderError(f"{path}: tensor {name} has {nd} dimensions")
            shape = tuple(c.unpack("<Q") for _ in range(nd))
            tensors.append((name, shape, c.unpack("<I"), c.unpack("<Q")))
        align = int(kv.get("general.alignment") or 32)
        if align <= 0 or align & (align - 1):
            raise GGUFHeaderError(f"{path}: general.alignment {align} is not a power of 2")
        return kv, raw, tensors, -(-c.pos // align) * align


def read_gguf_header(path: str | Path, *, all_shards: bool = True) -> GGUFHeader:
    """Read metadata and tensor infos of a GGUF (all shards of a split one, unless ``all_shards=False``).
    Tensor data is not read."""
    path = Path(path)
    if not path.is_file():
        raise GGUFHeaderError(f"{path}: no such file")
    header = GGUFHeader(paths=shard_paths(path) if all_shards else [path])
    for shard in header.paths:
        kv, raw, tensors, data_offset = _parse(shard)
        if shard == header.paths[0]:
            header.raw_fields = raw
        for key, value in kv.items():
            header.fields.setdefault(key, value)
        header.data_offsets[shard] = data_offset
        for name, shape, type_id, offset in tensors:
            try:
                qtype = type_from_id(type_id)
            except UnknownTypeError:
                raise GGUFHeaderError(f"{shard}: tensor {name} has unknown ggml type id {type_id}") from None
            try:
                n_bytes = qtype.tensor_bytes(shape)
            except ValueError as e:
                raise GGUFHeaderError(f"{shard}: tensor {name}: {e}") from None
            header.tensors.append(GGUFTensor(name, shape, qtype.name, n_bytes, shard, offset))
        # as gguf.cpp checks on load: tensors are laid out in header order, each at the previous one's end
        # padded to the alignment (a shape edited in the header no longer lines up with the data)
        align = int(kv.get("general.alignment") or 32)
        expected = 0
        for t in header.tensors[len(header.tensors) - len(tensors):]:
            if t.offset != expected:
                raise GGUFHeaderError(f"{shard}: tensor {t.name} has offset {t.offset}, expected {expected}: the "
                                      f"header does not match the data layout (corrupt or edited file)")
            expected += -(-t.n_bytes // align) * align
        size = shard.stat().st_size
        last = max((data_offset + t[3] + header.tensors[-len(tensors) + i].n_bytes
                    for i, t in enumerate(tensors)), default=0)
        if last > size:
            raise GGUFHeaderError(f"{shard}: tensor data runs past the end of the file (truncated download?)")
        header.file_bytes += size
    return header
