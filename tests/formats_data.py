"""Test inputs for the quantizer exactness tests (shared by the simple, IQ4 and k-quant test files).

Everything is seeded numpy, float32, with row lengths that are multiples of 256 so every type fits.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

F = np.float32


def heavy_tailed(rows: int, n: int, seed: int, df: float = 3.0, scale: float = 0.02) -> np.ndarray:
    """Student-t rows (heavy tails, like LLM weights), with a per-row scale spread and a few outlier columns."""
    g = np.random.default_rng(seed)
    x = g.standard_t(df, size=(rows, n)) * scale
    x *= np.exp(g.normal(0.0, 0.5, size=(rows, 1)))  # rows of different magnitudes
    cols = g.choice(n, size=max(1, n // 128), replace=False)
    x[:, cols] *= 30.0  # outlier input channels, as real activations/weights have
    return x.astype(F)


def edge_rows(n: int, seed: int) -> np.ndarray:
    """One row per pathological pattern: zero, constant, signed-zero, tiny, subnormal, huge, one-signed,
    exact ties on the quant grids, +-max ties within a block, near-zero blocks next to large ones."""
    assert n % 256 == 0
    g = np.random.default_rng(seed)
    base = g.standard_t(3.0, size=n).astype(F) * F(0.02)
    out: list[np.ndarray] = []
    out.append(np.zeros(n, F))  # all-zero
    out.append(np.full(n, F(0.0371), F))  # constant positive
    out.append(np.full(n, F(-2.5), F))  # constant negative
    out.append(np.where(g.random(n) < 0.5, F(0.0), F(-0.0)).astype(F))  # signed zeros
    r = base.copy()
    r[: n // 2] = 0.0  # zero blocks next to normal blocks
    out.append(r)
    r = base.copy()
    r[32:64] = F(1.5)  # one constant block inside a normal row
    out.append(r)
    out.append((base * F(1e-30)).astype(F))  # tiny
    out.append((base * F(1e30)).astype(F))  # huge (sums of squares overflow to inf)
    out.append((g.standard_normal(n) * 1e-39).astype(F))  # subnormal
    out.append((g.standard_normal(n) * 1e-17).astype(F))  # below GROUP_MAX_EPS-ish magnitudes
    out.append(np.abs(base))  # positive-only
    out.append(-np.abs(base))  # negative-only
    out.append((g.integers(-8, 8, n) * 0.5).astype(F))  # values on half-steps: rounding ties
    out.append((g.integers(-16, 16, n) * 0.25 + 0.125).astype(F))
    out.append((g.integers(-127, 128, n) * 0.01).astype(F))
    r = np.zeros(n, F)
    r[::32] = -1.0
    r[1::32] = 1.0  # equal |max| of both signs: the first one must win
    out.append(r)
    r = np.zeros(n, F)
    r[::32] = 1.0
    r[1::32] = -1.0
    out.append(r)
    r = base.copy()
    r[::256] = F(40.0)  # a huge outlier per super-block
    out.append(r)
    r = base.copy()
    r[5::32] = F(1e-16)
    r[: n // 4] = F(1e-16)  # blocks below GROUP_MAX_EPS
    out.append(r)
    out.append((np.sign(base) * F(2.0) ** g.integers(-20, 20, n)).astype(F))  # powers of two
    return np.stack(out).astype(F)


def imatrix_for(n: int, seed: int, zeros: bool = True) -> np.ndarray:
    """A positive, heavy-tailed importance vector like mean squared activations (some exact zeros)."""
    g = np.random.default_rng(seed)
    im = (g.standard_t(2.0, size=n) ** 2 * 0.1).astype(F)
    if zeros:
        im[g.choice(n, size=max(1, n // 64), replace=False)] = 0.0
    return im


def imatrices(n: int, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Named imatrices covering the special cases (all ones, all zeros, huge values)."""
    yield "random", imatrix_for(n, seed)
    yield "ones", np.ones(n, F)
    yield "zeros", np.zeros(n, F)
    yield "huge", np.full(n, F(1e30), F)


@functools.lru_cache(maxsize=2)
def _reader(gguf_path: str):  # type: ignore[no-untyped-def]
    """GGUFReader parses the whole header (the vocabulary too: seconds); the test modules share one."""
    from gguf import GGUFReader

    return GGUFReader(gguf_path)


def real_tensor_slices(gguf_path: str, rows: int = 24, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """A window of consecutive rows (at a seeded offset) of several real 2-D weight tensors of an F32
    GGUF (row length a multiple of 256)."""
    reader = _reader(gguf_path)
    g = np.random.default_rng(seed)
    picked: list[tuple[str, np.ndarray]] = []
    wanted = ("attn_q", "attn_v", "ffn_down", "ffn_up", "token_embd", "output.")
    for t in reader.tensors:
        data = np.asarray(t.data)
        if data.ndim != 2 or data.dtype != np.float32 or data.shape[1] % 256:
            continue
        if not any(w in t.name for w in wanted) or (t.name.startswith("blk.") and t.name.split(".")[1] not in ("0", "7")):
            continue
        k = min(rows, data.shape[0])
        start = int(g.integers(0, data.shape[0] - k + 1))
        picked.append((t.name, np.array(data[start:start + k], dtype=F)))
    return picked
