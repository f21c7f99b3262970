"""quantmix's GGUF writer against llama-quantize: for the same recipe (and imatrix), the same file, byte for byte.

Recipes mix k-quants, 32-block types, F16/BF16 and F32 (copied) tensors. Which tensors get the slow types is
chosen so the tests stay fast on 2 cores: most of each model stays F32 (a copy for both tools), while every
type quantmix has numerics for appears at least once, and on smollm2-135m (576-wide rows) the 256-block types
fall back exactly as llama.cpp falls back.
"""

from __future__ import annotations

import filecmp
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantmix.calibration.imatrix_io import ImatrixError, read_imatrix
from quantmix.export.gguf_writer import (
    GGUFWriteError,
    open_source,
    parse_split_size,
    quantize_gguf,
    split_shard_paths,
)
from quantmix.formats.api import supported_types
from quantmix.model.gguf_header import read_gguf_header
from quantmix.planning.llama_rules import llama_tensor_order
from quantmix.model.catalog import catalog_from_gguf
from quantmix.paths import cache_dir, file_lock
from quantmix.planning.recipe import RecipeSpec, Rule, resolve, write_recipe

SUPPORT = Path(__file__).parent / "support" / "convert_no_vocab.py"

# Metadata that may legitimately differ from llama-quantize's: the imatrix path as each tool was given it.
# (The tests give both tools the same path, so the files are identical.)
LEGIT_KV_DIFFERENCES = frozenset({"quantize.imatrix.file"})

# One tensor per type (layer, kind), small tensors for the slow quantizers; everything else stays F32.
_TYPE_PLAN = [
    (r"blk\.0\.attn_q\.", "Q4_K"), (r"blk\.0\.attn_k\.", "Q5_K"), (r"blk\.0\.attn_v\.", "Q6_K"),
    (r"blk\.0\.attn_output\.", "Q3_K"), (r"blk\.1\.attn_k\.", "Q2_K"), (r"blk\.1\.attn_v\.", "Q4_0"),
    (r"blk\.2\.attn_v\.", "Q4_1"), (r"blk\.3\.attn_v\.", "Q5_0"), (r"blk\.4\.attn_v\.", "Q5_1"),
    (r"blk\.5\.attn_v\.", "IQ4_NL"), (r"blk\.6\.attn_v\.", "IQ4_XS"), (r"blk\.7\.attn_v\.", "Q8_0"),
    (r"blk\.8\.attn_v\.", "F16"), (r"blk\.9\.attn_v\.", "BF16"), (r"blk\.10\.ffn_down\.", "Q6_K"),
    (r"blk\.11\.ffn_gate\.", "Q8_0"), (r"blk\.12\.attn_v\.", "IQ3_S"),
]


def _rules(plan: list[tuple[str, str]] = _TYPE_PLAN) -> tuple[list[Rule], list[str]]:
    """Rules for the types quantmix has numerics for, a catch-all F32; and the types skipped (not yet
    registered: they join the recipe by themselves once formats registers them)."""
    have = set(supported_types())
    rules = [Rule(p, t) for p, t in plan if t in have]
    skipped = [t for _, t in plan if t not in have]
    return rules + [Rule(".*", "F32")], skipped


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def lc():
    from quantmix.tools.llamacpp import ensure_llamacpp

    return ensure_llamacpp()


def _converted_tiny(lc, name: str) -> Path:
    """llama.cpp's converter on a tiny random model (vocabulary skipped), cached as test_catalog caches it."""
    from quantmix.fixtures.tiny import get_tiny

    out = cache_dir() / "fixtures" / "tiny" / f"{name}.gguf"
    with file_lock(f"tiny-gguf-{name}"):
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            subprocess.run([sys.executable, str(SUPPORT), str(lc.root), str(get_tiny(name)), str(tmp)],
                           check=True, capture_output=True)
            tmp.replace(out)
    return out


def _fixture_gguf(name: str) -> Path:
    from quantmix.fixtures.store import get_fixture

    return get_fixture(name).gguf_f32


