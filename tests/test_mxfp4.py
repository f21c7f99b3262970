"""gpt-oss with MXFP4 experts, as llama.cpp keeps them (issue 15).

The byte-exactness of the MXFP4 numerics on random and pathological rows is in test_formats_simple.py's
table; here: the exponent edge cases, then a tiny gpt-oss whose experts are stored as MXFP4 (the release's
``*_blocks`` / ``*_scales`` layout and ``quantization_config``) converted by llama.cpp's converter, which keeps
them MXFP4. On that GGUF, size accounting, the writer (copy and requantize) and the error table agree with
llama-quantize, and evaluating the unquantized GGUF against the checkpoint read as float gives KLD 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantmix.formats.api import dequantize, quantize
from quantmix.formats.registry import get_type
from quantmix.tools.ggml_oracle import oracle_dequantize, oracle_quantize

EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# Keeps the experts as stored and quantizes the rest (router and norms stay F32: llama-quantize never touches them).
RECIPE = [(r"_exps\.weight", "MXFP4"), (r"attn_q\.", "Q4_0"), (r"attn_k\.", "Q5_1"), (r"attn_v\.", "Q8_0"),
          (r"attn_output\.", "Q4_K"), (r"token_embd", "Q4_0"), (r"^output\.", "Q6_K"), (".*", "Q8_0")]


# ------------------------------------------------------------------------------------------------ numerics


def test_exponent_edges_match_ggml() -> None:
    """Blocks whose amax sits 0..199 ulps below every power of two (where log2f rounds up to the integer) and
    the subnormal / tiny blocks whose exponent wraps below 0: the same e8m0 byte and codes as ggml."""
    g = np.random.default_rng(0)
    rows = []
    for k in range(-149, 128):
        v = np.float32(np.ldexp(1.0, k))
        for _ in range(200):
            v = np.nextafter(v, np.float32(0), dtype=np.float32)
            blk = np.clip(g.standard_normal(32).astype(np.float32) * np.float32(0.3) * v, -v, v)
            blk[g.integers(32)] = v if g.random() < 0.5 else -v
            rows.append(blk)
    x = np.stack(rows).reshape(-1, 256)
    ours = quantize(torch.from_numpy(x), "MXFP4").numpy()
    ref = oracle_quantize(x, "MXFP4")
    assert np.array_equal(ours, ref), f"{int((ours != ref).any(1).sum())} of {len(x)} rows differ from ggml"


def test_every_scale_byte_dequantizes_as_ggml() -> None:
    """All 256 e8m0 bytes with all 16 codes (subnormal scales, overflow to inf at e = 255) bit for bit."""
    q = np.zeros((256, 17), np.uint8)
    q[:, 0] = np.arange(256)
    q[:, 1:] = (np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4))
    ours = dequantize(torch.from_numpy(q), "MXFP4", 32).numpy()
    ref = oracle_dequantize(q, "MXFP4", 32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    # the imatrix cannot change MXFP4's bytes (ggml's quantize_mxfp4 ignores it)
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    im = np.random.default_rng(2).random(64).astype(np.float32)
    assert np.array_equal(quantize(torch.from_numpy(x), "MXFP4", torch.from_numpy(im)).numpy(),
                          oracle_quantize(x, "MXFP4", im))


# ------------------------------------------------------------------------------------------------ the model


def _ggml_to_hf_blocks(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml MXFP4 bytes [..., G*17] -> the release's (blocks uint8 [..., G, 16], scales uint8 [..., G]): the same
    4-bit codes and e8m0 byte; gpt-oss packs elements 2k, 2k+1 in a byte's low, high nibble, ggml j, j+16."""
    b = q.reshape(*q.shape[:-1], -1, 17)
    qs = b[..., 1:].to(torch.int64)
    codes = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # [..., G, 32] in element order
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), b[..., 0].contiguous()


