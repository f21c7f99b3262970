"""Budgets: sizes parsed exactly, KV-cache bytes equal to what llama.cpp allocates (its own log line is the
oracle: dense GQA, MLA, and GLM's NextN layer), the compute margin bounds llama.cpp's compute buffer, where
tensors live, and the largest context a recipe leaves room for."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantmix.model.catalog import Catalog, catalog_from_config, catalog_from_gguf
from quantmix.paths import cache_dir, file_lock
from quantmix.planning.budget import (
    GIB,
    MIB,
    Budget,
    BudgetError,
    ComputeMargin,
    Placement,
    add_budget_arguments,
    bpw_bytes,
    budget_from_args,
    cuda_alloc_bytes,
    kv_cache,
    max_context,
    parse_size,
    usage,
)
from quantmix.planning.recipe import RecipeSpec, resolve

# ------------------------------------------------------------------------------------------------ sizes


def test_parse_size_binary_and_decimal_exact() -> None:
    assert parse_size("24GiB") == 24 * 1024**3
    assert parse_size("24 GB") == 24_000_000_000
    assert parse_size("1.5MiB") == 1_572_864
    assert parse_size("0.1GB") == 100_000_000  # decimal-exact, no float drift
    assert parse_size("1.3MiB") == 1_363_148  # 1363148.8 rounded down: a budget never grows
    assert parse_size("1000") == 1000 and parse_size("1000B") == 1000 and parse_size("2tib") == 2 * 1024**4
    for bad, msg in (("24G", "GiB for powers of 1024"), ("lots", "expected a number"), ("-3GB", "expected a number"),
                     ("3 parsecs", "unknown unit")):
        with pytest.raises(BudgetError, match=msg):
            parse_size(bad)


def test_bpw_budget_counts_all_elements() -> None:
    from quantmix.fixtures.tiny import get_tiny

    cat = catalog_from_config(get_tiny("tiny-glm4-moe"))
    n = cat.n_elements
    assert bpw_bytes(cat, "3.5") == (35 * n) // 80
    assert bpw_bytes(cat, 3.5) == bpw_bytes(cat, "3.5")
    assert Budget.of_bpw(cat, "4").pools[0].capacity == n // 2
    with pytest.raises(BudgetError, match="positive"):
        bpw_bytes(cat, 0)
    for bad in ("inf", float("inf"), "nan", float("nan"), "-Infinity"):
        with pytest.raises(BudgetError, match="--target-bpw .*finite number"):
            bpw_bytes(cat, bad)


# --------------------------------------------------------------------------- KV cache vs llama.cpp

_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                      r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_COMPUTE_LINE = re.compile(r"CPU compute buffer size = +([\d.]+) MiB")


def _llama_report(llamacpp, gguf: Path, *args: str) -> tuple[dict[str, float | int | str], float]:
    """Create a context with llama-perplexity and read what it allocated (the KV line, the compute buffer).
    The text is too short to score, which it only finds out after the context exists."""
    text = gguf.parent / "kv-probe.txt" if os.access(gguf.parent, os.W_OK) else Path("/tmp/kv-probe.txt")
    text.write_text("A short text.\n")
    proc = subprocess.run([str(llamacpp.tool("llama-perplexity")), "-m", str(gguf), "-f", str(text), "--no-repack",
                           "-t", "2", "-lv", "4", *args], check=False, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    m = _KV_LINE.search(out)
    assert m, f"no llama_kv_cache line in llama-perplexity's output:\n{out[-3000:]}"
    c = _COMPUTE_LINE.search(out)
    assert c, out[-3000:]
    kv = {"total": float(m.group(1)), "cells": int(m.group(2)), "layers": int(m.group(3)), "seqs": int(m.group(4)),
              "k_type": m.group(6), "k": float(m.group(7)), "v_type": m.group(8), "v": float(m.group(9))}
    return kv, float(c.group(1))


def _check_kv(ours, theirs: dict) -> None:
    assert ours.n_ctx == theirs["cells"] and ours.n_layers == theirs["layers"]
    assert ours.type_k.lower() == theirs["k_type"] and ours.type_v.lower() == theirs["v_type"]
    assert f"{ours.k_bytes / MIB:.2f}" == f"{theirs['k']:.2f}"  # llama.cpp prints %.2f MiB
    assert f"{ours.v_bytes / MIB:.2f}" == f"{theirs['v']:.2f}"
    assert f"{ours.n_bytes / MIB:.2f}" == f"{theirs['total']:.2f}"


@pytest.mark.slow
@pytest.mark.parametrize("ctk,ctv,ctx,fa", [("f16", "f16", 2048, "off"), ("q8_0", "q8_0", 2048, "on"),
                                           ("q8_0", "q4_0", 2000, "on"), ("f16", "f16", 8192, "off"),
                                           ("f16", "f16", 8192, "on")])
def test_kv_cache_and_margin_match_llama_cpp_smollm(llamacpp, ctk: str, ctv: str, ctx: int, fa: str) -> None:
    """SmolLM2 (30 layers, 3 KV heads of 64): f16, q8_0 (34 bytes per 32) and a mixed cache; -c 2000 is
    padded to 2048 cells as llama.cpp pads it. The stated compute-buffer estimate is not below the compute
    buffer llama.cpp reserves (CPU backend, same graph), with flash attention and without."""
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture("smollm2-768")
    cat = catalog_from_gguf(fx.gguf_f32)
    theirs, compute_mib = _llama_report(llamacpp, fx.gguf_f32, "-c", str(ctx), "-b", str(ctx), "-ctk", ctk,
                                        "-ctv", ctv, "-fa", fa)
    _check_kv(kv_cache(cat.hparams, ctx, ctk, ctv), theirs)
    assert catalog_from_config(fx.hf_dir).hparams == cat.hparams  # the config-only catalog sizes it the same
    est = ComputeMargin(flash_attn=fa == "on").graph_bytes(cat.hparams, theirs["cells"])
    assert compute_mib * MIB <= est <= 2 * compute_mib * MIB


@pytest.mark.slow
def test_kv_cache_parallel_streams_match_llama_cpp(llamacpp) -> None:
    """llama-perplexity at -c 512 runs 4 sequences (-b 2048): 4 non-unified streams of 512 cells each."""
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture("smollm2-768")
    cat = catalog_from_gguf(fx.gguf_f32)
    theirs, _ = _llama_report(llamacpp, fx.gguf_f32, "-c", "512", "-b", "2048")
    assert theirs["seqs"] == 4
    _check_kv(kv_cache(cat.hparams, 2048, "f16", n_seq=4, unified=False), theirs)


# A converter run that writes a "none" tokenizer (llama.cpp loads such a model) for the tiny random models,
# which have no vocabulary: enough to create a context and read the KV cache llama.cpp allocates.
_CONVERT = '''
import sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, str(root / "gguf-py")); sys.path.insert(0, str(root))
import convert_hf_to_gguf
real = convert_hf_to_gguf.get_model_class
def set_vocab(self):
    self.gguf_writer.add_tokenizer_model("none")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
def patched(*a, **k):
    cls = real(*a, **k)
    return type(cls.__name__, (cls,), {"set_vocab": set_vocab, "model_arch": cls.model_arch})
convert_hf_to_gguf.get_model_class = patched
for model_dir, out in zip(sys.argv[2::2], sys.argv[3::2]):
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "f32"]
    convert_hf_to_gguf.main()
'''


def _tiny_ggufs(llamacpp, names: tuple[str, ...]) -> dict[str, Path]:
    """f32 GGUFs of tiny models, converted once and cached (keyed by the config, this script, llama.cpp)."""
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.tools.llamacpp import SDIST_VERSION

    root = cache_dir() / "tests" / "budget"
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    todo = []
    for n in names:
        src = get_tiny(n)
        key = hashlib.sha256((_CONVERT + SDIST_VERSION + (src / "config.json").read_text()).encode()).hexdigest()
        out[n] = root / f"{n}-{key[:16]}.gguf"
        if not out[n].exists():
            todo.append((src, out[n]))
    if todo:
        with file_lock("tests-budget-tiny-gguf"):
            todo = [(s, o) for s, o in todo if not o.exists()]
            if todo:
                script = root / ".convert_none_vocab.py"
                script.write_text(_CONVERT)
                args = [str(x) for s, o in todo for x in (s, o.with_name(f".{o.name}.tmp"))]
                env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
                proc = subprocess.run([sys.executable, str(script), str(llamacpp.root), *args],
                                      check=False, capture_output=True, text=True, env=env)
                assert proc.returncode == 0, proc.stderr[-3000:]
                for _, o in todo:
                    os.replace(o.with_name(f".{o.name}.tmp"), o)
    return out


@pytest.mark.slow
def test_kv_cache_mla_and_nextn_match_llama_cpp(llamacpp) -> None:
    """DeepSeek-V3's MLA caches one latent row (kv_lora_rank + rope dim) per token in K and no V; GLM-4.5's
    NextN layer gets no cache in the main context (llama.cpp filters it out)."""
    from quantmix.fixtures.tiny import get_tiny

    ggufs = _tiny_ggufs(llamacpp, ("tiny-deepseek-v3", "tiny-glm4-moe"))
    for name, (ctk, ctv) in (("tiny-deepseek-v3", ("f16", "f16")), ("tiny-deepseek-v3", ("q8_0", "q8_0")),
                             ("tiny-glm4-moe", ("q8_0", "f16"))):
        cat = catalog_from_config(get_tiny(name))
        theirs, _ = _llama_report(llamacpp, ggufs[name], "-c", "512", "-b", "512", "-ctk", ctk, "-ctv", ctv)
        ours = kv_cache(cat.hparams, 512, ctk, ctv)
        _check_kv(ours, theirs)
        if name == "tiny-deepseek-v3":
            assert ours.v_bytes == 0 and ours.k_bytes == 3 * 512 * (256 + 64) * (2 if ctk == "f16" else 34 / 32)
        else:
            assert cat.hparams.n_nextn == 1 and ours.n_layers == cat.hparams.n_layer - 1


# ----------------------------------------------------------------------------------- placement, VRAM


def _cat(name: str) -> Catalog:
    from quantmix.fixtures.tiny import get_tiny

    return catalog_from_config(get_tiny(name))


def test_residence_follows_llama_cpp() -> None:
    glm = _cat("tiny-glm4-moe")
    r = Placement(r"ffn_.*_exps").residence(glm)
    assert r["token_embd.weight"] == ("cpu",)  # the input layer always stays on the CPU
    assert r["blk.1.ffn_down_exps.weight"] == ("cpu",) and r["blk.1.attn_q.weight"] == ("gpu",)
    assert r["output.weight"] == ("gpu",)
    assert r["blk.3.nextn.eh_proj.weight"] == () and r["blk.3.ffn_up_exps.weight"] == ()  # NextN: not loaded
    assert Placement(r"ffn_.*_exps", mtp=True).residence(glm)["blk.3.nextn.eh_proj.weight"] == ("gpu",)
    tied = _cat("tiny-llama")  # tied embeddings: the output layer gets its own copy on the GPU
    assert "output.weight" not in tied.by_name()
    assert Placement().residence(tied)["token_embd.weight"] == ("cpu", "gpu")
    assert Placement(r"ffn_.*_exps").override_tensor_arg() == '-ot "ffn_.*_exps=CPU"'


def test_cuda_alloc_bytes_padding_and_alignment() -> None:
    assert cuda_alloc_bytes("Q4_K", (1536, 256)) == 256 * 6 * 144  # rows are a multiple of 512: no padding
    # 576-wide Q8_0 rows: one padded partial row of 448 values (14 blocks of 34 bytes), then 128-alignment
    assert cuda_alloc_bytes("Q8_0", (576, 3)) == -(-(3 * 18 * 34 + 14 * 34) // 128) * 128
    assert cuda_alloc_bytes("F16", (576, 3)) == -(-(3 * 576 * 2) // 128) * 128  # float types are not padded


def test_vram_budget_and_max_context() -> None:
    glm = _cat("tiny-glm4-moe")
    margin = ComputeMargin(overhead=4 * MIB)
    b = Budget.of_memory(glm, "64MiB", 4096, "q8_0", margin=margin)
    kv = kv_cache(glm.hparams, 4096, "q8_0")
    assert b.pools[0].capacity == 64 * MIB - kv.vram_bytes - margin.total(glm.hparams, 4096)
    res = resolve(glm, RecipeSpec(ftype="Q4_K_M"))
    need = usage(b, res)[0]
    n = max_context(glm, res, "64MiB", "q8_0", margin=margin)
    assert n % 256 == 0

    def total(ctx: int) -> int:
        return need + kv_cache(glm.hparams, ctx, "q8_0").vram_bytes + margin.total(glm.hparams, ctx)

    assert total(n) <= 64 * MIB < total(n + 256)
    assert max_context(glm, need, "64MiB", "q8_0", margin=margin) == n
    with pytest.raises(BudgetError, match="does not fit"):
        max_context(glm, res, "5MiB", "q8_0", margin=margin)


def test_budget_cli_options() -> None:
    glm = _cat("tiny-glm4-moe")
    p = argparse.ArgumentParser()
    add_budget_arguments(p)

    def build(*argv: str) -> Budget:
        return budget_from_args(p.parse_args(list(argv)), glm)

    assert build("--target-size", "1GiB").pools[0].capacity == GIB
    two = build("--vram", "1GiB", "--ram", "2GiB", "--ctx", "1024", "--kv-type", "q8_0", "--target-size", "3GiB")
    assert [x.name for x in two.pools] == ["vram", "ram", "file"]
    assert two.override_tensor_arg() == '-ot "ffn_.*_exps=CPU"'
    for argv, msg in ((["--vram", "1GiB"], "needs --ctx"), (["--ram", "1GiB"], "--ram needs --vram"),
                      (["--target-bpw", "3", "--target-size", "1GiB"], "exactly one"),
                      (["--vram", "1GiB", "--ctx", "10", "--kv-type", "q3_k"], "llama.cpp accepts"),
                      (["--vram", "1MiB", "--ctx", "100000"], "nothing is left for weights")):
        with pytest.raises(BudgetError, match=msg):
            build(*argv)