def imatrix_file(lc, model: str, fmt: str = "gguf") -> Path:
    """llama-imatrix on wiki-calib (4 chunks of 128 tokens), cached under a key of its inputs."""
    from quantmix.fixtures.store import fixture_dir
    from quantmix.fixtures.text import text_path

    src = _fixture_gguf(model)
    text = text_path("wiki-calib")
    h = hashlib.sha256()
    for part in ((fixture_dir(model) / "build.stamp").read_bytes(), text.read_bytes(), b"chunks4-c128",
                 str(lc.root).encode()):
        h.update(part)
    d = cache_dir() / "tests" / "imatrix"
    d.mkdir(parents=True, exist_ok=True)
    gg = d / f"{model}-{h.hexdigest()[:16]}.gguf"
    with file_lock(f"imatrix-{model}"):
        if not gg.exists():
            tmp = gg.with_name(gg.stem + ".tmp.gguf")
            lc.run("llama-imatrix", "-m", src, "-f", text, "--chunks", "4", "-c", "128", "--no-repack", "-t", "2",
                   "-o", tmp, stdin=subprocess.DEVNULL)
            tmp.replace(gg)
        if fmt == "gguf":
            return gg
        dat = gg.with_suffix(".dat")
        if not dat.exists():
            tmp = dat.with_name(dat.stem + ".tmp.dat")
            lc.run("llama-imatrix", "-m", src, "--in-file", gg, "-o", tmp, "--output-format", "dat", "-c", "128",
                   stdin=subprocess.DEVNULL)
            tmp.replace(dat)
        return dat


def _llama_quantize(lc, src: Path, resolution, out: Path, imatrix: Path | None = None) -> Path:
    recipe = write_recipe(resolution, out.with_suffix(".recipe.txt"))
    args = ["--imatrix", str(imatrix)] if imatrix is not None else []
    lc.run("llama-quantize", *args, "--tensor-type-file", recipe, src, out, "Q8_0", "2", stdin=subprocess.DEVNULL)
    return out


def _describe_difference(a: Path, b: Path) -> str:
    """Where two GGUFs differ: key-values, tensor order, types, bytes."""
    sa, sb = open_source(a), open_source(b)
    kv_a, t_a, kv_b, t_b = sa.kv, sa.tensors, sb.kv, sb.tensors
    out = []
    if list(kv_a) != list(kv_b):
        out.append(f"key order differs:\n {list(kv_a)}\n {list(kv_b)}")
    out += [f"key {k} differs" for k in kv_a if k in kv_b and kv_a[k] != kv_b[k]]
    if [t.name for t in t_a] != [t.name for t in t_b]:
        out.append("tensor order differs")
    tb = {t.name: t for t in t_b}
    for t in t_a:
        u = tb.get(t.name)
        if u is None:
            out.append(f"{t.name} missing")
        elif (t.type_name, t.shape) != (u.type_name, u.shape):
            out.append(f"{t.name}: {t.type_name}{list(t.shape)} vs {u.type_name}{list(u.shape)}")
        elif not np.array_equal(t.data, u.data):
            out.append(f"{t.name} ({t.type_name}): bytes differ")
    return "\n".join(out[:20]) or "headers equal, data/padding differ"


def _assert_same_file(a: Path, b: Path) -> None:
    assert a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False), _describe_difference(a, b)


def _tensors_equal(a: list[Path], b: list[Path]) -> None:
    ta = {t.name: t for t in open_source(a[0]).tensors}
    tb = {t.name: t for t in open_source(b[0]).tensors}
    assert list(ta) == list(tb)
    for name, t in ta.items():
        u = tb[name]
        assert (t.type_name, t.shape) == (u.type_name, u.shape), name
        assert np.array_equal(t.data, u.data), name


# ------------------------------------------------------------------------------------------------ tests


