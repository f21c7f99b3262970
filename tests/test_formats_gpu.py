"""The fast block-quant kernels (quantmix.formats.gpu): byte-exact with ggml and the torch numerics.

Two halves. The host half runs everywhere: blockquants.cu compiled with g++ (the same source the GPU runs,
same float32 arithmetic) is compared with ggml's C quantizer, and its fused error sums with the torch
quant_error. The CUDA half skips without a GPU; on one it compares the NVRTC-built kernels with the torch
numerics on the CPU (itself checked against ggml in test_formats_kquants.py): edge cases, all imatrix
kinds, and a row subsample of a real-shaped layer, plus the fused quant_error, determinism, chunking.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from formats_data import edge_rows, heavy_tailed, imatrices, imatrix_for
from quantmix.formats import api
from quantmix.formats.api import QuantError, quant_error, quantize
from quantmix.formats.gpu import KERNEL_TYPES, driver
from quantmix.formats.registry import get_type

TYPES = list(KERNEL_TYPES)
N = 1024
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _assert_same(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    if len(bad):
        r = int(bad[0])
        col = int(np.nonzero(ours[r] != ref[r])[0][0])
        pytest.fail(f"{what}: {len(bad)} of {len(ref)} rows differ; first row {r} byte {col}: "
                    f"ours {ours[r, col]} reference {ref[r, col]}")


def _assert_errors_close(got: QuantError | tuple, x: torch.Tensor, qtype: str, im: torch.Tensor | None,
                         a: torch.Tensor, what: str) -> None:
    """Same float32 quantization, float64 sums in another order: equal to float64 rounding. (A block whose
    fp16 scale overflows dequantizes to inf/NaN in ggml too: those rows must be NaN on both sides.)"""
    ref = quant_error(x, qtype, im, a, backend="torch")
    e, r, b = (got.err_w, got.ref_w, got.bias) if isinstance(got, QuantError) else got
    assert torch.allclose(e.cpu(), ref.err_w, rtol=1e-11, atol=0.0, equal_nan=True), f"{what}: err_w differs"
    assert torch.allclose(r.cpu(), ref.ref_w, rtol=1e-11, atol=0.0), f"{what}: ref_w differs"
    assert b is not None and ref.bias is not None, f"{what}: bias missing"
    err = api.dequantize(quantize(x, qtype, im, backend="torch"), qtype, x.shape[1]).double() - x.double()
    tol = 1e-12 * (err.abs() @ a.double().abs()) + 1e-300  # rounding of sum a e scales with sum |a e|
    same_nan = b.cpu().isnan() == ref.bias.isnan()
    close = ((b.cpu() - ref.bias).abs() <= tol) | ref.bias.isnan()
    assert bool((same_nan & close).all()), f"{what}: bias differs"


# ---- host build: the kernels' arithmetic against ggml, without a GPU -------------------------------


@pytest.fixture(scope="module")
def host():  # type: ignore[no-untyped-def]
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler for the host build of blockquants.cu")
    from quantmix.formats.gpu import hostbuild

    return hostbuild.launcher()


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.concatenate([heavy_tailed(24, N, seed=51), edge_rows(N, seed=52)])


@pytest.mark.parametrize("qtype", TYPES)
def test_host_kernels_match_ggml(qtype: str, host, rows: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    from quantmix.tools.ggml_oracle import oracle_quantize

    for im_name, im in [("none", None), *imatrices(N, seed=53)]:
        ours = driver.run(host, qtype, torch.from_numpy(rows), None if im is None else torch.from_numpy(im))
        _assert_same(ours.numpy(), oracle_quantize(rows, qtype, im), f"{qtype} host kernels imatrix={im_name}")
    long_rows = heavy_tailed(3, 4096 + 256, seed=54)  # 17 super-blocks: each reads its own imatrix slice
    im = imatrix_for(long_rows.shape[1], seed=55)
    for m in (None, im):
        ours = driver.run(host, qtype, torch.from_numpy(long_rows), None if m is None else torch.from_numpy(m))
        _assert_same(ours.numpy(), oracle_quantize(long_rows, qtype, m), f"{qtype} host kernels long rows")


@pytest.mark.parametrize("qtype", [q for q in TYPES if KERNEL_TYPES[q].block == 32])
def test_host_kernels_32_weight_rows(qtype: str, host) -> None:  # type: ignore[no-untyped-def]
    """Rows of 32-weight blocks that no 256 divides (gpt-oss's 2880): each row's own sigma2 and imatrix."""
    from quantmix.tools.ggml_oracle import oracle_quantize

    x = np.concatenate([heavy_tailed(5, 2880, seed=65), heavy_tailed(2, 2880, seed=67) * np.float32(1e-3)])
    for m in (None, imatrix_for(2880, seed=68)):
        ours = driver.run(host, qtype, torch.from_numpy(x), None if m is None else torch.from_numpy(m))
        _assert_same(ours.numpy(), oracle_quantize(x, qtype, m), f"{qtype} host kernels 2880-wide rows")


def test_host_iq4_index_table_equals_ggml_search(host) -> None:  # type: ignore[no-untyped-def]
    """The IQ4 kernels' grid index by table (floor(2x) picks an interval) equals ggml's best_index_int8 on every
    float within 2^16 ulps of each grid value and midpoint, on specials, and on a spread of the rest."""
    import ctypes

    from quantmix.formats.gpu import hostbuild
    from quantmix.formats.iq4 import KVALUES_IQ4NL

    kv = np.array(KVALUES_IQ4NL, dtype=np.float32)
    marks = np.concatenate([kv, (kv[:-1] + kv[1:]) / 2, [0.0]]).astype(np.float32)
    near = np.arange(-(1 << 16), 1 << 16, dtype=np.int64)
    xs = [(marks.view(np.int32).astype(np.int64)[:, None] + near[None, :]).astype(np.int32).view(np.float32).ravel()]
    xs.append(np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3e38, -3e38, 127.5, -127.5], np.float32))
    xs.append((np.random.default_rng(69).standard_normal(1 << 20) * 60).astype(np.float32))
    x = np.ascontiguousarray(np.concatenate(xs)[np.isfinite(np.concatenate(xs)) | np.isinf(np.concatenate(xs))])
    lib = ctypes.CDLL(str(hostbuild.library_path()))
    lib.qm_iq4_index_mismatches.restype = ctypes.c_longlong
    bad = lib.qm_iq4_index_mismatches(x.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(x.size))
    assert bad == 0, f"{bad} of {x.size} floats get another IQ4 index from the table"


@pytest.mark.parametrize("qtype", TYPES)
def test_host_fused_errors_match_torch(qtype: str, host, rows: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    x = torch.from_numpy(rows[np.abs(rows).max(axis=1) < 1e20])  # 1e30 rows give inf errors on both sides
    a = torch.from_numpy(np.random.default_rng(56).standard_normal(N).astype(np.float32))
    for im in (None, torch.from_numpy(imatrix_for(N, seed=57))):
        got = driver.run(host, qtype, x, im, errors=True, act_mean=a)
        _assert_errors_close(got, x, qtype, im, a, f"{qtype} host errors")


def test_backend_argument_is_checked() -> None:
    x = torch.from_numpy(heavy_tailed(2, 256, seed=58))
    with pytest.raises(ValueError, match="unknown backend"):
        quantize(x, "Q4_K", backend="fast")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        quantize(x, "Q4_K", backend="cuda")
    with pytest.raises(ValueError, match="no kernel for BF16"):
        quantize(x, "BF16", backend="cuda")
    assert quant_error(x, "Q4_K").backend == "torch"


# ---- CUDA: the NVRTC build on a GPU ----------------------------------------------------------------


def _torch_cpu(x: np.ndarray, qtype: str, im: np.ndarray | None) -> np.ndarray:
    return quantize(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im), backend="torch").numpy()


@cuda
@pytest.mark.parametrize("qtype", TYPES)
def test_cuda_kernels_match_torch_exact(qtype: str, rows: np.ndarray) -> None:
    xg = torch.from_numpy(rows).cuda()
    for im_name, im in [("none", None), *imatrices(N, seed=59)]:
        ours = quantize(xg, qtype, None if im is None else torch.from_numpy(im).cuda(), backend="cuda")
        _assert_same(ours.cpu().numpy(), _torch_cpu(rows, qtype, im), f"{qtype} cuda imatrix={im_name}")


@cuda
@pytest.mark.parametrize("qtype", TYPES)
def test_cuda_real_shape_subsample(qtype: str) -> None:
    """A dense 4096x14336 layer and an expert slice (row length 5120), made on the GPU; a spread of rows
    is compared with the torch numerics on the CPU."""
    g = torch.Generator(device="cuda").manual_seed(60)
    shapes = [(4096, 14336), (1536, 5120)] + ([(2880, 2880)] if KERNEL_TYPES[qtype].block == 32 else [])
    for rows, n in shapes:
        x = torch.randn(rows, n, generator=g, device="cuda") * 0.02
        x[:, torch.randperm(n, generator=g, device="cuda")[: n // 128]] *= 30.0
        im = torch.rand(n, generator=g, device="cuda") ** 4
        pick = torch.linspace(0, rows - 1, 12, device="cuda").round().long()
        xs = x[pick].cpu().numpy()
        for m in (None, im):
            q = quantize(x, qtype, m, backend="cuda")[pick].cpu().numpy()
            _assert_same(q, _torch_cpu(xs, qtype, None if m is None else m.cpu().numpy()), f"{qtype} {rows}x{n}")


@cuda
@pytest.mark.parametrize("qtype", TYPES)
def test_cuda_fused_quant_error(qtype: str, rows: np.ndarray) -> None:
    x = rows[np.abs(rows).max(axis=1) < 1e20]
    a = np.random.default_rng(61).standard_normal(N).astype(np.float32)
    for im in (None, imatrix_for(N, seed=62)):
        imt = None if im is None else torch.from_numpy(im)
        got = quant_error(torch.from_numpy(x).cuda(), qtype, None if imt is None else imt.cuda(),
                          torch.from_numpy(a).cuda())
        assert got.backend == "cuda"
        _assert_errors_close(got, torch.from_numpy(x), qtype, imt, torch.from_numpy(a), f"{qtype} cuda quant_error")


@cuda
@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K", "Q4_0", "Q5_1", "IQ4_XS"])
def test_cuda_deterministic_and_chunking_independent(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.from_numpy(heavy_tailed(40, N, seed=63)).cuda()
    im = torch.from_numpy(imatrix_for(N, seed=64)).cuda()
    a = quantize(x, qtype, im)
    e = quant_error(x, qtype, im)
    assert torch.equal(a, quantize(x, qtype, im))
    monkeypatch.setattr(api, "CHUNK_WEIGHTS_KERNEL", 3 * N)  # 3 rows per launch
    assert torch.equal(a, quantize(x, qtype, im))
    assert torch.equal(e.err_w, quant_error(x, qtype, im).err_w)
    # an unaligned view (the kernels read 16 bytes at a time) gives the same bytes
    flat = torch.empty(x.numel() + 1, device="cuda")
    view = flat[1:].view_as(x)
    view.copy_(x)
    assert torch.equal(a, quantize(view, qtype, im))


# ---- codebook quants (IQ1_S .. IQ3_S): iqgrids.cu ----------------------------------------------------
# The host half checks the kernels' arithmetic (g++ build) against ggml; the CUDA half checks the GPU
# (through the public API, which sends CUDA tensors of these types to the kernels) against quantmix's
# torch numerics on the CPU (byte-exact with ggml: test_formats_iq2.py / test_formats_iq3.py), under the
# numerics issue's rule: at most 0.1% of the 256-weight blocks may differ (none did when this was written).

IQ_TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]
IQ_NEEDS_IMATRIX = {"IQ1_S", "IQ2_XXS", "IQ2_XS"}
MAX_BAD_BLOCKS = 1e-3


def _iq_survivable(x: np.ndarray, im_name: str) -> np.ndarray:
    """Rows ggml quantizes without aborting (its neighbour searches GGML_ASSERT on overflowing distances)."""
    amax = np.abs(x).max(axis=1)
    return x[(amax < 1e20) & ((amax <= 1e3) | (im_name != "huge"))]


def _iq_imatrices(qtype: str, n: int, seed: int):  # type: ignore[no-untyped-def]
    return ([] if qtype in IQ_NEEDS_IMATRIX else [("none", None)]) + list(imatrices(n, seed=seed))


def _assert_blocks_close(ours: np.ndarray, ref: np.ndarray, qtype: str, what: str) -> int:
    """At most 0.1% of the super-blocks may differ; returns how many did."""
    ts = get_type(qtype).type_size
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    a, b = ours.reshape(-1, ts), ref.reshape(-1, ts)
    bad = np.nonzero((a != b).any(axis=1))[0]
    if len(bad) > MAX_BAD_BLOCKS * len(a):
        k = int(bad[0])
        col = int(np.nonzero(a[k] != b[k])[0][0])
        pytest.fail(f"{what}: {len(bad)} of {len(a)} blocks differ (limit 0.1%); first block {k} byte {col}: "
                    f"ours {a[k, col]} reference {b[k, col]}")
    return len(bad)


@pytest.mark.parametrize("qtype", IQ_TYPES)
def test_host_iq_kernels_match_ggml(qtype: str) -> None:
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler for the host build of iqgrids.cu")
    from quantmix.formats.gpu import iqkernels
    from quantmix.tools.ggml_oracle import oracle_quantize

    rows = np.concatenate([heavy_tailed(12, N, seed=71), edge_rows(N, seed=72)])
    for im_name, im in _iq_imatrices(qtype, N, seed=73):
        x = _iq_survivable(rows, im_name)
        ours = iqkernels.host_quantize_rows(qtype, torch.from_numpy(x), None if im is None else torch.from_numpy(im))
        _assert_same(ours.numpy(), oracle_quantize(x, qtype, im), f"{qtype} host kernel imatrix={im_name}")
    long_rows = heavy_tailed(2, 4096 + 256, seed=74)  # 17 super-blocks: each reads its own imatrix slice
    im = imatrix_for(long_rows.shape[1], seed=75)
    ours = iqkernels.host_quantize_rows(qtype, torch.from_numpy(long_rows), torch.from_numpy(im))
    _assert_same(ours.numpy(), oracle_quantize(long_rows, qtype, im), f"{qtype} host kernel long rows")


@cuda
@pytest.mark.parametrize("qtype", IQ_TYPES)
def test_cuda_iq_matches_cpu(qtype: str) -> None:
    """Edge and heavy-tailed rows with every imatrix kind, through the API on the GPU (the kernels), and
    a real-shaped dense layer and expert slice subsampled, against the torch numerics on the CPU."""
    from quantmix.formats.gpu import iqkernels

    rows = np.concatenate([heavy_tailed(24, N, seed=76), edge_rows(N, seed=77)])
    assert iqkernels.use_kernels(torch.zeros(1, device="cuda"))
    for im_name, im in _iq_imatrices(qtype, N, seed=78):
        # rows ggml aborts on have no reference bytes (the CPU torch path and the kernels may differ there,
        # e.g. in the sign of a NaN super-scale): they must only quantize, deterministically
        x = _iq_survivable(rows, im_name)
        imc = None if im is None else torch.from_numpy(im).cuda()
        ours = quantize(torch.from_numpy(x).cuda(), qtype, imc)
        _assert_blocks_close(ours.cpu().numpy(), _torch_cpu(x, qtype, im), qtype, f"{qtype} cuda imatrix={im_name}")
        assert torch.equal(quantize(torch.from_numpy(rows).cuda(), qtype, imc),
                           quantize(torch.from_numpy(rows).cuda(), qtype, imc))
    g = torch.Generator(device="cuda").manual_seed(79)
    for rows, n in ((4096, 14336), (1536, 5120)):
        xg = torch.randn(rows, n, generator=g, device="cuda") * 0.02
        xg[:, torch.randperm(n, generator=g, device="cuda")[: n // 128]] *= 30.0
        img = torch.rand(n, generator=g, device="cuda") ** 4
        pick = torch.linspace(0, rows - 1, 8, device="cuda").round().long()
        q = quantize(xg, qtype, img)[pick].cpu().numpy()
        _assert_blocks_close(q, _torch_cpu(xg[pick].cpu().numpy(), qtype, img.cpu().numpy()), qtype,
                             f"{qtype} cuda {rows}x{n}")


@cuda
@pytest.mark.parametrize("qtype", IQ_TYPES)
def test_cuda_iq_torch_path_matches_cpu(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch numerics themselves on CUDA tensors (QUANTMIX_IQ_KERNELS=0): same bytes as on the CPU."""
    from quantmix.formats.gpu import iqkernels

    monkeypatch.setenv(iqkernels.ENV_SWITCH, "0")
    rows = np.concatenate([heavy_tailed(8, N, seed=80), edge_rows(N, seed=81)])
    for im_name, im in _iq_imatrices(qtype, N, seed=82)[:2]:
        x = _iq_survivable(rows, im_name)
        ours = quantize(torch.from_numpy(x).cuda(), qtype, None if im is None else torch.from_numpy(im).cuda())
        _assert_blocks_close(ours.cpu().numpy(), _torch_cpu(x, qtype, im), qtype, f"{qtype} torch-on-cuda {im_name}")


@cuda
@pytest.mark.parametrize("qtype", ["IQ1_M", "IQ2_XS", "IQ3_S"])
def test_cuda_iq_deterministic_chunking_and_errors(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.from_numpy(heavy_tailed(40, N, seed=83)).cuda()
    im = torch.from_numpy(imatrix_for(N, seed=84)).cuda()
    a = quantize(x, qtype, im)
    assert torch.equal(a, quantize(x, qtype, im))
    monkeypatch.setattr(api, "CHUNK_WEIGHTS_GPU", 3 * N)  # 3 rows per call
    monkeypatch.setattr(api, "CHUNK_WEIGHTS", 3 * N)
    assert torch.equal(a, quantize(x, qtype, im))
    view = torch.empty(x.numel() + 1, device="cuda")[1:].view_as(x)  # a view off a 16-byte boundary
    view.copy_(x)
    assert torch.equal(a, quantize(view, qtype, im))
    e = quant_error(x, qtype, im)  # through the bytes: equal to the CPU's sums
    ref = quant_error(x.cpu(), qtype, im.cpu())
    assert torch.allclose(e.err_w.cpu(), ref.err_w, rtol=1e-9, atol=0.0)
