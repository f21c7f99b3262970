"""The "ggml" backend (ggml's own C quantizer on CPU tensors) gives the torch numerics' bytes and errors, split
over threads without changing a byte; the error table, writer and simulator take it for the codebook types on
a CPU when llama.cpp is built, with results equal to the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats_data import heavy_tailed, imatrix_for
from quantmix.formats import dequantize, quant_error, quantize
from quantmix.formats.ggml_backend import SLOW_ON_CPU, preferred_backend

N = 512


@pytest.fixture(autouse=True)
def _two_threads(llamacpp):  # the backend splits rows over torch's threads: exercise the split
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("qtype", sorted(SLOW_ON_CPU) + ["Q4_K", "IQ4_XS", "Q5_0"])
def test_bytes_and_errors_equal_torch(qtype: str) -> None:
    x = torch.from_numpy(heavy_tailed(37, N, seed=11))
    im = torch.from_numpy(imatrix_for(N, seed=12))
    a = torch.from_numpy(np.random.default_rng(13).normal(0.2, 1.0, N))
    ours = quantize(x, qtype, im, backend="torch")
    theirs = quantize(x, qtype, im, backend="ggml")
    assert theirs.dtype == torch.uint8 and theirs.shape == ours.shape
    assert torch.equal(ours, theirs), f"{qtype}: ggml backend bytes differ from the torch numerics"
    assert torch.equal(dequantize(theirs, qtype, N), dequantize(ours, qtype, N))
    et = quant_error(x, qtype, im, a, backend="torch")
    eg = quant_error(x, qtype, im, a, backend="ggml")
    assert eg.backend == "ggml" and et.backend == "torch"
    for f in ("err_w", "ref_w", "bias"):
        assert torch.equal(getattr(et, f), getattr(eg, f)), f"{qtype}: {f} differs"


def test_choice_and_errors() -> None:
    cpu = torch.device("cpu")
    assert preferred_backend("IQ2_XS", cpu) == "ggml"  # llama.cpp is built (the fixture)
    assert preferred_backend("Q4_K", cpu) == "ggml"  # k-quants too: faster in C on a CPU
    assert preferred_backend("IQ4_XS", cpu) == "auto"  # torch is faster there
    assert preferred_backend("IQ2_XS", torch.device("meta")) == "auto"
    x = torch.zeros(2, 256)
    with pytest.raises(ValueError, match="unknown backend"):
        quantize(x, "Q4_K", backend="fast")
    with pytest.raises(ValueError, match="imatrix"):
        quantize(x, "IQ2_XXS", backend="ggml")  # checked before C ever sees it (ggml would abort)
