"""llama-quantize's tensor-type decisions, reimplemented so quantmix can predict (and cost) its mixes.

Follows ``src/llama-quant.cpp`` and ``tools/quantize/quantize.cpp`` of the llama.cpp vendored in
llama-cpp-python 0.3.36: which tensors are quantized at all (``tensor_allows_quantization``), the default
mix of every file type (``llama_tensor_get_type_impl``), ``--tensor-type`` rules, ``--pure``,
``--output-tensor-type`` / ``--token-embedding-type`` / ``--leave-output-tensor``, and the shape fallback
(``tensor_type_fallback``). The tests compare every decision with ``llama-quantize --dry-run``.

Two facts that matter to callers:
- llama-quantize does not walk tensors in file order: its loader keeps them in a map sorted by layer
  number (tensors outside ``blk.N.`` first), then by name (bytewise). The layer counters that the mixes use
  (attn_v, ffn_down, ...) advance in that order, and the output GGUF is written in that order.
  :func:`llama_tensor_order` gives it; ``keep_split=True`` keeps the given (file) order instead.
- Shapes are GGUF/ggml order: ``shape[0]`` (ne0) is the row length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

from quantmix.formats.registry import UnknownTypeError, get_type
from quantmix.model.gguf_header import GGUFHeader, read_gguf_header

# ---------------------------------------------------------------------------------------------- ftypes

# llama_ftype ids (include/llama.h), by the names llama-quantize accepts (QUANT_OPTIONS, same order).
# "Q3_K", "Q4_K", "Q5_K" are aliases of the *_M mixes; "COPY" is ALL_F32 with only_copy (nothing changes).
FTYPES: dict[str, int] = {
    "Q1_0": 40, "Q2_0": 41, "Q4_0": 2, "Q4_1": 3, "MXFP4_MOE": 38, "Q5_0": 8, "Q5_1": 9,
    "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29, "IQ1_S": 24, "IQ1_M": 31,
    "TQ1_0": 36, "TQ2_0": 37, "Q2_K": 10, "Q2_K_S": 21, "IQ3_XXS": 23, "IQ3_S": 26, "IQ3_M": 27,
    "Q3_K": 12, "IQ3_XS": 22, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "IQ4_NL": 25, "IQ4_XS": 30,
    "Q4_K": 15, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K": 17, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "Q8_0": 7, "F16": 1, "BF16": 32, "F32": 0, "COPY": 0,
}

# The canonical name of each ftype id (the one the mix code below switches on).
FTYPE_NAMES: dict[int, str] = {
    40: "Q1_0", 41: "Q2_0", 2: "Q4_0", 3: "Q4_1", 38: "MXFP4_MOE", 8: "Q5_0", 9: "Q5_1",
    19: "IQ2_XXS", 20: "IQ2_XS", 28: "IQ2_S", 29: "IQ2_M", 24: "IQ1_S", 31: "IQ1_M", 36: "TQ1_0",
    37: "TQ2_0", 10: "Q2_K", 21: "Q2_K_S", 23: "IQ3_XXS", 26: "IQ3_S", 27: "IQ3_M", 22: "IQ3_XS",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 25: "IQ4_NL", 30: "IQ4_XS", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 7: "Q8_0", 1: "F16", 32: "BF16", 0: "F32",
}

# llama_ftype_get_default_type: the type every quantizable tensor starts from (None: COPY changes nothing).
FTYPE_BASE_TYPE: dict[str, str | None] = {
    "Q1_0": "Q1_0", "Q2_0": "Q2_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "MXFP4_MOE": "MXFP4",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS",
    "IQ2_M": "IQ2_S", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0",
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
    "Q3_K": "Q3_K", "IQ3_XS": "IQ3_S", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "Q4_K": "Q4_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_K": "Q5_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
    "F16": "F16", "BF16": "BF16", "F32": "F32", "COPY": None,
}

# ggml types that are not "quantized" in ggml's sense (ggml_is_quantized false)
_NOT_QUANTIZED = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


class LlamaRulesError(ValueError):
    """A file type, rule, tensor or hyperparameter that llama-quantize would reject."""


def parse_ftype(ftype: str | int) -> str:
    """llama-quantize's ``try_parse_ftype``: a name (any case) or a number -> canonical ftype name.

    Aliases resolve to their mix ("Q4_K" -> "Q4_K_M"); "COPY" stays "COPY"; a number picks the first
    option with that id (0 -> "F32", as llama-quantize does).
    """
    s = str(ftype).strip().upper()
    if s in FTYPES:
        return s if s == "COPY" else FTYPE_NAMES[FTYPES[s]]
    try:
        n = int(s)
    except ValueError:
        n = None
    if n is not None and n in FTYPE_NAMES:
        return FTYPE_NAMES[n]
    raise LlamaRulesError(f"unknown llama-quantize file type {ftype!r}; known: {', '.join(FTYPES)}")


def ftype_id(ftype: str | int) -> int:
    """The llama_ftype id of a file type name (or id)."""
    return FTYPES[parse_ftype(ftype)]


def is_quantized_type(qtype: str) -> bool:
    """ggml_is_quantized: block types (Q*, IQ*, TQ*, MXFP4, NVFP4), not F32/F16/BF16/integers."""
    return _type_name(qtype) not in _NOT_QUANTIZED


def _type_name(qtype: str) -> str:
    try:
        t = get_type(qtype)
    except UnknownTypeError as e:
        raise LlamaRulesError(str(e)) from None
    if t.ik_only:
        raise LlamaRulesError(f"type {qtype!r} exists only in ik_llama.cpp; llama-quantize does not know it")
    return t.name


def _blck(qtype: str) -> int:
    return int(get_type(qtype).block_size)


# ---------------------------------------------------------------------------------------------- hparams


@dataclass(frozen=True)
class MixHParams:
    """The model hyperparameters the default mixes read (llama_hparams + llm_type).

    ``n_layer`` is block_count (n_layer_all, MTP/NextN layers included): the ffn counters run against it.
    ``n_head`` / ``n_head_kv`` are layer 0's (hparams.n_gqa() reads layer 0).
    """

    arch: str
    n_layer: int
    n_expert: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    n_layer_nextn: int = 0

    @property
    def n_gqa(self) -> int:
        """n_head / n_head_kv of layer 0 (integer division), 0 when n_head_kv is 0."""
        return 0 if self.n_head_kv == 0 else self.n_head // self.n_head_kv

    @property
    def is_70b(self) -> bool:
        """llm_type == LLM_TYPE_70B, as the per-architecture load_arch_hparams set it."""
        n = self.n_layer - self.n_layer_nextn
        if self.arch == "llama":
            return self.n_expert != 8 and n == 80 and self.n_head != self.n_head_kv
        if self.arch in ("qwen2", "deci", "olmo"):
            return n == 80
        if self.arch == "jais2":
            return n == 68
        return False

    @classmethod
    def from_gguf(cls, path_or_reader: str | PathLike[str] | Any) -> MixHParams:
        """Read the hyperparameters from a GGUF's metadata (path, :class:`GGUFHeader` or ``gguf.GGUFReader``)."""
        reader = _reader(path_or_reader)
        where = str(reader.paths[0]) if isinstance(reader, GGUFHeader) else "GGUF"
        arch = _field(reader, "general.architecture")
        if not isinstance(arch, str):
            raise LlamaRulesError(f"{where}: no general.architecture in the GGUF metadata")

        def get(key: str, default: int | None) -> int:
            v = _field(reader, f"{arch}.{key}")
            if v is None:
                if default is None:
                    raise LlamaRulesError(f"{where}: GGUF metadata has no {arch}.{key}")
                return default
            if isinstance(v, list):  # per-layer array: layer 0 is what n_gqa() reads
                if not v:
                    raise LlamaRulesError(f"{where}: {arch}.{key} is an empty array")
                v = v[0]
            return int(v)

        n_head = get("attention.head_count", 0)
        n_expert = get("expert_count", 0)
        if arch in ("hunyuan-dense", "hunyuan_vl") and n_expert <= 1:
            n_expert = 0
        return cls(arch=arch, n_layer=get("block_count", None), n_expert=n_expert, n_head=n_head,
                   n_head_kv=get("attention.head_count_kv", n_head),
                   n_layer_nextn=get("nextn_predict_layers", 0))


