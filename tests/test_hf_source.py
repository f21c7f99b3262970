"""No float copy of the model: every GGUF tensor read straight from the Hugging Face checkpoint equals, bit for
bit, what llama.cpp's converter writes to its F32 GGUF (renames, expert stacking, q/k permutation, MLA's kv_b
split, gpt-oss's interleaved gate/up, Gemma's norms + 1, GLM's NextN layer), and the error table measured from
the directory is the one measured from the converted GGUF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

ARCHS = ["tiny-llama", "tiny-deepseek-v3", "tiny-gemma2", "tiny-gpt-oss", "tiny-glm4-moe", "tiny-qwen3-moe"]


@pytest.mark.parametrize("name", ARCHS)
def test_every_tensor_equals_the_converters(name: str) -> None:
    from quantmix.evaluation.gguf_model import dequantize_gguf_tensor
    from quantmix.job import resolve_model
    from quantmix.model.gguf_header import read_gguf_header
    from quantmix.model.hf_tensors import HFTensors

    inputs = resolve_model(name)  # the tiny model with its tokenizer, converted by convert_hf_to_gguf.py
    hf = HFTensors(inputs.hf_dir)
    header = read_gguf_header(inputs.gguf)
    maps = {p: np.memmap(p, dtype=np.uint8, mode="r") for p in header.paths}
    by_name = {t.name: t for t in header.tensors}
    assert set(by_name) == set(hf.names)
    for n in hf.names:
        t = by_name[n]
        assert t.type_name == "F32" and hf.shape(n) == tuple(t.shape), n
        ref = dequantize_gguf_tensor(t, maps[t.shard], header.data_offsets[t.shard])
        assert torch.equal(hf.get(n), ref), n


def test_error_table_from_the_directory(tmp_path, monkeypatch) -> None:
    from quantmix.job import resolve_model
    from quantmix.measurement.error_table import error_table

    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path))  # nothing cached: both tables measured
    inputs = resolve_model("tiny-glm4-moe")
    kw = dict(candidates=["Q4_0", "Q4_K", "Q8_0"], device="cpu", progress=False)
    from_gguf = error_table(inputs.gguf, None, **kw)
    from_dir = error_table(inputs.hf_dir, None, **kw)
    key = lambda r: (r.tensor, r.type)  # noqa: E731
    a = sorted(from_gguf.rows, key=key)
    b = sorted(from_dir.rows, key=key)
    assert [key(r) for r in a] == [key(r) for r in b] and len(a) > 40
    assert all(x.rel_err == y.rel_err and x.bytes == y.bytes for x, y in zip(a, b))
    computed: list[str] = []
    error_table(inputs.hf_dir, None, **kw, on_compute=lambda t, q: computed.append(t))
    assert computed == []  # a second run reads nothing: every entry is cached under the files' identity
