"""The tensor catalog: every tensor of a model, named and shaped exactly as llama.cpp's GGUF holds it.

Built from a Hugging Face config alone (the model is instantiated on the meta device, so no weights are
needed: a 355B model can be planned before it is downloaded), from a model directory, or from a GGUF file
(header only, split shards included). Names come from gguf-py's tensor-name maps, so any architecture both
transformers and gguf-py know works; the few places where llama.cpp's converter reshapes tensors (merged
experts, MLA's split kv_b, GLM's NextN layers, tied embeddings, llama3 rope factors) are applied here too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from quantmix.model.gguf_header import read_gguf_header


class CatalogError(ValueError):
    """A model, config or GGUF could not be catalogued; the message names the file and the reason."""


# Tensor classes, fine-grained. Each maps to a coarse group used in size tables.
_CLASS_BY_GGUF_KEY: dict[str, str] = {
    "token_embd": "embedding",
    "output": "output",
    "attn_q": "attn_q", "attn_q_a": "attn_q", "attn_q_b": "attn_q",
    "attn_k": "attn_k", "attn_kv_a_mqa": "attn_k", "attn_k_b": "attn_k", "attn_kv_b": "attn_k",
    "attn_v": "attn_v", "attn_v_b": "attn_v",
    "attn_output": "attn_output",
    "attn_qkv": "attn_qkv",
    "ffn_gate": "ffn_gate", "ffn_up": "ffn_up", "ffn_down": "ffn_down",
    "ffn_gate_exps": "ffn_gate_exps", "ffn_up_exps": "ffn_up_exps", "ffn_down_exps": "ffn_down_exps",
    "ffn_gate_up_exps": "ffn_gate_up_exps",
    "ffn_gate_shexp": "ffn_gate_shexp", "ffn_up_shexp": "ffn_up_shexp", "ffn_down_shexp": "ffn_down_shexp",
    "ffn_gate_inp": "router", "ffn_gate_inp_shexp": "router", "exp_probs_b": "router",
    "nextn.eh_proj": "nextn", "nextn.embed_tokens": "nextn", "nextn.shared_head_head": "nextn",
}

GROUP_OF_CLASS: dict[str, str] = {
    "embedding": "embedding", "output": "output",
    "attn_q": "attention", "attn_k": "attention", "attn_v": "attention", "attn_output": "attention",
    "attn_qkv": "attention",
    "ffn_gate": "ffn", "ffn_up": "ffn", "ffn_down": "ffn",
    "ffn_gate_exps": "routed_experts", "ffn_up_exps": "routed_experts", "ffn_down_exps": "routed_experts",
    "ffn_gate_up_exps": "routed_experts",
    "ffn_gate_shexp": "shared_experts", "ffn_up_shexp": "shared_experts", "ffn_down_shexp": "shared_experts",
    "router": "router", "norm": "norm", "bias": "bias", "nextn": "nextn", "other": "other",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as it appears in the GGUF: name, shape in ggml order (ne0 = row length first)."""

    name: str
    shape: tuple[int, ...]
    tensor_class: str
    layer: int | None
    hf_sources: tuple[str, ...] = ()
    quantizable: bool = False
    source_type: str | None = None  # type in a GGUF it was read from

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def group(self) -> str:
        return GROUP_OF_CLASS.get(self.tensor_class, "other")

    @property
    def n_per_row(self) -> int:
        return self.shape[0]


@dataclass
class ModelHParams:
    """The hyper-parameters quantmix needs: llama-quantize's rules, KV-cache sizes, reports."""

    arch: str
    n_layer: int  # GGUF block_count (NextN layers included)
    n_embd: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    head_dim_k: int = 0
    head_dim_v: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_nextn: int = 0
    vocab_size: int = 0
    n_ctx_train: int = 0
    kv_lora_rank: int = 0  # MLA: K/V cache holds the compressed latent
    rope_dim_mla: int = 0


@dataclass
class Catalog:
    """All tensors of one model, in GGUF order, with its hyper-parameters."""

    source: str
    hparams: ModelHParams
    tensors: list[TensorInfo] = field(default_factory=list)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def to_json(self) -> str:
        return json.dumps(
            {
                "source": self.source,
                "hparams": asdict(self.hparams),
                "tensors": [
                    {**asdict(t), "n_elements": t.n_elements, "group": t.group} for t in self.tensors
                ],
            },
            indent=1,
        )