def _reader(path_or_reader: Any) -> Any:
    """A GGUFHeader or GGUFReader stays as it is; a path is read with the fast header reader."""
    if isinstance(path_or_reader, GGUFHeader):
        return path_or_reader
    if hasattr(path_or_reader, "fields") and hasattr(path_or_reader, "tensors"):
        return path_or_reader
    return read_gguf_header(path_or_reader)


def _field(reader: Any, key: str) -> Any:
    if isinstance(reader, GGUFHeader):
        return reader.fields.get(key)
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def tensors_from_gguf(path_or_reader: str | PathLike[str] | Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, GGUF shape, type name) of every tensor, in file order (a path, a GGUFHeader or a GGUFReader)."""
    reader = _reader(path_or_reader)
    if isinstance(reader, GGUFHeader):
        return [(t.name, t.shape, t.type_name) for t in reader.tensors]
    return [(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors]


# ---------------------------------------------------------------------------------------------- tensors


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count (a [576, 1] tensor is 1-D)."""
    for i in range(len(shape) - 1, 0, -1):
        if int(shape[i]) != 1:
            return i + 1
    return 1


def _ne(shape: Sequence[int], i: int) -> int:
    return int(shape[i]) if i < len(shape) else 1


def _layer_of(name: str) -> int | None:
    """sscanf(name, "blk.%d.") as the C code uses it: the leading block number, or None."""
    m = re.match(r"blk\.\s*([+-]?\d+)", name)
    return int(m.group(1)) if m else None


