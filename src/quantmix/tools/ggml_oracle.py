"""ggml's own C quantizers, called through ctypes: the oracle quantmix's numerics must match byte for byte.

``ggml_quantize_chunk`` (libggml-base, built without -march=native: plain IEEE float32, no FMA) is what
llama-quantize runs for every tensor; ``ggml_get_type_traits(type)->to_float`` is ggml's dequantizer.
Inputs are checked here first because the C side aborts the whole process on a failed GGML_ASSERT.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from quantmix.formats.registry import GGMLType, get_type
from quantmix.tools.llamacpp import ensure_ggml_base, ensure_llamacpp


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits (ggml/include/ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lc = ensure_ggml_base()  # the one library is enough: no need for the 6-minute build of the tools
    lib = ctypes.CDLL(str((lc or ensure_llamacpp()).libggml_base))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lib


def _type(qtype: str | type[GGMLType]) -> type[GGMLType]:
    t = get_type(qtype)
    if t.ik_only or t.type_id is None:
        raise ValueError(f"{t.name} is not a mainline ggml type; the oracle cannot run it")
    return t


def oracle_row_bytes(qtype: str | type[GGMLType], n_per_row: int) -> int:
    """``ggml_row_size`` as the library computes it (a cross-check of the registry)."""
    t = _type(qtype)
    return int(_lib().ggml_row_size(t.type_id, n_per_row))


def oracle_requires_imatrix(qtype: str | type[GGMLType]) -> bool:
    """``ggml_quantize_requires_imatrix`` for the type."""
    return bool(_lib().ggml_quantize_requires_imatrix(_type(qtype).type_id))


def oracle_validate(data: np.ndarray, qtype: str | type[GGMLType]) -> bool:
    """``ggml_validate_row_data``: whether whole blocks of ``qtype`` hold no inf / NaN (a float tensor's values,
    a quantized one's block scales), the check llama-quantize and llama.cpp's loader apply. It prints what it
    finds wrong on stderr."""
    t = _type(qtype)
    buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return bool(_lib().ggml_validate_row_data(t.type_id, buf.ctypes.data, buf.size))


def oracle_quantize(x: np.ndarray, qtype: str | type[GGMLType], imatrix: np.ndarray | None = None) -> np.ndarray:
    """``ggml_quantize_chunk(type, x, dst, 0, rows, n_per_row, imatrix)`` -> uint8 [rows, row_bytes]."""
    t = _type(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"oracle_quantize: expected [rows, n_per_row], got shape {x.shape}")
    rows, n = x.shape
    if n % t.block_size:
        raise ValueError(f"oracle_quantize: row length {n} is not a multiple of {t.name}'s block {t.block_size}")
    lib = _lib()
    im_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.size != n:
            raise ValueError(f"oracle_quantize: imatrix has {imatrix.size} values, rows have {n}")
        im_ptr = imatrix.ctypes.data
    elif lib.ggml_quantize_requires_imatrix(t.type_id):
        raise ValueError(f"oracle_quantize: ggml requires an imatrix for {t.name}")
    rb = int(lib.ggml_row_size(t.type_id, n))
    out = np.zeros((rows, rb), dtype=np.uint8)
    if rows:
        got = lib.ggml_quantize_chunk(t.type_id, x.ctypes.data, out.ctypes.data, 0, rows, n, im_ptr)
        if got != rows * rb:
            raise RuntimeError(f"ggml_quantize_chunk wrote {got} bytes, expected {rows * rb}")
    return out


def oracle_dequantize(q: np.ndarray, qtype: str | type[GGMLType], n_per_row: int) -> np.ndarray:
    """ggml's ``to_float`` for the type: uint8 [rows, row_bytes] -> float32 [rows, n_per_row]."""
    t = _type(qtype)
    lib = _lib()
    rb = int(lib.ggml_row_size(t.type_id, n_per_row))
    q = np.ascontiguousarray(q, dtype=np.uint8).reshape(-1, rb)
    rows = q.shape[0]
    if t.name == "F32":
        return q.view(np.float32).reshape(rows, n_per_row).copy()
    traits = lib.ggml_get_type_traits(t.type_id).contents
    if not traits.to_float:
        raise ValueError(f"ggml has no to_float for {t.name}")
    out = np.zeros((rows, n_per_row), dtype=np.float32)
    if rows:
        _TO_FLOAT(traits.to_float)(q.ctypes.data, out.ctypes.data, rows * n_per_row)
    return out
