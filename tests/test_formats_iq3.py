"""Byte-exactness of quantmix's IQ3_XXS and IQ3_S numerics against llama.cpp's own C quantizer
(ggml_quantize_chunk through ctypes, with and without an importance matrix), of their dequantizers against
ggml's to_float and gguf-py, and of the codebook tables (grids, neighbour lists) they are built on.

Inputs on which ggml itself aborts (a neighbour search where every distance overflows, GGML_ASSERT) kill
the process, so they are left out: rows of magnitude ~1e30, and rows > 1e3 under a 1e30 imatrix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from formats_data import edge_rows, heavy_tailed, imatrices, imatrix_for, real_tensor_slices
from quantmix.formats import api, codebook, iq3
from quantmix.formats.api import dequantize, quant_error, quantize, supported_types
from quantmix.formats.registry import get_type
from quantmix.tools.ggml_oracle import oracle_dequantize, oracle_quantize, oracle_row_bytes

TYPES = ["IQ3_XXS", "IQ3_S"]
N = 1024
F = np.float32


def _ours(x: np.ndarray, qtype: str, im: np.ndarray | None) -> np.ndarray:
    return quantize(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im)).numpy()


def _assert_bytes_equal(ours: np.ndarray, ref: np.ndarray, x: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    if len(bad):
        r = int(bad[0])
        col = int(np.nonzero(ours[r] != ref[r])[0][0])
        pytest.fail(f"{what}: {len(bad)} of {len(ref)} rows differ from ggml; first row {r}, byte {col}: "
                    f"ours {ours[r, col]} ggml {ref[r, col]} (row starts {x[r, :4]})")


def _check(x: np.ndarray, qtype: str, im: np.ndarray | None, what: str) -> None:
    _assert_bytes_equal(_ours(x, qtype, im), oracle_quantize(x, qtype, im), x, what)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint32),
                                                 np.ascontiguousarray(b).view(np.uint32))


def _ggml_survivable(x: np.ndarray, im_name: str) -> np.ndarray:
    """Rows ggml can quantize without aborting (see the module docstring)."""
    amax = np.abs(x).max(axis=1)
    return x[(amax < 1e20) & ((amax <= 1e3) | (im_name != "huge"))]


@pytest.fixture(scope="module")
def random_rows() -> np.ndarray:
    return heavy_tailed(32, N, seed=51)


@pytest.fixture(scope="module")
def special_rows() -> np.ndarray:
    return edge_rows(N, seed=52)


def _zero_block_rows(n: int, seed: int) -> np.ndarray:
    """Exactly-zero and sub-1e-8 32-blocks between normal ones: IQ3_S skips its qs/signs pointers over
    zero blocks (later blocks move one slot down) and IQ3_XXS zeroes blocks below GROUP_MAX_EPS_IQ3_XXS."""
    assert n % 256 == 0 and n >= 512
    g = np.random.default_rng(seed)
    base = (g.standard_t(3.0, size=(6, n)) * 0.02).astype(F)
    base[0, 32:64] = 0.0
    base[1, 0:32] = 0.0
    base[1, 96:160] = -0.0
    base[2, 224:256] = 0.0  # last block of a super-block
    base[3, 32:256] = 0.0  # one live block, seven zero ones
    base[3, 256 + 64:256 + 96] = F(3e-9)  # below IQ3_XXS's threshold, not zero for IQ3_S
    base[4, ::2] = 0.0  # half the weights zero in every block
    base[5, :] = 0.0
    base[5, 300] = F(-0.7)  # one non-zero weight in the row
    return base


def test_iq3_types_are_supported() -> None:
    names = supported_types()
    for t in TYPES:
        assert t in names


@pytest.mark.parametrize("qtype", TYPES)
def test_row_bytes_match_ggml(qtype: str) -> None:
    for n in (256, 768, 4096):
        assert get_type(qtype).row_bytes(n) == oracle_row_bytes(qtype, n) == n // 256 * iq3.TYPE_SIZE[qtype]


# ---- codebook tables ------------------------------------------------------------------------------


def _c_array(name: str) -> list[int]:
    from quantmix.tools.llamacpp import ensure_llamacpp

    src = ensure_llamacpp().root / "ggml" / "src" / "ggml-quants.c"
    assert src.exists(), f"vendored llama.cpp source missing: {src}"
    m = re.search(r"static const uint16_t %s\[\d+\] = \{(.*?)\};" % name, src.read_text(), re.S)
    assert m, f"{name} not found in {src}"
    return [int(v) for v in m.group(1).split(",") if v.strip()]


@pytest.mark.parametrize(("qtype", "c_name"), [("IQ3_XXS", "kgrid_256"), ("IQ3_S", "kgrid_512")])
def test_gguf_grid_is_ggml_grid(qtype: str, c_name: str) -> None:
    """gguf-py's hex grid, decoded, keys to exactly the C source's kgrid table (same order)."""
    cb = codebook.codebook(qtype)
    assert cb.key(cb.levels).tolist() == _c_array(c_name)


@pytest.mark.parametrize("qtype", TYPES)
def test_neighbour_lists_match_a_direct_transcription(qtype: str) -> None:
    """The vectorized lists against a plain loop over iq3xs_init_impl's rule on sampled off-grid keys:
    every grid point at the nwant smallest distinct squared distances, sorted by (distance, index)."""
    cb = codebook.codebook(qtype)
    grid = (2 * cb.levels + 1).tolist()
    off = (cb.kmap < 0).nonzero().squeeze(1).tolist()
    assert len(off) + cb.size == 4096 and cb.kmap[cb.key(cb.levels)].tolist() == list(range(cb.size))
    g = np.random.default_rng(53)
    for key in [off[0], off[-1], *g.choice(off, size=60, replace=False).tolist()]:
        pos = [2 * ((key >> (3 * k)) & 7) + 1 for k in range(4)]
        d2 = sorted((sum((a - b) ** 2 for a, b in zip(pt, pos)), j) for j, pt in enumerate(grid))
        distinct = sorted({d for d, _ in d2})[: cb.nwant]
        want = [j for d, j in d2 if d in distinct]
        got = cb.neighbours[key][: int(cb.counts[key])].tolist()
        assert got == want, f"{qtype} key {key}: neighbours {got[:8]}... expected {want[:8]}..."
        assert bool((cb.neighbours[key][int(cb.counts[key]):] == -1).all())


def test_codebook_disk_cache_round_trip(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built tables go to the cache and come back identical; a corrupt file is rebuilt."""
    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path))
    codebook._codebook_cpu.cache_clear()
    try:
        built = codebook.codebook("IQ3_XXS")
        files = list((tmp_path / "codebooks").glob("iq3_xxs-*.npz"))
        assert len(files) == 1
        codebook._codebook_cpu.cache_clear()
        loaded = codebook.codebook("IQ3_XXS")
        assert torch.equal(built.kmap, loaded.kmap) and torch.equal(built.neighbours, loaded.neighbours)
        files[0].write_bytes(b"not an npz")
        codebook._codebook_cpu.cache_clear()
        rebuilt = codebook.codebook("IQ3_XXS")
        assert torch.equal(built.neighbours, rebuilt.neighbours)
    finally:
        codebook._codebook_cpu.cache_clear()