# ---------------------------------------------------------------------------------------------------------
# classification


_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def classify(name: str) -> tuple[str, int | None]:
    """The class and layer of a GGUF tensor name (``blk.3.ffn_down_exps.weight`` -> routed down, 3)."""
    m = _LAYER_RE.match(name)
    layer = int(m.group(1)) if m else None
    stem = name[m.end():] if m else name
    key, _, suffix = stem.rpartition(".")
    if suffix == "bias" and key != "exp_probs_b":
        return "bias", layer
    if key in _CLASS_BY_GGUF_KEY:
        return _CLASS_BY_GGUF_KEY[key], layer
    if "norm" in key:
        return "norm", layer
    return "other", layer


def beyond_decoder_layers(name: str, n_decoder_layers: int) -> bool:
    """A tensor of a block after the model's decoder layers: GLM's NextN (multi-token prediction) layers, which
    the GGUF keeps for speculative decoding and the next-token forward (transformers') never runs."""
    layer = classify(name)[1]
    return layer is not None and n_decoder_layers > 0 and layer >= n_decoder_layers


def _quantizable(name: str, shape: tuple[int, ...], arch: str) -> bool:
    from quantmix.planning.llama_rules import should_quantize

    return should_quantize(name, shape, arch)


# ---------------------------------------------------------------------------------------------------------
# from a Hugging Face config


_ARCH_ALIASES = {
    # HF model_type -> llama.cpp architecture, where llama.cpp's converter renames
    "mistral": "llama",
    "mixtral": "llama",
    "deepseek_v3": "deepseek2",
    "deepseek_v2": "deepseek2",
    "gemma3_text": "gemma3",  # Gemma3ForCausalLM (conversion/gemma.py Gemma3Model)
}


