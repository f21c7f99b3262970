"""The registry of GGML tensor types: one small class per type, as in gguf-py's quants.py.

Every size in quantmix comes from here. A type knows its block size (elements per block), its bytes per
block, and any per-row metadata bytes (ik_llama.cpp's *_KS / *_KT types store a row scale). The numerics
(quantize / dequantize) are attached to the same classes by the modules of ``quantmix.formats`` that
implement them; a type without numerics can still be costed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

QK_K = 256

# Quantized types a source GGUF holds from the release itself (gpt-oss's MXFP4 experts, which llama.cpp's converter
# keeps as they are): measured from their dequantized values, and kept in that type by the planner.
RELEASE_QUANT_TYPES = ("MXFP4",)


class UnknownTypeError(ValueError):
    """Raised for a type name that is not a GGML type quantmix knows."""


class GGMLType:
    """Base class of a GGML tensor type. Subclasses set the class attributes; instances are not needed."""

    name: ClassVar[str]
    type_id: ClassVar[int | None]  # ggml_type enum value (None where unknown)
    block_size: ClassVar[int]  # elements per block
    type_size: ClassVar[int]  # bytes per block
    row_meta_size: ClassVar[int] = 0  # bytes stored once per row (ik_llama.cpp types)
    ik_only: ClassVar[bool] = False  # exists only in ik_llama.cpp
    is_float: ClassVar[bool] = False
    # ggml_quantize_chunk refuses to run without an importance matrix
    requires_imatrix: ClassVar[bool] = False
    # llama-quantize refuses these without an imatrix (except token_embd and output)
    llama_quantize_requires_imatrix: ClassVar[bool] = False

    @classmethod
    def bits_per_weight(cls) -> float:
        """Bits per weight of the block payload (row metadata excluded)."""
        return 8.0 * cls.type_size / cls.block_size

    @classmethod
    def fits_row(cls, n_per_row: int) -> bool:
        """True when the type's block divides a row of this length."""
        return n_per_row % cls.block_size == 0

    @classmethod
    def row_bytes(cls, n_per_row: int) -> int:
        """Bytes of one row, as ggml_row_size computes them. Raises if the block does not divide the row."""
        if n_per_row % cls.block_size != 0:
            raise ValueError(
                f"{cls.name}: row length {n_per_row} is not a multiple of its block size {cls.block_size}"
            )
        return cls.row_meta_size + cls.type_size * (n_per_row // cls.block_size)

    @classmethod
    def tensor_bytes(cls, shape: tuple[int, ...] | list[int]) -> int:
        """Bytes of a tensor of GGUF shape ``(ne0, ne1, ...)``: ne0 is the row length."""
        rows = 1
        for n in shape[1:]:
            rows *= int(n)
        return rows * cls.row_bytes(int(shape[0]))


_REGISTRY: dict[str, type[GGMLType]] = {}
_BY_ID: dict[int, type[GGMLType]] = {}


def register(cls: type[GGMLType]) -> type[GGMLType]:
    """Class decorator: add a type to the registry under its upper-case name and id."""
    key = cls.name.upper()
    if key in _REGISTRY:
        raise RuntimeError(f"GGML type {key} registered twice")
    _REGISTRY[key] = cls
    if cls.type_id is not None and not cls.ik_only:
        _BY_ID[cls.type_id] = cls
    return cls


def get_type(name: str | type[GGMLType]) -> type[GGMLType]:
    """Look a type up by name, case-insensitively (``"q4_k"`` -> Q4_K)."""
    if isinstance(name, type) and issubclass(name, GGMLType):
        return name
    key = str(name).strip().upper()
    try:
        return _REGISTRY[key]
    except KeyError:
        raise UnknownTypeError(
            f"unknown GGML type {name!r}; known types: {', '.join(sorted(_REGISTRY))}"
        ) from None


def type_from_id(type_id: int) -> type[GGMLType]:
    """Look a mainline type up by its ggml_type enum value (as stored in GGUF tensor infos)."""
    try:
        return _BY_ID[int(type_id)]
    except KeyError:
        raise UnknownTypeError(f"unknown ggml_type id {type_id}") from None


def all_types(*, include_ik: bool = True) -> list[type[GGMLType]]:
    """Every registered type, mainline first in enum order."""
    types = sorted(_REGISTRY.values(), key=lambda t: (t.ik_only, t.type_id if t.type_id is not None else 999))
    return [t for t in types if include_ik or not t.ik_only]


def _define(name: str, type_id: int | None, block_size: int, type_size: int, **attrs: object) -> type[GGMLType]:
    body = {"name": name, "type_id": type_id, "block_size": block_size, "type_size": type_size, **attrs}
    return register(type(name, (GGMLType,), body))


# ---- mainline llama.cpp types (ggml/include/ggml.h, ggml-common.h) -------------------------------------
F32 = _define("F32", 0, 1, 4, is_float=True)
F16 = _define("F16", 1, 1, 2, is_float=True)
Q4_0 = _define("Q4_0", 2, 32, 18)
Q4_1 = _define("Q4_1", 3, 32, 20)
Q5_0 = _define("Q5_0", 6, 32, 22)
Q5_1 = _define("Q5_1", 7, 32, 24)
Q8_0 = _define("Q8_0", 8, 32, 34)
Q8_1 = _define("Q8_1", 9, 32, 36)
Q2_K = _define("Q2_K", 10, QK_K, 84)
Q3_K = _define("Q3_K", 11, QK_K, 110)
Q4_K = _define("Q4_K", 12, QK_K, 144)
Q5_K = _define("Q5_K", 13, QK_K, 176)
Q6_K = _define("Q6_K", 14, QK_K, 210)
Q8_K = _define("Q8_K", 15, QK_K, 292)
IQ2_XXS = _define("IQ2_XXS", 16, QK_K, 66, requires_imatrix=True, llama_quantize_requires_imatrix=True)
IQ2_XS = _define("IQ2_XS", 17, QK_K, 74, requires_imatrix=True, llama_quantize_requires_imatrix=True)
IQ3_XXS = _define("IQ3_XXS", 18, QK_K, 98, llama_quantize_requires_imatrix=True)
IQ1_S = _define("IQ1_S", 19, QK_K, 50, requires_imatrix=True, llama_quantize_requires_imatrix=True)
IQ4_NL = _define("IQ4_NL", 20, 32, 18)
IQ3_S = _define("IQ3_S", 21, QK_K, 110)
IQ2_S = _define("IQ2_S", 22, QK_K, 82, llama_quantize_requires_imatrix=True)
IQ4_XS = _define("IQ4_XS", 23, QK_K, 136)
I8 = _define("I8", 24, 1, 1)
I16 = _define("I16", 25, 1, 2)
I32 = _define("I32", 26, 1, 4)
I64 = _define("I64", 27, 1, 8)
F64 = _define("F64", 28, 1, 8, is_float=True)
IQ1_M = _define("IQ1_M", 29, QK_K, 56, llama_quantize_requires_imatrix=True)
BF16 = _define("BF16", 30, 1, 2, is_float=True)
TQ1_0 = _define("TQ1_0", 34, QK_K, 54)
TQ2_0 = _define("TQ2_0", 35, QK_K, 66)
MXFP4 = _define("MXFP4", 39, 32, 17)
NVFP4 = _define("NVFP4", 40, 64, 36)
Q1_0 = _define("Q1_0", 41, 128, 18)
Q2_0 = _define("Q2_0", 42, 64, 18)


@dataclass(frozen=True)
class _IkSpec:
    name: str
    type_id: int
    block_size: int
    type_size: int
    row_meta_size: int


# ---- ik_llama.cpp-only types: sizes only, so recipes for ik_llama.cpp can be costed -------------------
# Values from ik_llama.cpp (commit 8337e4cd, 2026-08): ids from ggml/include/ggml.h, block sizes from
# ggml/src/ggml-common.h, per-row metadata from the type_traits table in ggml/src/ggml.c, where
# ggml_row_size = row_meta_size + type_size * ne / blck_size.
_IK_SPECS: tuple[_IkSpec, ...] = (
    _IkSpec("Q6_0", 133, 32, 26, 0),
    _IkSpec("IQ1_BN", 134, 64, 13, 2),
    _IkSpec("IQ2_BN", 135, 64, 16, 4),
    _IkSpec("IQ2_K", 137, QK_K, 76, 0),
    _IkSpec("IQ3_K", 138, QK_K, 110, 0),
    _IkSpec("IQ4_K", 139, QK_K, 144, 0),
    _IkSpec("IQ5_K", 140, QK_K, 176, 0),
    _IkSpec("IQ6_K", 141, QK_K, 212, 0),
    _IkSpec("IQ4_KS", 144, QK_K, 136, 4),
    _IkSpec("IQ2_KS", 145, QK_K, 70, 2),
    _IkSpec("IQ4_KSS", 146, QK_K, 128, 4),
    _IkSpec("IQ5_KS", 152, QK_K, 168, 4),
    _IkSpec("IQ2_KT", 153, QK_K, 68, 4),
    _IkSpec("IQ3_KT", 154, QK_K, 100, 4),
    _IkSpec("IQ4_KT", 155, QK_K, 128, 4),
    _IkSpec("IQ3_KS", 156, QK_K, 102, 2),
    _IkSpec("IQ2_KL", 157, QK_K, 86, 2),
    _IkSpec("IQ1_KT", 158, QK_K, 56, 4),
)


def _register_ik(specs: tuple[_IkSpec, ...]) -> None:
    for s in specs:
        _define(s.name, s.type_id, s.block_size, s.type_size, row_meta_size=s.row_meta_size, ik_only=True)


_register_ik(_IK_SPECS)