# ---- quantization vs ggml -------------------------------------------------------------------------


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
def test_random_rows_match_ggml(qtype: str, with_imatrix: bool, random_rows: np.ndarray) -> None:
    im = imatrix_for(N, seed=54) if with_imatrix else None
    _check(random_rows, qtype, im, f"{qtype} random imatrix={with_imatrix}")


@pytest.mark.parametrize("qtype", TYPES)
def test_special_rows_match_ggml(qtype: str, special_rows: np.ndarray) -> None:
    """Zero / constant / signed-zero / tiny / subnormal / one-signed / tied / outlier blocks, with no,
    random, all-one, all-zero and 1e30 imatrices."""
    for im_name, im in [("none", None), *imatrices(N, seed=55)]:
        x = _ggml_survivable(special_rows, im_name)
        assert len(x) >= len(special_rows) - 2
        _check(x, qtype, im, f"{qtype} special imatrix={im_name}")


@pytest.mark.parametrize("qtype", TYPES)
def test_zero_blocks_inside_superblocks(qtype: str) -> None:
    x = _zero_block_rows(512, seed=56)
    for im_name, im in [("none", None), ("random", imatrix_for(512, seed=57)), ("zeros", np.zeros(512, F))]:
        _check(x, qtype, im, f"{qtype} zero blocks imatrix={im_name}")