def llama_tensor_order(names: Iterable[str]) -> list[str]:
    """The order llama-quantize processes (and writes) tensors: weight_name_comparer of its loader —
    layer number first (-1 for tensors outside blk.N.), then the name compared bytewise."""

    def key(n: str) -> tuple[int, bytes]:
        layer = _layer_of(n)
        return (-1 if layer is None else layer, n.encode())

    return sorted(names, key=key)


# substring exclusions of tensor_allows_quantization, each with the reason reported
_EXCLUDED_SUBSTRINGS: tuple[tuple[str, str], ...] = (
    ("_norm.weight", "norm"),
    ("ffn_gate_inp.weight", "expert router"),
    ("ffn_gate_tid2eid.weight", "token-to-expert table"),
    ("altup", "altup"),
    ("laurel", "laurel"),
    ("per_layer_model_proj", "per-layer model projection"),
    ("ssm_conv1d", "ssm conv1d"),
    ("shortconv.conv.weight", "short conv"),
    ("indexer.k_proj.weight", "indexer projection"),
    ("indexer.q_proj.weight", "indexer projection"),
    *((f"time_mix_{s}.weight", "RWKV time-mix") for s in (
        "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2", "decay_w1", "decay_w2",
        "lerp_fused")),
    ("attn_rel_b.weight", "relative position bias"),
    (".position_embd", "multimodal position embedding"),
    ("sam.pos_embd", "multimodal"),
    ("sam.neck.", "multimodal"),
    ("sam.net_", "multimodal"),
    (".rel_pos", "multimodal"),
    (".patch_embd", "multimodal patch embedding"),
    (".patch_merger", "multimodal patch merger"),
    ("a.rvq.codebook", "audio codebook"),
    ("mm.a.code_embd", "audio codebook"),
)

_GLM5_NEXT_EXCLUDED = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)


