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


@pytest.mark.parametrize("name", ["tiny-glm4-moe", "tiny-deepseek-v3", "tiny-llama"])
def test_quantize_straight_from_the_directory(name: str, tmp_path) -> None:
    """The GGUF written from the Hugging Face directory (the converter's header, tensors read from the
    safetensors) is byte-identical to the one written from the converter's F32 GGUF, which the architecture
    tests hold byte-identical to llama-quantize's; the header file used takes almost no disk."""
    import os

    from quantmix.export.gguf_writer import quantize_gguf
    from quantmix.job import resolve_model
    from quantmix.model.hf_tensors import converted_metadata
    from quantmix.planning.recipe import RecipeSpec, Rule

    inputs = resolve_model(name)
    spec = RecipeSpec(ftype=None, rules=[Rule(r"ffn_(gate|up)", "Q4_K"), Rule(r"ffn_down", "Q6_K"),
                                         Rule(r"attn_", "Q5_0"), Rule(".*", "Q8_0")], label="mix")
    a = quantize_gguf(inputs.gguf, spec, tmp_path / "from-gguf.gguf", progress=False, device="cpu")
    b = quantize_gguf(inputs.hf_dir, spec, tmp_path / "from-dir.gguf", progress=False, device="cpu")
    assert a.read_bytes() == b.read_bytes()
    meta = converted_metadata(inputs.hf_dir)
    assert os.stat(meta).st_blocks * 512 < os.path.getsize(inputs.gguf) / 4


def test_optimize_and_quantize_without_an_f32_copy(tmp_path, monkeypatch) -> None:
    """`quantmix optimize DIR --f32-copy no` plans and writes from the directory; only the converter's header
    is cached, no F32 GGUF; the GGUF equals `quantmix quantize` of the same recipe from the converted file."""
    from quantmix.cli import main
    from quantmix.fixtures.tiny import get_tiny

    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path / "cache"))
    hf = get_tiny("tiny-qwen3-moe", vocab=True)
    recipe, out = tmp_path / "r.txt", tmp_path / "o.gguf"
    assert main(["optimize", str(hf), "--f32-copy", "no", "--target-bpw", "5.0", "--sensitivity", "none",
                 "--device", "cpu", "-o", str(recipe), "--gguf-out", str(out), "--quiet"]) == 0
    conv = tmp_path / "cache" / "converted"
    assert list(conv.glob("*.meta.gguf")) and not list(conv.glob("*-f32.gguf"))
    again = tmp_path / "again.gguf"
    assert main(["quantize", str(hf), "--recipe", str(recipe), "-o", str(again), "--device", "cpu",
                 "--quiet"]) == 0
    assert out.read_bytes() == again.read_bytes()
