"""Read a GGUF's header (metadata and tensor infos) without loading tensor data; split shards included."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from quantmix.formats.registry import UnknownTypeError, type_from_id

_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


class GGUFHeaderError(ValueError):
    """A GGUF file is missing, truncated or malformed; the message names the file."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order, ne0 first
    type_name: str
    n_bytes: int
    shard: Path


@dataclass
class GGUFHeader:
    """What quantmix needs from a GGUF: its key-values, tensor infos and file sizes."""

    paths: list[Path]
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[GGUFTensor] = field(default_factory=list)
    file_bytes: int = 0

    @property
    def arch(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def get(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped key: ``get("block_count")`` reads ``{arch}.block_count``."""
        return self.fields.get(f"{self.arch}.{key}", self.fields.get(key, default))

    def hparams(self) -> "ModelHParams":
        from quantmix.model.catalog import ModelHParams

        n_head = int(self.get("attention.head_count", 0) or 0)
        n_embd = int(self.get("embedding_length", 0) or 0)
        head_k = int(self.get("attention.key_length", 0) or (n_embd // n_head if n_head else 0))
        vocab = int(self.get("vocab_size", 0) or len(self.fields.get("tokenizer.ggml.tokens", []) or []))
        return ModelHParams(
            arch=self.arch,
            n_layer=int(self.get("block_count", 0) or 0),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(self.get("attention.head_count_kv", n_head) or n_head),
            head_dim_k=head_k,
            head_dim_v=int(self.get("attention.value_length", 0) or head_k),
            n_expert=int(self.get("expert_count", 0) or 0),
            n_expert_used=int(self.get("expert_used_count", 0) or 0),
            n_nextn=int(self.get("nextn_predict_layers", 0) or 0),
            vocab_size=vocab,
            n_ctx_train=int(self.get("context_length", 0) or 0),
            kv_lora_rank=int(self.get("attention.kv_lora_rank", 0) or 0),
            rope_dim_mla=int(self.get("rope.dimension_count", 0) or 0) if self.get("attention.kv_lora_rank") else 0,
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


def _field_value(f: Any) -> Any:
    try:
        return f.contents()
    except Exception:  # pragma: no cover - exotic field types
        return None


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read metadata and tensor infos of a GGUF (all shards). Tensor data is not read."""
    if not path.exists():
        raise GGUFHeaderError(f"{path}: no such file")
    header = GGUFHeader(paths=shard_paths(path))
    for shard in header.paths:
        try:
            reader = gguf.GGUFReader(str(shard), "r")
        except Exception as e:
            raise GGUFHeaderError(f"{shard}: not a readable GGUF file ({e})") from None
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or (key in header.fields and shard != header.paths[0]):
                continue
            header.fields[key] = _field_value(f)
        for t in reader.tensors:
            try:
                type_name = type_from_id(int(t.tensor_type)).name
            except UnknownTypeError:
                raise GGUFHeaderError(f"{shard}: tensor {t.name} has unknown ggml type id {int(t.tensor_type)}") from None
            header.tensors.append(
                GGUFTensor(t.name, tuple(int(x) for x in t.shape), type_name, int(t.n_bytes), shard)
            )
        header.file_bytes += shard.stat().st_size
    return header