def test_llama_tensor_order() -> None:
    names = ["token_embd.weight", "blk.10.attn_q.weight", "blk.2.ffn_up.weight", "output.weight",
             "blk.2.attn_k.weight", "output_norm.weight"]
    assert llama_tensor_order(names) == ["output.weight", "output_norm.weight", "token_embd.weight",
                                         "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


@pytest.mark.slow
def test_tiny_llama_every_type_identical_to_llama_quantize(lc, tmp_path: Path) -> None:
    """Every registered type (several layers each) on a small llama: the whole file equals llama-quantize's."""
    src = _converted_tiny(lc, "tiny-llama")
    have = set(supported_types())
    plan = [(r"attn_q\.", "Q4_K"), (r"attn_k\.", "Q5_K"), (r"attn_v\.", "Q6_K"), (r"attn_output", "Q3_K"),
            (r"blk\.0\.ffn_up", "Q2_K"), (r"blk\.1\.ffn_up", "Q4_1"), (r"blk\.0\.ffn_gate", "IQ4_NL"),
            (r"blk\.1\.ffn_gate", "Q5_0"), (r"blk\.0\.ffn_down", "IQ4_XS"), (r"blk\.1\.ffn_down", "Q5_1"),
            (r"token_embd", "Q4_0"), (".*", "F16")]
    plan.insert(0, (r"blk\.1\.attn_output", "BF16"))
    rules = [Rule(p, t) for p, t in plan if t in have]
    res = resolve(catalog_from_gguf(src), RecipeSpec(ftype=None, rules=rules))
    ours = quantize_gguf(src, res, tmp_path / "qm.gguf", progress=False)
    theirs = _llama_quantize(lc, src, res, tmp_path / "lq.gguf")
    _assert_same_file(ours, theirs)
    tensors = open_source(ours).tensors
    assert {t.type_name for t in tensors} >= {t for _, t in plan if t in have} - {"F16"}


@pytest.mark.slow
@pytest.mark.parametrize("model,imatrix_kind", [
    ("smollm2-768", None), ("smollm2-135m", None), ("smollm2-135m", "gguf"), ("smollm2-768", "dat"),
])
def test_smollm2_identical_to_llama_quantize(lc, tmp_path: Path, model: str, imatrix_kind: str | None) -> None:
    """Same recipe, same imatrix (GGUF or legacy .dat): quantmix's file equals llama-quantize's byte for byte
    (tensor bytes, tensor order, every key-value). On smollm2-135m the 256-block types fall back."""
    src = _fixture_gguf(model)
    imat = imatrix_file(lc, model, imatrix_kind) if imatrix_kind else None
    rules, skipped = _rules()
    if skipped:
        print(f"types without numerics yet, left out of the recipe: {skipped}")
    res = resolve(catalog_from_gguf(src), RecipeSpec(ftype=None, rules=rules), imatrix_present=imat is not None)
    if model == "smollm2-135m":
        assert res.fallbacks, "576-wide rows should make k-quants fall back"
    ours = quantize_gguf(src, res, tmp_path / "qm.gguf", imatrix=imat, progress=False)
    theirs = _llama_quantize(lc, src, res, tmp_path / "lq.gguf", imat)
    kv_a, kv_b = open_source(ours).kv, open_source(theirs).kv
    assert set(kv_a) == set(kv_b)
    assert [k for k in kv_a if kv_a[k] != kv_b[k]] == []  # LEGIT_KV_DIFFERENCES only if the paths differed
    if imat is not None:
        assert "quantize.imatrix.entries_count" in kv_a
    _assert_same_file(ours, theirs)
    if model == "smollm2-135m" and imatrix_kind == "gguf":
        from quantmix.evaluation.perplexity import run_llama_perplexity
        from quantmix.fixtures.text import text_path

        r = run_llama_perplexity(ours, text_path("wiki-eval"), n_ctx=128, max_chunks=2)
        assert r.n_chunks == 2 and 1.0 < r.ppl < 1000.0


@pytest.mark.slow
def test_moe_per_expert_imatrix_identical_to_llama_quantize(lc, tmp_path: Path) -> None:
    """3-D expert tensors with a per-expert imatrix (one expert never routed: count 0 -> weight 1.0), written in
    llama-imatrix's GGUF format; both tools read it."""
    import gguf

    src = _converted_tiny(lc, "tiny-qwen2-moe")
    cat = catalog_from_gguf(src)
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(tmp_path / "imat.gguf"), arch="")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 128)
    for t in cat:
        if not t.quantizable or t.name in ("token_embd.weight", "output.weight"):
            continue
        n_mat = t.shape[2] if len(t.shape) == 3 else 1
        counts = np.full((n_mat, 1), 384.0, dtype=np.float32)
        if n_mat > 1:
            counts[1, 0] = 0.0
            counts[2, 0] = 129.0
        sums = (rng.random((n_mat, t.shape[0]), dtype=np.float32) * 50.0) * (counts > 0)
        w.add_tensor(t.name + ".in_sum2", sums.astype(np.float32))
        w.add_tensor(t.name + ".counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    imat = tmp_path / "imat.gguf"
    im = read_imatrix(imat)
    exps = next(n for n in im.entries if "_exps" in n)
    assert im.entries[exps].n_mat == 4 and np.all(im.weights(exps)[1] == 1.0)

    plan = [(r"ffn_up_exps", "Q6_K"), (r"ffn_gate_exps", "IQ4_XS"), (r"ffn_down_exps", "Q4_0"),
            (r"shexp", "Q8_0"), (r"attn_v", "Q3_K"), (r"attn_k", "IQ4_NL"), (r"attn_q", "Q2_K"),
            (r"attn_output", "Q4_K"), (r"token_embd", "Q5_K")]
    rules, _ = _rules(plan)
    res = resolve(cat, RecipeSpec(ftype=None, rules=rules), imatrix_present=True)
    ours = quantize_gguf(src, res, tmp_path / "qm.gguf", imatrix=imat, progress=False)
    theirs = _llama_quantize(lc, src, res, tmp_path / "lq.gguf", imat)
    _assert_same_file(ours, theirs)


@pytest.mark.slow
def test_legacy_and_gguf_imatrix_agree(lc) -> None:
    """The legacy .dat stores mean*ncall; both readers give the same weights up to float rounding."""
    g = read_imatrix(imatrix_file(lc, "smollm2-768"))
    d = read_imatrix(imatrix_file(lc, "smollm2-768", "dat"))
    assert d.is_legacy and not g.is_legacy and set(g.entries) == set(d.entries) and d.chunk_count == g.chunk_count
    for name in list(g.entries)[:20]:
        np.testing.assert_allclose(d.weights(name), g.weights(name), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_split_output_and_split_input(lc, tmp_path: Path) -> None:
    """gguf-split layout out (merged back by llama-gguf-split equals the unsplit file's tensors) and in
    (a split F32 source quantizes to the very same file as the whole one)."""
    src = _converted_tiny(lc, "tiny-llama")
    res = resolve(catalog_from_gguf(src), RecipeSpec(ftype=None, rules=[Rule("ffn", "Q4_0"), Rule(".*", "Q8_0")]))
    whole = quantize_gguf(src, res, tmp_path / "whole.gguf", progress=False)

    first = quantize_gguf(src, res, tmp_path / "part.gguf", split_max_size=parse_split_size("300000"), progress=True)
    shards = sorted(tmp_path.glob("part-*-of-*.gguf"))
    assert first == shards[0] and len(shards) >= 3
    assert shards == split_shard_paths(tmp_path / "part.gguf", len(shards))
    for i, shard in enumerate(shards):
        h = read_gguf_header(shard, all_shards=False)
        kv = h.raw_fields
        assert list(kv)[-3:] == ["split.no", "split.count", "split.tensors.count"]
        assert (i == 0) == ("general.architecture" in kv)
        assert h.tensor_bytes <= 300_000 or len(h.tensors) == 1
    merged = tmp_path / "merged.gguf"
    lc.run("llama-gguf-split", "--merge", shards[0], merged, stdin=subprocess.DEVNULL)
    _tensors_equal([merged], [whole])
    assert catalog_from_gguf(shards[1]).by_name().keys() == catalog_from_gguf(whole).by_name().keys()

    split_src = tmp_path / "src"
    split_src.mkdir()
    lc.run("llama-gguf-split", "--split", "--split-max-size", "2M", src, split_src / "f32", stdin=subprocess.DEVNULL)
    src_shards = sorted(split_src.glob("f32-*.gguf"))
    assert len(src_shards) > 1
    again = quantize_gguf(src_shards[-1], res, tmp_path / "from-split.gguf", progress=False)
    _assert_same_file(again, whole)


def test_parse_split_size() -> None:
    assert parse_split_size("45G") == 45 * 10**9 and parse_split_size("300M") == 3 * 10**8
    assert parse_split_size("1234") == 1234
    for bad in ("0G", "-1M", "12K", "G", ""):
        with pytest.raises(GGUFWriteError, match="split size"):
            parse_split_size(bad)


def _entries(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


@pytest.mark.slow
def test_failure_midway_leaves_nothing(lc, tmp_path: Path) -> None:
    """An interrupt at tensor k, or a bad tensor (NaN) found while writing, leaves no output; nothing at all
    when no progress was saved yet (a split output keeps its finished shards, hidden, and the same call completes
    them with the bytes of an uninterrupted run); an existing output from before stays untouched."""
    src = _converted_tiny(lc, "tiny-llama")
    res = resolve(catalog_from_gguf(src), RecipeSpec(ftype=None, rules=[Rule(".*", "Q4_0")]))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def stop_at(k: int):
        def hook(i: int, name: str) -> None:
            if i == k:
                raise KeyboardInterrupt
        return hook

    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(src, res, out_dir / "m.gguf", progress=False, on_tensor=stop_at(7))
    assert _entries(out_dir) == set()
    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(src, res, out_dir / "m.gguf", split_max_size=200_000, progress=False, on_tensor=stop_at(12))
    # the shards finished before the interrupt are kept (hidden) for the same call to continue from
    kept = _entries(out_dir)
    assert kept and all(n.startswith(".m-") and ".partial" in n for n in kept), kept
    first = quantize_gguf(src, res, out_dir / "m.gguf", split_max_size=200_000, progress=False)
    shards = sorted(_entries(out_dir))
    assert all(not n.startswith(".") for n in shards) and first.name == shards[0]
    ref = quantize_gguf(src, res, tmp_path / "ref.gguf", split_max_size=200_000, progress=False)
    assert [(out_dir / n).read_bytes() for n in shards] == \
        [(tmp_path / n.replace("m-", "ref-")).read_bytes() for n in shards]
    for n in shards:
        (out_dir / n).unlink()
    assert ref.exists()

    (out_dir / "m.gguf").write_bytes(b"previous")
    bad = tmp_path / "bad.gguf"
    shutil.copy(src, bad)
    tensors = open_source(bad).tensors
    victim = next(t for t in tensors if t.name == "blk.1.ffn_up.weight")
    offset = victim.file_offset + 4 * 1000  # the 1001st float of that tensor
    with open(bad, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.array([np.nan], dtype="<f4").tobytes())
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*non-finite"):
        quantize_gguf(bad, res, out_dir / "m.gguf", progress=False)
    assert _entries(out_dir) == {"m.gguf"} and (out_dir / "m.gguf").read_bytes() == b"previous"


@pytest.mark.slow
def test_types_needing_an_imatrix_are_refused_first(lc, tmp_path: Path) -> None:
    """llama-quantize's rule: IQ2_XS etc. need an imatrix except on token_embd/output; refused before writing,
    naming the tensor, as llama-quantize refuses it."""
    src = _converted_tiny(lc, "tiny-llama")
    res = resolve(catalog_from_gguf(src), RecipeSpec(ftype=None, rules=[Rule(r"blk\.1\.ffn_down", "IQ2_XS"),
                                                                        Rule(".*", "Q8_0")]))
    with pytest.raises(GGUFWriteError, match=r"blk\.1\.ffn_down\.weight.*IQ2_XS.*importance matrix"):
        quantize_gguf(src, res, tmp_path / "m.gguf", progress=False)
    assert _entries(tmp_path) == set()
    proc = lc.run("llama-quantize", "--tensor-type-file", write_recipe(res, tmp_path / "r.txt"), src,
                  tmp_path / "lq.gguf", "Q8_0", check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "blk.1.ffn_down.weight" in proc.stdout + proc.stderr


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFWriteError, match="no such file"):
        quantize_gguf(tmp_path / "nope.gguf", RecipeSpec(ftype="Q8_0"), tmp_path / "o.gguf", progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 40)
    with pytest.raises(GGUFWriteError, match="junk.gguf"):
        quantize_gguf(junk, RecipeSpec(ftype="Q8_0"), tmp_path / "o.gguf", progress=False)
    with pytest.raises(ImatrixError, match="no such imatrix"):
        read_imatrix(tmp_path / "none.gguf")
    dat = tmp_path / "bad.dat"
    dat.write_bytes(np.array([2, 5], dtype="<i4").tobytes() + b"blk.0")
    with pytest.raises(ImatrixError, match="bad.dat"):
        read_imatrix(dat)
    assert _entries(tmp_path) == {"junk.gguf", "bad.dat"}


def _patched(src: Path, dst: Path, tensor: str, index: int, value: float) -> Path:
    """A copy of the F32 GGUF ``src`` with one float of ``tensor`` replaced."""
    shutil.copy(src, dst)
    t = next(t for t in open_source(dst).tensors if t.name == tensor)
    with open(dst, "r+b") as fh:
        fh.seek(t.file_offset + 4 * index)
        fh.write(np.array([value], dtype="<f4").tobytes())
    return dst


@pytest.mark.parametrize("tensor,value,qtype,why", [
    ("blk.0.ffn_down.weight", 1e7, "Q8_0", r"cannot be stored as Q8_0: its largest magnitude 1e\+07 overflows"),
    ("blk.1.attn_q.weight", 1e38, "Q4_K", r"cannot be stored as Q4_K: its largest magnitude 1e\+38 overflows"),
    ("blk.0.attn_v.weight", 1e6, "F16", r"cannot be stored as F16: .* overflows F16's range"),
    ("blk.0.attn_norm.weight", float("nan"), "Q8_0", r"has invalid data \(inf or NaN\) in its source"),
])
def test_non_finite_output_is_refused(lc, tmp_path: Path, tensor: str, value: float, qtype: str, why: str) -> None:
    """What llama-quantize refuses ("quantized data validation failed", "has invalid data") is refused too, naming
    the tensor, and nothing is left at the output path: a finite weight whose block scale overflows f16, and a
    NaN in a tensor that is copied (a norm), not quantized."""
    src = _patched(_converted_tiny(lc, "tiny-llama"), tmp_path / "bad.gguf", tensor, 3, value)
    res = resolve(catalog_from_gguf(src), RecipeSpec(ftype=None, rules=[Rule(".*", qtype)]))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(GGUFWriteError, match=rf"tensor {re.escape(tensor)} {why}"):
        quantize_gguf(src, res, out_dir / "m.gguf", progress=False, device="cpu")
    assert _entries(out_dir) == set()


def test_overflowing_weight_named_by_the_error_table(lc, tmp_path: Path) -> None:
    """optimize's error table refuses a (tensor, type) that cannot hold the weights with one sentence naming both
    and what to do, not an internal record."""
    from quantmix.measurement.error_table import ErrorTableError, error_table

    src = _patched(_converted_tiny(lc, "tiny-llama"), tmp_path / "bad.gguf", "blk.1.attn_q.weight", 3, 1e38)
    with pytest.raises(ErrorTableError) as e:
        error_table(src, None, candidates=["Q4_K"], device="cpu", progress=False)
    msg = str(e.value)
    assert "tensor blk.1.attn_q.weight cannot be stored as Q4_K" in msg and "--pin 'blk.1.attn_q.weight=BF16'" in msg
    assert "{" not in msg


def test_partial_imatrix_and_unknown_architecture_are_warned(lc, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """As llama-quantize names each tensor its imatrix has no data for, the writer lists them; a GGUF whose
    architecture llama.cpp does not know is written with a warning."""
    from quantmix.calibration.imatrix_io import Imatrix, ImatrixEntry, write_imatrix

    src = _converted_tiny(lc, "tiny-llama")
    im = Imatrix(tmp_path / "part.gguf", chunk_count=1, chunk_size=128)
    im.entries["blk.0.attn_q.weight"] = ImatrixEntry(np.ones((1, 256), np.float32), np.array([128]))
    write_imatrix(im, tmp_path / "part.gguf")
    res = resolve(catalog_from_gguf(src), RecipeSpec(ftype=None, rules=[Rule(".*", "Q4_K")]))
    quantize_gguf(src, res, tmp_path / "m.gguf", imatrix=tmp_path / "part.gguf", progress=False, device="cpu")
    err = capsys.readouterr().err
    assert "part.gguf has no data for" in err and "blk.0.attn_k.weight" in err and "blk.0.attn_q.weight," not in err

    data = bytearray(src.read_bytes())
    at = data.index(b"general.architecture")
    arch_at = data.index(b"llama", at + len(b"general.architecture"))
    data[arch_at:arch_at + 5] = b"llamx"
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(bytes(data))
    quantize_gguf(odd, res, tmp_path / "o.gguf", progress=False, device="cpu")
    assert "general.architecture 'llamx' is not one llama.cpp" in capsys.readouterr().err