def quantize_exclusion(name: str, shape: Sequence[int], arch: str, *, quantize_output_tensor: bool = True,
                       only_copy: bool = False) -> str | None:
    """Why llama-quantize leaves this tensor in its source type, or None when it may quantize it."""
    if only_copy:
        return "COPY"
    if n_dims(shape) < 2:
        return f"{n_dims(shape)}-D"
    if not name.endswith("weight"):
        return "not a weight"
    for sub, why in _EXCLUDED_SUBSTRINGS:
        if sub in name:
            return why
    if not quantize_output_tensor and name == "output.weight":
        return "--leave-output-tensor"
    if name == "position_embd.weight":
        return "position embedding"
    if name == "token_types.weight":
        return "token types"
    if arch == "glm5-next":
        for sub in _GLM5_NEXT_EXCLUDED:
            if sub in name:
                return f"glm5-next {sub}"
    return None


def should_quantize(name: str, shape: Sequence[int], arch: str, *, quantize_output_tensor: bool = True,
                    only_copy: bool = False) -> bool:
    """tensor_allows_quantization: does llama-quantize change this tensor's type at all?"""
    return quantize_exclusion(name, shape, arch, quantize_output_tensor=quantize_output_tensor,
                              only_copy=only_copy) is None


# tensor categories (tensor_get_category)
TOKEN_EMBD, ATTN_Q, ATTN_V, ATTN_K, ATTN_QKV, ATTN_KV_B, ATTN_OUTPUT = (
    "token_embd", "attn_q", "attn_v", "attn_k", "attn_qkv", "attn_kv_b", "attn_output")
FFN_UP, FFN_GATE, FFN_DOWN, OUTPUT, OTHER = "ffn_up", "ffn_gate", "ffn_down", "output", "other"


