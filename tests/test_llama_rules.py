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
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from quantmix.paths import cache_dir, file_lock
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
    parse_tensor_type_file,
    plan_from_gguf,
    shape_fallback,
    should_quantize,
    tensors_from_gguf,
)

pytestmark = pytest.mark.slow

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
    import gguf

    off = gguf.GGUFReader(path).data_offset
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

_CONVERT_NO_VOCAB = r"""
import sys
from pathlib import Path
root, model_dir, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, str(root / "gguf-py"))
sys.path.insert(0, str(root))
import convert_hf_to_gguf
_get = convert_hf_to_gguf.get_model_class
def _no_vocab_class(*args, **kwargs):
    cls = _get(*args, **kwargs)
    cls.set_vocab = lambda self: None
    return cls
convert_hf_to_gguf.get_model_class = _no_vocab_class
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "f32"]
convert_hf_to_gguf.main()
"""


def _convert_no_vocab(model_dir: Path, out: Path) -> None:
    """llama.cpp's converter with the vocabulary step skipped (these models have no tokenizer; llama-quantize
    never reads the vocabulary)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _CONVERT_NO_VOCAB, str(_lc().root), str(model_dir), str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{proc.stderr[-3000:]}")


def _model_key(name: str) -> str:
    import transformers

    from quantmix.tools.llamacpp import SDIST_VERSION

    blob = json.dumps([CACHE_VERSION, MODELS[name], _CONVERT_NO_VOCAB, SDIST_VERSION, transformers.__version__],
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
        key = hashlib.sha256((name + _CONVERT_NO_VOCAB + (src / "config.json").read_text()).encode()).hexdigest()
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