def _mxfp4_rows(w_t: torch.Tensor) -> torch.Tensor:
    """Rows [E, out, in] -> ggml MXFP4 bytes [E, out, in/32*17] (quantmix's numerics: ggml's bytes)."""
    e, o, i = w_t.shape
    return quantize(w_t.reshape(e * o, i).float().contiguous(), "MXFP4").reshape(e, o, -1)


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The float tiny-gpt-oss (vocabulary variant) with its experts stored as MXFP4, and its conversion."""
    from safetensors.torch import load_file, save_file

    from quantmix.fixtures.tiny import get_tiny
    from quantmix.tools.llamacpp import llamacpp_source

    src = get_tiny("tiny-gpt-oss", vocab=True)
    d = tmp_path_factory.mktemp("mxfp4") / "tiny-gpt-oss-mxfp4"
    shutil.copytree(src, d)
    tensors = load_file(d / "model.safetensors")
    ggml_rows: dict[str, torch.Tensor] = {}  # HF name -> ggml bytes of its stored rows [E, out, ...]
    for k in [k for k in tensors if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        w = tensors.pop(k)  # in memory [E, in, out]; the release stores [E, out, in/32, 16]
        ggml_rows[k] = q = _mxfp4_rows(w.transpose(1, 2))
        tensors[k + "_blocks"], tensors[k + "_scales"] = _ggml_to_hf_blocks(q)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    gguf = llamacpp_source().convert(d, d.parent / "tiny-gpt-oss-mxfp4-f32.gguf", "f32")
    return {"dir": d, "gguf": gguf, "ggml_rows": ggml_rows, "n_layer": cfg["num_hidden_layers"]}


def _resolution(gguf: Path, plan: list[tuple[str, str]]):  # noqa: ANN202
    from quantmix.model.catalog import catalog_from_gguf
    from quantmix.planning.recipe import RecipeSpec, Rule, resolve

    return resolve(catalog_from_gguf(gguf), RecipeSpec(ftype=None, rules=[Rule(p, t) for p, t in plan]))


def _llama_quantize(lc, src: Path, res, out: Path, *extra: str, check: bool = True):  # noqa: ANN001, ANN202
    from quantmix.planning.recipe import write_recipe

    recipe = write_recipe(res, out.with_suffix(".recipe.txt"))
    return lc.run("llama-quantize", *extra, "--tensor-type-file", recipe, src, out, "Q8_0", "2",
                  stdin=subprocess.DEVNULL, check=check)


@pytest.mark.slow
def test_converter_keeps_experts_mxfp4(mxfp4_model: dict) -> None:
    """The converter writes the experts as ggml MXFP4 without dequantizing: the bytes quantmix's numerics give
    for the float weights (gate and up de-interleaved from gate_up_proj's rows), everything else F32."""
    from quantmix.export.gguf_writer import open_source

    src = {t.name: t for t in open_source(mxfp4_model["gguf"]).tensors}
    for il in range(mxfp4_model["n_layer"]):
        gate_up = mxfp4_model["ggml_rows"][f"model.layers.{il}.mlp.experts.gate_up_proj"]
        want = {"ffn_gate_exps": gate_up[:, 0::2], "ffn_up_exps": gate_up[:, 1::2],
                "ffn_down_exps": mxfp4_model["ggml_rows"][f"model.layers.{il}.mlp.experts.down_proj"]}
        for kind, q in want.items():
            t = src[f"blk.{il}.{kind}.weight"]
            assert t.type_name == "MXFP4" and t.shape == (256, q.shape[1], 4), (t.name, t.type_name, t.shape)
            assert t.data.size == t.n_elements // 32 * 17
            assert np.array_equal(t.data, q.contiguous().numpy().reshape(-1)), t.name
    others = {t.type_name for n, t in src.items() if not any(k in n for k in EXPERTS)}
    assert others == {"F32"}


@pytest.mark.slow
def test_size_accounting_matches_llama_quantize(llamacpp, mxfp4_model: dict, tmp_path: Path) -> None:
    """Every tensor's type and bytes (experts kept MXFP4 at 17 bytes per 32) as llama-quantize writes them."""
    from quantmix.model.gguf_header import read_gguf_header
    from quantmix.planning.size import size_report

    res = _resolution(mxfp4_model["gguf"], RECIPE)
    out = tmp_path / "lq.gguf"
    _llama_quantize(llamacpp, mxfp4_model["gguf"], res, out)
    written = {t.name: (t.type_name, t.n_bytes) for t in read_gguf_header(out).tensors}
    ours = {a.tensor.name: (a.qtype, a.n_bytes) for a in res.assignments}
    assert ours == written
    assert size_report(res).n_bytes == sum(b for _, b in written.values())
    exps = [a for a in res.assignments if a.tensor.name.endswith("_exps.weight")]
    assert len(exps) == 3 * mxfp4_model["n_layer"]
    assert all(a.qtype == "MXFP4" and a.n_bytes == a.tensor.n_elements * 17 // 32 for a in exps)
    assert get_type("MXFP4").bits_per_weight() == 4.25


@pytest.mark.slow
def test_writer_identical_to_llama_quantize(llamacpp, mxfp4_model: dict, tmp_path: Path) -> None:
    """Experts kept MXFP4 (copied) and the rest quantized: byte-identical to llama-quantize's file."""
    from test_gguf_writer import _assert_same_file

    from quantmix.export.gguf_writer import quantize_gguf

    res = _resolution(mxfp4_model["gguf"], RECIPE)
    ours = quantize_gguf(mxfp4_model["gguf"], res, tmp_path / "qm.gguf", device="cpu", progress=False)
    theirs = tmp_path / "lq.gguf"
    _llama_quantize(llamacpp, mxfp4_model["gguf"], res, theirs)
    _assert_same_file(ours, theirs)


@pytest.mark.slow
def test_requantizing_mxfp4_follows_llama_quantize(llamacpp, mxfp4_model: dict, tmp_path: Path) -> None:
    """Another type for an MXFP4 tensor: refused by default, naming the tensor, as llama-quantize refuses it;
    with allow_requantize (--allow-requantize) dequantized as ggml's to_float and requantized: the same file."""
    from test_gguf_writer import _assert_same_file

    from quantmix.export.gguf_writer import GGUFWriteError, quantize_gguf

    plan = [(r"blk\.0\.ffn_down_exps", "Q4_0"), (r"blk\.1\.ffn_gate_exps", "Q8_0"), *RECIPE]
    res = _resolution(mxfp4_model["gguf"], plan)
    with pytest.raises(GGUFWriteError, match=r"tensor blk\.0\.ffn_down_exps\.weight is stored as MXFP4 and the "
                                             r"recipe asks for Q4_0: requantizing is disabled"):
        quantize_gguf(mxfp4_model["gguf"], res, tmp_path / "no.gguf", device="cpu", progress=False)
    assert not (tmp_path / "no.gguf").exists()
    refused = _llama_quantize(llamacpp, mxfp4_model["gguf"], res, tmp_path / "lq-no.gguf", check=False)
    assert refused.returncode != 0 and "requantizing from type mxfp4 is disabled" in refused.stdout + refused.stderr
    ours = quantize_gguf(mxfp4_model["gguf"], res, tmp_path / "qm.gguf", device="cpu", progress=False,
                         allow_requantize=True)
    theirs = tmp_path / "lq.gguf"
    _llama_quantize(llamacpp, mxfp4_model["gguf"], res, theirs, "--allow-requantize")
    _assert_same_file(ours, theirs)


@pytest.mark.slow
def test_error_table_reads_mxfp4_sources(mxfp4_model: dict, tmp_path: Path) -> None:
    """The error table measures an MXFP4 tensor from its dequantized values: keeping MXFP4 costs nothing."""
    from quantmix.measurement.error_table import error_table

    name = "blk.1.ffn_down_exps.weight"
    table = error_table(mxfp4_model["gguf"], candidates=["Q4_0", "MXFP4"], device="cpu", cache=False,
                        progress=False, tensors=[name])
    rel = {r.type: r.rel_err for r in table.rows if r.tensor == name}
    assert rel["MXFP4"] == 0.0 and 0 < rel["Q4_0"] < 0.1, rel


@pytest.mark.slow
def test_eval_of_mxfp4_gguf_matches_the_checkpoint(mxfp4_model: dict, tmp_path: Path) -> None:
    """The unquantized GGUF (MXFP4 experts as stored, the rest F32) against the checkpoint read as float:
    the same weights, so KLD 0 (eval's loader dequantizes MXFP4 with quantmix's numerics)."""
    from quantmix.evaluation.evaluate import evaluate, gguf_source
    from quantmix.export.gguf_writer import quantize_gguf
    from quantmix.fixtures.text import read_text

    text = tmp_path / "wiki-eval-head.txt"
    text.write_text(read_text("wiki-eval")[:20_000], encoding="utf-8")

    def kld(gguf: Path) -> float:
        res = evaluate(mxfp4_model["dir"], gguf_source(gguf), text, n_ctx=128, max_chunks=2, device="cpu",
                       act_quant="none", reference_cache=tmp_path / "ref")
        assert res.stats.n_tokens == 2 * 63
        return res.stats.kld

    same = kld(mxfp4_model["gguf"])
    print(f"KLD of the MXFP4 GGUF against the checkpoint: {same:.3g}")
    assert abs(same) < 1e-9, same
    # control: the experts alone requantized to Q4_0 (the rest F32) move the distribution
    res = _resolution(mxfp4_model["gguf"], [(r"_exps\.weight", "Q4_0"), (".*", "F32")])
    q4 = quantize_gguf(mxfp4_model["gguf"], res, tmp_path / "q4.gguf", device="cpu", progress=False,
                       allow_requantize=True)
    control = kld(q4)
    print(f"KLD with the experts requantized to Q4_0: {control:.3g}")
    assert control > 1e-4


@pytest.mark.slow
def test_writer_from_the_directory_equals_from_the_conversion(mxfp4_model: dict, tmp_path: Path) -> None:
    """Written straight from the Hugging Face directory (no F32 GGUF: the MXFP4 experts repacked from the
    release's blocks as the converter repacks them), the GGUF is the bytes written from the converter's output."""
    from quantmix.export.gguf_writer import quantize_gguf

    res = _resolution(mxfp4_model["gguf"], RECIPE)
    a = quantize_gguf(mxfp4_model["gguf"], res, tmp_path / "from-gguf.gguf", device="cpu", progress=False)
    b = quantize_gguf(mxfp4_model["dir"], res, tmp_path / "from-dir.gguf", device="cpu", progress=False)
    assert a.read_bytes() == b.read_bytes()