def test_iq3_s_zero_block_shifts_later_blocks() -> None:
    """The IQ3_S quirk is real: a zero block 1 moves block 2's grid bytes into slot 1."""
    x = _zero_block_rows(512, seed=58)[:1]  # block 1 (weights 32..63) is zero
    q = _ours(x, "IQ3_S", None)[0]
    y = x.copy()
    y[0, 32:64] = F(1e-3)  # the same row with block 1 alive
    q2 = _ours(y, "IQ3_S", None)[0]
    qs, qs2 = q[2:66].reshape(8, 8), q2[2:66].reshape(8, 8)
    assert np.array_equal(qs[1], qs2[2]) and not qs[7].any()


@pytest.mark.parametrize("qtype", TYPES)
def test_magnitudes_match_ggml(qtype: str) -> None:
    base = heavy_tailed(6, 512, seed=59)
    im = imatrix_for(512, seed=60)
    for scale in (1e-38, 1e-30, 1e-12, 1e4, 1e12):
        x = (base * F(scale)).astype(F)
        for m in (None, im):
            _check(x, qtype, m, f"{qtype} x{scale:g} imatrix={m is not None}")


def test_iq3_xxs_negative_scale_flips_signs() -> None:
    """The 'should never happen' branch: the sign-fixing flip lands on a tiny weight with a huge imatrix
    entry, sumqx < 0 wins the scale search, and C flips the scale and all stored signs."""
    n = 256
    x = np.ones(n, F)
    x[0::8] = F(-0.001)  # one negative per 8: odd, so the least important (this one) is flipped back
    im = np.full(n, F(2.0))
    im[0::8] = F(1e6)  # ... which makes it the heaviest in sumqx
    im[8:32] = 0.0  # and the rest of block 0 silent
    x = x[None]
    ours = _ours(x, "IQ3_XXS", im)
    _assert_bytes_equal(ours, oracle_quantize(x, "IQ3_XXS", im), x, "IQ3_XXS negative scale")
    y = dequantize(torch.from_numpy(ours), "IQ3_XXS", n).numpy()[0]
    assert (y[1:8] < 0).all(), "block 0 should come back with inverted signs (the flip branch ran)"


@pytest.mark.parametrize("qtype", TYPES)
def test_long_rows_and_imatrix_indexing(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """17 super-blocks per row, cut into solver chunks of 5: each must read its own imatrix slice."""
    monkeypatch.setattr(iq3, "CHUNK_SUPERBLOCKS", 5)
    x = heavy_tailed(3, 4096 + 256, seed=61)
    im = imatrix_for(x.shape[1], seed=62)
    for m in (None, im):
        _check(x, qtype, m, f"{qtype} long rows imatrix={m is not None}")


@pytest.fixture(scope="module")
def real_slices() -> list[tuple[str, np.ndarray]]:
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture("smollm2-768")
    slices = real_tensor_slices(str(fx.gguf_f32), rows=8, seed=63)
    assert len(slices) >= 6, f"expected several 2-D F32 tensors in {fx.gguf_f32}"
    return slices


@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES)
def test_real_weights_match_ggml(qtype: str, real_slices: list[tuple[str, np.ndarray]]) -> None:
    for name, x in real_slices:
        # imatrix stand-in: a column energy profile of the same tensor (a real imatrix needs llama-imatrix)
        im = (np.mean(x.astype(np.float64) ** 2, axis=0) * 1e3).astype(F)
        for m in (None, im):
            _check(x, qtype, m, f"{qtype} {name} imatrix={m is not None}")