# The Hugging Face model types every step is tested on (tests/test_architectures.py: conversion by llama.cpp's
# converter, catalog, imatrix, sensitivity, quantize, eval); another model_type is refused by name.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "glm4_moe",
                         "deepseek_v2", "deepseek_v3", "gemma2", "gemma3_text", "phi3", "gpt_oss")


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def gguf_arch_for(model_type: str) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture of a transformers model_type."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CatalogError(f"model_type {model_type!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    target = _ARCH_ALIASES.get(model_type, model_type)
    by_norm = {_norm(v): k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    arch = by_norm.get(_norm(target))
    if arch is None:
        raise CatalogError(f"model_type {model_type!r} has no llama.cpp architecture in gguf-py {gguf.__name__}")
    return arch


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.exists():
        raise CatalogError(f"{path}: no config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CatalogError(f"{cfg_file}: not valid JSON ({e})") from None
    if "model_type" not in raw:
        raise CatalogError(f"{cfg_file}: no 'model_type' key")
    try:
        return AutoConfig.from_pretrained(str(cfg_file.parent), local_files_only=True)
    except Exception as e:  # transformers raises many kinds
        raise CatalogError(f"{cfg_file}: transformers cannot read this config ({e})") from None


def _text_config(cfg: Any) -> Any:
    return getattr(cfg, "text_config", None) or cfg


def _meta_state(cfg: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of the transformers model, instantiated on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [(n, tuple(p.shape)) for n, p in model.state_dict().items()]


def checkpoint_tensors(cfg: Any, params: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """Undo transformers' in-memory weight fusions: per-expert checkpoint tensors become llama.cpp's merged
    3-D expert tensors (what the converter writes), each with the checkpoint tensors it comes from."""
    from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_checkpoint_conversion_mapping

    conversions = get_checkpoint_conversion_mapping(cfg.model_type) or []
    renames = [(c.target_patterns[0], c.source_patterns[0]) for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    out: list[tuple[str, tuple[int, ...], tuple[str, ...]]] = []
    for name, shape in params:
        for target, source in renames:
            name = name.replace(target, source)
        conv = next((c for c in converters if any(name.endswith(t.lstrip(".")) for t in c.target_patterns)), None)
        if conv is None:
            out.append((name, shape, (name,)))
            continue
        target = next(t.lstrip(".") for t in conv.target_patterns if name.endswith(t.lstrip(".")))
        prefix = name[: -len(target)]
        n_src = len(conv.source_patterns)
        n_expert = shape[0]
        if shape[1] % n_src:
            raise CatalogError(f"{name}: cannot split {shape} into {n_src} checkpoint tensors")
        part = (n_expert, shape[1] // n_src, *shape[2:])
        for src in conv.source_patterns:
            src = src.lstrip(".")
            merged = prefix + src.replace("*.", "")
            sources = tuple(prefix + src.replace("*", str(e)) for e in range(n_expert))
            out.append((merged, part, sources))
    return out


def _add_converter_tensors(cfg: Any, arch: gguf.MODEL_ARCH, tensors: list[tuple[str, tuple[int, ...], tuple[str, ...]]]) -> tuple[list[tuple[str, tuple[int, ...], tuple[str, ...]]], int]:
    """Apply the converter's own reshapes for this architecture; return the tensors and the block count."""
    tc = _text_config(cfg)
    n_layer = int(tc.num_hidden_layers)
    out: list[tuple[str, tuple[int, ...], tuple[str, ...]]] = []
    if getattr(tc, "tie_word_embeddings", False):
        tensors = [t for t in tensors if t[0] != "lm_head.weight"]
    for name, shape, src in tensors:
        if arch == gguf.MODEL_ARCH.DEEPSEEK2 and name.endswith("kv_b_proj.weight"):
            # MLA absorption: kv_b is split per head into k_b (transposed) and v_b
            h_kv, nope, v_dim = tc.num_key_value_heads, tc.qk_nope_head_dim, tc.v_head_dim
            rank = shape[-1]
            out.append((name.replace("kv_b_proj", "k_b_proj"), (h_kv, rank, nope), src))
            out.append((name.replace("kv_b_proj", "v_b_proj"), (h_kv, v_dim, rank), src))
            continue
        if arch == gguf.MODEL_ARCH.GPT_OSS:
            split = _gpt_oss_split(name, shape, src)
            if split is not None:
                out.extend(split)
                continue
        out.append((name, shape, src))
    n_nextn = int(getattr(tc, "num_nextn_predict_layers", 0) or 0)
    if arch == gguf.MODEL_ARCH.GLM4_MOE and n_nextn:
        last = f"model.layers.{n_layer - 1}."
        h = tc.hidden_size
        for i in range(n_layer, n_layer + n_nextn):
            pre = f"model.layers.{i}."
            for name, shape, src in list(out):
                if name.startswith(last):
                    out.append((pre + name[len(last):], shape, tuple(s.replace(last, pre, 1) for s in src)))
            out.append((pre + "eh_proj.weight", (h, 2 * h), (pre + "eh_proj.weight",)))
            # the NextN layer's own embedding and output head: the release holds them, the converter keeps them
            for extra in ("embed_tokens.weight", "shared_head.head.weight"):
                out.append((pre + extra, (int(tc.vocab_size), h), (pre + extra,)))
            for norm in ("enorm", "hnorm", "shared_head.norm"):
                out.append((pre + f"{norm}.weight", (h,), (pre + f"{norm}.weight",)))
        n_layer += n_nextn
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    if arch == gguf.MODEL_ARCH.LLAMA and rope.get("rope_type") == "llama3":
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        out.append(("rope_freqs.weight", (head_dim // 2,), ()))
    return out, n_layer


def _gpt_oss_split(name: str, shape: tuple[int, ...], src: tuple[str, ...]
                   ) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]] | None:
    """conversion/gpt_oss.py: the fused experts [E, H, 2I] (gate and up interleaved along the last axis) become
    gate and up [E, I, H] (transposed); down [E, I, H] is transposed; sinks gain a ``.weight`` suffix."""
    if name.endswith("mlp.experts.gate_up_proj"):
        e, h, i2 = shape
        base = name[: -len("gate_up_proj")]
        return [(base + "gate_proj.weight", (e, i2 // 2, h), src), (base + "up_proj.weight", (e, i2 // 2, h), src)]
    if name.endswith("mlp.experts.gate_up_proj_bias"):
        e, i2 = shape
        base = name[: -len("gate_up_proj_bias")]
        return [(base + "gate_proj.bias", (e, i2 // 2), src), (base + "up_proj.bias", (e, i2 // 2), src)]
    if name.endswith("mlp.experts.down_proj"):
        e, i, h = shape
        return [(name + ".weight", (e, h, i), src)]
    if name.endswith("mlp.experts.down_proj_bias"):
        return [(name.replace("down_proj_bias", "down_proj.bias"), shape, src)]
    if name.endswith("self_attn.sinks"):
        return [(name + ".weight", shape, src)]
    return None


def _map_name(tmap: gguf.TensorNameMap, name: str) -> str | None:
    if name == "rope_freqs.weight":
        return name
    # the converter's own name filters (conversion/base.py filter_tensors)
    name = name.replace("e_score_correction_bias", "e_score_correction.bias").replace("language_model.", "")
    return tmap.get_name(name, try_suffixes=(".weight", ".bias"))


def _hparams_from_config(cfg: Any, arch: gguf.MODEL_ARCH, n_block: int) -> ModelHParams:
    tc = _text_config(cfg)
    n_head = int(getattr(tc, "num_attention_heads", 0) or 0)
    n_head_kv = int(getattr(tc, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(tc, "head_dim", None) or (tc.hidden_size // max(n_head, 1)))
    n_expert = int(
        getattr(tc, "n_routed_experts", None) or getattr(tc, "num_experts", None)
        or getattr(tc, "num_local_experts", None) or 0
    )
    hp = ModelHParams(
        arch=gguf.MODEL_ARCH_NAMES[arch],
        n_layer=n_block,
        n_embd=int(tc.hidden_size),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        n_expert=n_expert,
        n_expert_used=int(getattr(tc, "num_experts_per_tok", 0) or 0),
        n_nextn=n_block - int(tc.num_hidden_layers),
        vocab_size=int(getattr(tc, "vocab_size", 0) or 0),
        n_ctx_train=int(getattr(tc, "max_position_embeddings", 0) or 0),
    )
    if arch == gguf.MODEL_ARCH.DEEPSEEK2:
        hp.kv_lora_rank = int(tc.kv_lora_rank)
        hp.rope_dim_mla = int(tc.qk_rope_head_dim)
        hp.head_dim_k = int(tc.qk_nope_head_dim + tc.qk_rope_head_dim)
        hp.head_dim_v = int(tc.v_head_dim)
    return hp


def catalog_from_config(path: str | Path) -> Catalog:
    """Catalog of a model from its config.json (or model directory), no weights needed."""
    path = Path(path)
    cfg = _load_config(path)
    arch = gguf_arch_for(cfg.model_type)
    tensors, n_block = _add_converter_tensors(cfg, arch, checkpoint_tensors(cfg, _meta_state(cfg)))
    tmap = gguf.get_tensor_name_map(arch, n_block)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    infos: list[TensorInfo] = []
    for name, shape, src in tensors:
        gname = _map_name(tmap, name)
        if gname is None:
            raise CatalogError(f"{path}: tensor {name!r} has no llama.cpp name for architecture {arch_name}")
        gshape = tuple(reversed(shape))
        cls, layer = classify(gname)
        infos.append(TensorInfo(gname, gshape, cls, layer, src, _quantizable(gname, gshape, arch_name)))
    infos.sort(key=_gguf_order)
    return Catalog(str(path), _hparams_from_config(cfg, arch, n_block), infos)


def _gguf_order(t: TensorInfo) -> tuple[int, int, str]:
    """Canonical order: token_embd and other globals first, then layers ascending, output last."""
    if t.layer is not None:
        return (1, t.layer, t.name)
    if t.name.startswith("output"):
        return (2, 0, t.name)
    return (0, 0, t.name)


# ---------------------------------------------------------------------------------------------------------
# from a GGUF


def catalog_from_gguf(path: str | Path) -> Catalog:
    """Catalog of a GGUF file (header only; every shard of a split GGUF is read)."""
    header = read_gguf_header(Path(path))
    arch = header.arch
    infos: list[TensorInfo] = []
    for t in header.tensors:
        cls, layer = classify(t.name)
        infos.append(TensorInfo(t.name, t.shape, cls, layer, (), _quantizable(t.name, t.shape, arch), t.type_name))
    return Catalog(str(path), header.hparams(), infos)


def load_catalog(path: str | Path) -> Catalog:
    """Catalog of whatever the user points at: a GGUF file, a model directory, or a config.json."""
    p = Path(path)
    if not p.exists():
        raise CatalogError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix == ".gguf":
        return catalog_from_gguf(p)
    if p.is_dir() or p.name.endswith(".json"):
        return catalog_from_config(p)
    raise CatalogError(f"{p}: expected a .gguf file, a model directory or a config.json")


def iter_quantizable(catalog: Iterable[TensorInfo]) -> Iterator[TensorInfo]:
    """Tensors llama-quantize would quantize."""
    return (t for t in catalog if t.quantizable)