def tensor_category(name: str) -> str:
    """The broad category the mixes switch on (first match of llama.cpp's substring tests)."""
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for sub, cat in (("attn_qkv.weight", ATTN_QKV), ("attn_kv_b.weight", ATTN_KV_B), ("attn_v.weight", ATTN_V),
                     ("attn_k.weight", ATTN_K), ("attn_q.weight", ATTN_Q),
                     ("attn_output.weight", ATTN_OUTPUT), ("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE),
                     ("ffn_down", FFN_DOWN)):
        if sub in name:
            return cat
    return OTHER


def _is_attn_v(cat: str) -> bool:
    return cat in (ATTN_V, ATTN_QKV, ATTN_KV_B)


# ---------------------------------------------------------------------------------------------- fallback

_FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def shape_fallback(qtype: str, n_per_row: int) -> tuple[str, bool]:
    """tensor_type_fallback: the type used when ``qtype``'s block does not divide the row length.

    Returns (type, fell_back). 256-block IQ types -> IQ4_NL, Q2_K/Q3_K/TQ*/Q2_0 -> Q4_0, Q4_K -> Q5_0,
    Q5_K -> Q5_1, Q6_K -> Q8_0; a 32-block type that does not fit, or a fallback that still does not fit,
    -> F16. Types with a larger block and no fallback (Q1_0, NVFP4, Q8_K) raise, as llama-quantize aborts.
    """
    t = _type_name(qtype)
    qk = _blck(t)
    if int(n_per_row) % qk == 0:
        return t, False
    if t in _FALLBACK:
        out = _FALLBACK[t]
    elif qk <= 32:
        out = t
    else:
        raise LlamaRulesError(f"no tensor type fallback is defined for type {t} (row length {n_per_row} is "
                              f"not a multiple of its block size {qk})")
    if int(n_per_row) % _blck(out) != 0:
        out = "F16"
    return out, True


# ---------------------------------------------------------------------------------------------- rules


def parse_tensor_type(arg: str) -> tuple[str, str]:
    """One ``--tensor-type PATTERN=TYPE`` argument -> (lower-cased pattern, TYPE name), or a clear error."""
    if "=" not in arg:
        raise LlamaRulesError(f"malformed tensor type {arg!r}: expected PATTERN=TYPE")
    pat, typ = arg.split("=", 1)
    if not pat:
        raise LlamaRulesError(f"missing tensor name in {arg!r}")
    if not typ:
        raise LlamaRulesError(f"missing quantization type in {arg!r}")
    try:
        t = _type_name(typ)
    except LlamaRulesError as e:
        raise LlamaRulesError(f"invalid quantization type in {arg!r}: {e}") from None
    return pat.lower(), t


def _compile_rules(rules: Sequence[tuple[str, str]]) -> list[tuple[str, re.Pattern[str], str]]:
    out = []
    for pat, typ in rules:
        pat_l = pat.lower()  # quantize.cpp lower-cases the pattern (not the tensor name)
        try:
            rx = re.compile(pat_l)
        except re.error as e:
            raise LlamaRulesError(f"--tensor-type pattern {pat!r} is not a valid regex: {e}") from e
        out.append((pat_l, rx, _type_name(typ)))
    return out


# ---------------------------------------------------------------------------------------------- the mix


@dataclass(frozen=True)
class TensorDecision:
    """What llama-quantize does with one tensor.

    ``type``: the final type; ``default_type``: the type chosen before the shape fallback;
    ``quantized``: llama-quantize is allowed to change the type (``tensor_allows_quantization``);
    ``requires_imatrix``: a real (non dry-run) quantization refuses to run without an imatrix.
    """

    name: str
    shape: tuple[int, ...]
    src_type: str
    type: str
    default_type: str
    fell_back: bool
    quantized: bool
    reason: str
    requires_imatrix: bool = False

    @property
    def n_bytes(self) -> int:
        """Bytes of this tensor's data in the output (what llama-quantize's size totals add up)."""
        return int(get_type(self.type).tensor_bytes(self.shape))


class _State:
    """quantize_state_impl: the counters that the mixes advance as tensors go by."""

    def __init__(self, hp: MixHParams, names: Sequence[str], has_imatrix: bool) -> None:
        self.hp = hp
        cats = [tensor_category(n) for n in names]
        self.n_attention_wv = sum(_is_attn_v(c) for c in cats)
        self.has_tied_embeddings = OUTPUT not in cats
        self.n_ffn_down = self.n_ffn_gate = self.n_ffn_up = hp.n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.has_imatrix = has_imatrix


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_IQ_LOW = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")


def _mix_type(qs: _State, new: str, name: str, shape: Sequence[int], ftype: str, cat: str,
              output_tensor_type: str | None, token_embedding_type: str | None) -> str:
    """llama_tensor_get_type_impl: the default mix's type for one tensor (advances the counters)."""
    hp = qs.hp
    arch = hp.arch
    n_expert = max(1, hp.n_expert)

    def layer_info(i_layer: int, n_layer: int) -> tuple[int, int]:
        if n_expert > 1:  # MoE: expert tensors are not consecutive, so read the layer from the name
            layer = _layer_of(name)
            if layer is None:
                raise LlamaRulesError(f"tensor {name}: failed to determine its layer (expected blk.N.)")
            if not 0 <= layer < n_layer:
                raise LlamaRulesError(f"tensor {name}: bad layer {layer}, must be in [0, {n_layer})")
            return layer, n_layer
        return i_layer, n_layer

    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new not in ("F32", "BF16", "F16"):
            return "Q8_0"

    if cat == OUTPUT or (qs.has_tied_embeddings and cat == TOKEN_EMBD):
        if output_tensor_type is not None:
            return output_tensor_type
        if ftype == "MXFP4_MOE":
            return "Q8_0"
        if arch == "falcon" or _ne(shape, 0) % _blck(new) != 0:
            return "Q8_0"
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K"
        return new if new == "Q8_0" else "Q6_K"

    if ftype == "MXFP4_MOE":
        # expert tensors (3-D) -> MXFP4, everything else -> Q8_0
        is_bl3_expert = arch == "bailingmoe3" and cat in (FFN_UP, FFN_GATE, FFN_DOWN)
        if _ne(shape, 2) > 1 and (arch != "bailingmoe3" or is_bl3_expert):
            return "MXFP4"
        return "Q8_0"

    if cat == TOKEN_EMBD:
        if token_embedding_type is not None:
            return token_embedding_type
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        if ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
            return "Q4_K"
        return new

    if ftype in _IQ_LOW:
        iq2_sm = ftype in ("IQ2_S", "IQ2_M")
        if _is_attn_v(cat):
            if hp.n_gqa >= 4 or hp.n_expert >= 4:
                new = "Q4_K"
            else:
                new = "IQ3_S" if iq2_sm else "Q2_K"
            qs.i_attention_wv += 1
        elif hp.n_expert == 8 and cat == ATTN_K:
            new = "Q4_K"
        elif cat == FFN_DOWN:
            if qs.i_ffn_down < qs.n_ffn_down // 8:
                new = "IQ3_S" if iq2_sm else "Q2_K"
            qs.i_ffn_down += 1
        elif cat == ATTN_OUTPUT:
            if hp.n_expert == 8:
                new = "Q5_K"
            elif ftype in ("IQ1_S", "IQ1_M"):
                new = "IQ2_XXS"
            elif iq2_sm:
                new = "IQ3_S"
        return new

    if _is_attn_v(cat):
        gqa4 = hp.n_gqa >= 4
        if ftype == "Q2_K":
            new = "Q4_K" if gqa4 else "Q3_K"
        elif ftype == "Q2_K_S" and gqa4:
            new = "Q4_K"
        elif ftype == "IQ3_XXS":
            new = "Q4_K" if gqa4 else ("IQ3_S" if not qs.has_imatrix else "IQ3_XXS")
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa4:
            new = "Q4_K"
        elif ftype == "IQ3_M":
            new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if qs.i_attention_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa4:
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and qs.i_attention_wv < 4:
            new = "Q5_K"
        if hp.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"  # 8 heads share attn_v in the 70B: more bits are nearly free
        if hp.n_expert == 8:
            new = "Q8_0"
        qs.i_attention_wv += 1
        return new

    if cat == ATTN_K:
        if hp.n_expert == 8:
            return "Q8_0"
        if ftype == "IQ3_XS":
            return "IQ3_XXS"
        if ftype == "IQ3_XXS":
            return "IQ2_S"
        return new

    if cat == ATTN_Q:
        if ftype == "IQ3_XS":
            return "IQ3_XXS"
        if ftype == "IQ3_XXS":
            return "IQ2_S"
        return new

    if cat == FFN_DOWN:
        i_layer, n_layer = layer_info(qs.i_ffn_down, qs.n_ffn_down)
        falcon = arch == "falcon"
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q2_K_S":
            if i_layer < n_layer // 8:
                new = "Q4_K"
        elif ftype == "IQ3_XXS" and not qs.has_imatrix:
            new = "Q4_K" if i_layer < n_layer // 8 else "Q3_K"
        elif ftype == "Q3_K_M":
            if i_layer < n_layer // 16:
                new = "Q5_K"
            elif not falcon or _use_more_bits(i_layer, n_layer):
                new = "Q4_K"
            else:
                new = "Q3_K"
        elif ftype == "IQ3_M" and (i_layer < n_layer // 8
                                   or (hp.n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            new = "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q4_K" if falcon else "Q5_K"
        elif ftype == "Q4_K_M":
            if falcon:
                new = ("Q6_K" if i_layer < n_layer // 16
                       else "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K")
            elif _use_more_bits(i_layer, n_layer):
                new = "Q6_K"
        elif i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
            new = "Q5_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
            new = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and qs.has_imatrix and i_layer < n_layer // 8:
            new = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        qs.i_ffn_down += 1
        return new

    if cat == ATTN_OUTPUT:
        if arch != "falcon":
            if hp.n_expert == 8:
                if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                             "IQ3_S", "IQ3_M", "IQ4_XS"):
                    new = "Q5_K"
            else:
                new = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K",
                       "IQ3_M": "Q4_K"}.get(ftype, new)
        elif ftype == "Q3_K_L":
            new = "Q4_K"
        return new

    if cat == ATTN_QKV:  # unreachable: attn_qkv is attn_v-like above (kept as in the source)
        return new

    if cat in (FFN_GATE, FFN_UP):
        if cat == FFN_GATE:
            i_layer, n_layer = layer_info(qs.i_ffn_gate, qs.n_ffn_gate)
        else:
            i_layer, n_layer = layer_info(qs.i_ffn_up, qs.n_ffn_up)
        if ftype == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new = "IQ3_XXS"
        if cat == FFN_GATE:
            qs.i_ffn_gate += 1
        else:
            qs.i_ffn_up += 1
        return new

    return new


def _requires_imatrix(name: str, qtype: str, ftype: str) -> bool:
    """tensor_requires_imatrix: the very-low-bit types, except token_embd/output; Q2_K only in Q2_K_S."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if qtype in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"):
        return True
    return qtype == "Q2_K" and ftype == "Q2_K_S"


def _as_entry(t: Sequence[Any], default_src: str) -> tuple[str, tuple[int, ...], str]:
    if len(t) == 2:
        name, shape = t
        src = default_src
    elif len(t) == 3:
        name, shape, src = t
    else:
        raise LlamaRulesError(f"tensor entry {t!r}: expected (name, shape) or (name, shape, src_type)")
    shape_t = tuple(int(x) for x in shape)
    if not shape_t or any(x <= 0 for x in shape_t):
        raise LlamaRulesError(f"tensor {name}: bad shape {shape_t}")
    return str(name), shape_t, _type_name(str(src))


def default_mix(
    tensors: Sequence[tuple[str, tuple[int, ...]] | tuple[str, tuple[int, ...], str]],
    ftype: str | int,
    hp: MixHParams,
    tensor_type_rules: Sequence[tuple[str, str]] = (),
    imatrix_present: bool = False,
    *,
    pure: bool = False,
    leave_output_tensor: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    keep_split: bool = False,
    src_type: str = "F32",
) -> list[TensorDecision]:
    """The type llama-quantize gives every tensor for file type ``ftype``, in llama-quantize's order.

    ``tensors``: (name, GGUF shape) or (name, GGUF shape, source type) per tensor (source type defaults to
    ``src_type``; a tensor that is not quantized keeps it). ``tensor_type_rules``: (pattern, type) pairs
    in command-line order (``--tensor-type`` and ``--tensor-type-file`` append to the same list); the
    pattern is lower-cased and searched (regex) in the tensor name, the first match wins and replaces the
    mix (counters do not advance for that tensor), then the shape fallback still applies.
    Order of checks, as in llama_tensor_get_type: not quantizable -> source type;
    --token-embedding-type (token_embd; per_layer_token_embd unless a rule names it) and
    --output-tensor-type (output.weight) -> as given, no fallback; a float file type (F32/F16/BF16) -> that
    type, no rules; else rule, or (unless ``pure``) the default mix; then the fallback.
    Returns decisions in llama-quantize's processing order (see :func:`llama_tensor_order`), or in the
    given order with ``keep_split=True``.
    """
    name_ft = parse_ftype(ftype)
    base = FTYPE_BASE_TYPE[name_ft]
    only_copy = base is None
    mix_ft = name_ft if not only_copy else "F32"
    default_type = base or "F32"
    out_tt = _type_name(output_tensor_type) if output_tensor_type is not None else None
    emb_tt = _type_name(token_embedding_type) if token_embedding_type is not None else None
    rules = _compile_rules(tensor_type_rules)

    entries = [_as_entry(t, src_type) for t in tensors]
    seen: set[str] = set()
    for n, _, _ in entries:
        if n in seen:
            raise LlamaRulesError(f"tensor {n} appears twice")
        seen.add(n)
    if not keep_split:
        by_name = {e[0]: e for e in entries}
        entries = [by_name[n] for n in llama_tensor_order(by_name)]
    qs = _State(hp, [e[0] for e in entries], imatrix_present)

    def first_rule(name: str) -> tuple[str, str] | None:
        for pat, rx, typ in rules:
            if rx.search(name):
                return pat, typ
        return None

    out: list[TensorDecision] = []
    for name, shape, src in entries:
        cat = tensor_category(name)
        why_not = quantize_exclusion(name, shape, hp.arch, quantize_output_tensor=not leave_output_tensor,
                                     only_copy=only_copy)
        if why_not is not None:
            out.append(TensorDecision(name, shape, src, src, src, False, False, f"not quantized ({why_not})"))
            continue
        pre, final, fell, reason = _decide(qs, name, shape, cat, mix_ft, default_type, pure, out_tt, emb_tt,
                                           first_rule)
        out.append(TensorDecision(name, shape, src, final, pre, fell, True, reason,
                                  _requires_imatrix(name, final, mix_ft)))
    return out


def _decide(qs: _State, name: str, shape: tuple[int, ...], cat: str, ftype: str, default_type: str, pure: bool,
            out_tt: str | None, emb_tt: str | None, first_rule: Any) -> tuple[str, str, bool, str]:
    """llama_tensor_get_type for a quantizable tensor: (type before fallback, final type, fell back, why)."""
    if emb_tt is not None and cat == TOKEN_EMBD:
        # per_layer_token_embd follows --token-embedding-type unless a --tensor-type rule names it
        if not (name == "per_layer_token_embd.weight" and first_rule(name) is not None):
            return emb_tt, emb_tt, False, "--token-embedding-type"
    if out_tt is not None and cat == OUTPUT:
        return out_tt, out_tt, False, "--output-tensor-type"
    if not is_quantized_type(default_type):
        return default_type, default_type, False, f"{ftype} file type (no mix, no rules)"
    hit = first_rule(name)
    if hit is not None:
        pre = hit[1]
        reason = f"rule '{hit[0]}={hit[1].lower()}'"
    elif pure:
        pre, reason = default_type, "--pure"
    else:
        pre = _mix_type(qs, default_type, name, shape, ftype, cat, out_tt, emb_tt)
        reason = "default mix"
    final, fell = shape_fallback(pre, shape[0])
    return pre, final, fell, reason


def plan_from_gguf(path: str | PathLike[str], ftype: str | int, **kwargs: Any) -> list[TensorDecision]:
    """:func:`default_mix` for a GGUF file: its tensors (with their source types) and hyperparameters."""
    reader = _reader(path)
    tensors = tensors_from_gguf(reader)
    if kwargs.get("keep_split"):  # --keep-split walks tensors by data offset (one input file: one split)
        if isinstance(reader, GGUFHeader):
            offsets = [t.offset for t in reader.tensors]
        else:
            offsets = [int(t.data_offset) for t in reader.tensors]
        tensors = [t for _, t in sorted(zip(offsets, tensors), key=lambda x: x[0])]
    return default_mix(tensors, ftype, MixHParams.from_gguf(reader), **kwargs)


def dry_run_totals(decisions: Sequence[TensorDecision]) -> tuple[int, int]:
    """(source bytes, output bytes) of the tensor data, as llama-quantize --dry-run totals them
    ("model size" / "quant size" lines, which it prints in MiB); GGUF header and padding excluded."""
    src = sum(int(get_type(d.src_type).tensor_bytes(d.shape)) for d in decisions)
    return src, sum(d.n_bytes for d in decisions)