# ---- dequantization, sanity, determinism ----------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_matches_ggml_and_gguf_py(qtype: str, random_rows: np.ndarray, special_rows: np.ndarray) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    x = np.concatenate([random_rows[:8], _ggml_survivable(special_rows, "none"), _zero_block_rows(N, seed=64)])
    for im in (None, imatrix_for(N, seed=65)):
        q = oracle_quantize(x, qtype, im)
        ours = dequantize(torch.from_numpy(q), qtype, N).numpy()
        assert _bits_equal(ours, oracle_dequantize(q, qtype, N)), f"{qtype}: differs from ggml to_float"
        ref = np.asarray(gguf_dequantize(q, GGMLQuantizationType[qtype]), dtype=F).reshape(ours.shape)
        assert _bits_equal(ours, ref), f"{qtype}: differs from gguf-py dequantize"
    # arbitrary bytes too (every index, sign pattern and scale nibble), with finite fp16 super-scales
    g = np.random.default_rng(66)
    q = g.integers(0, 256, size=(16, 4 * iq3.TYPE_SIZE[qtype]), dtype=np.uint8)
    q.reshape(-1, iq3.TYPE_SIZE[qtype])[:, 1] &= 0x3B  # fp16 exponent < 31: no inf/NaN
    ours = dequantize(torch.from_numpy(q), qtype, 1024).numpy()
    assert _bits_equal(ours, oracle_dequantize(q, qtype, 1024)), f"{qtype}: random bytes differ from ggml"


@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_error_is_small(qtype: str, random_rows: np.ndarray) -> None:
    """A sanity bound that fails for a wrong layout even where ggml would agree on garbage."""
    err = quant_error(torch.from_numpy(random_rows), qtype)
    rel = float(err.err_w.sum() / err.ref_w.sum())
    bpw = get_type(qtype).bits_per_weight()
    assert rel < 4.0 ** (-(bpw - 2.0)), f"{qtype}: relative error {rel:.3g} too large for {bpw} bpw"


@pytest.mark.parametrize("qtype", TYPES)
def test_deterministic_and_chunking_independent(
    qtype: str, random_rows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.from_numpy(random_rows[:12])
    im = torch.from_numpy(imatrix_for(N, seed=67))
    a = quantize(x, qtype, im)
    assert torch.equal(a, quantize(x, qtype, im))
    monkeypatch.setattr(api, "CHUNK_WEIGHTS", 3 * N)  # 3 rows per call
    monkeypatch.setattr(iq3, "CHUNK_SUPERBLOCKS", 5)  # and 5 super-blocks per solver call
    assert torch.equal(a, quantize(x, qtype, im))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("qtype", TYPES)
def test_cuda_matches_ggml(qtype: str, random_rows: np.ndarray, special_rows: np.ndarray) -> None:
    z = _zero_block_rows(N, seed=68)
    for im_name, im in [("none", None), *imatrices(N, seed=69)]:
        x = np.concatenate([random_rows[:16], _ggml_survivable(special_rows, im_name), z])
        ours = quantize(torch.from_numpy(x).cuda(), qtype, None if im is None else torch.from_numpy(im).cuda())
        _assert_bytes_equal(ours.cpu().numpy(), oracle_quantize(x, qtype, im), x, f"{qtype} cuda imatrix={im_name}")
        deq = dequantize(ours, qtype, N).cpu().numpy()
        assert _bits_equal(deq, oracle_dequantize(ours.cpu().numpy(), qtype, N)), f"{qtype}: cuda dequantize"
