"""Emulate llama.cpp's CPU matmul numerics: activations are quantized before every quantized dot product.

ggml's CPU backend never multiplies float activations by quantized weights: it first converts the
activations (src1) to the weight type's ``vec_dot_type`` (ggml-cpu.c ``type_traits_cpu``), then takes integer
dot products. K-quants and the 256-block IQ types use Q8_K (blocks of 256, float scale = 1/(-127/max), max the
signed element of largest magnitude: ``quantize_row_q8_K_ref``); Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4 use Q8_0 and
Q4_1, Q5_1 use Q8_1 (blocks of 32, scale max|x|/127 rounded to fp16, round half to even: the AVX2
``quantize_row_q8_0``); F16 / BF16 weights round the activations to F16 / BF16; F32 leaves them alone.

That 8-bit rounding is part of what llama-perplexity measures: on the 768-wide SmolLM2 fixture at Q4_K_M it
raises mean KLD from 0.259 (weights alone) to 0.280 (llama-perplexity: 0.2796). Emulating it, a transformers
forward pass reproduces llama-perplexity's KLD to well under 1 % instead of ~7 %.

Done as a torch function mode that intercepts ``F.linear`` on the model's own weight tensors (looked up by
storage address), so plain ``nn.Linear`` layers and fused expert parameters (``gate_up_proj[e]``, whose gate
and up halves may have different types) are handled alike; ``F.embedding`` (token_embd: a row lookup in
llama.cpp too) is untouched, and a tied head multiplies by token_embd with token_embd's type, as llama.cpp's
does. MLA's attention runs absorbed, as llama.cpp's does (:mod:`quantmix.model.mla`): attn_k_b multiplies the
rounded q_nope, attn_v_b the rounded attention-weighted latent. Attention's own products (K and V in llama.cpp's
F16 cache) are not emulated: they touch the base and the quantized model alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["ACT_QUANT_MODES", "vec_dot_type", "quantize_activations", "llama_cpu_activations"]

ACT_QUANT_MODES = ("llama-cpu", "none")

_Q8_K = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
         "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0"}
_Q8_0 = {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "MXFP4", "NVFP4", "Q1_0", "Q2_0"}
_Q8_1 = {"Q4_1", "Q5_1"}


def vec_dot_type(qtype: str) -> str | None:
    """What ggml's CPU backend converts activations to for a weight of type ``qtype`` (None: float32)."""
    q = qtype.upper()
    if q == "F32":
        return None
    if q in ("F16", "BF16"):
        return q
    if q in _Q8_K:
        return "Q8_K"
    if q in _Q8_0:
        return "Q8_0"
    if q in _Q8_1:
        return "Q8_1"
    raise ValueError(f"type {qtype}: unknown to llama.cpp's CPU backend emulation")


def quantize_activations(x: Tensor, kind: str | None) -> Tensor:
    """``x`` (float32, last dim a multiple of the block) as ggml sees it after conversion to ``kind``."""
    if kind is None:
        return x
    if kind == "F16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "BF16":
        return x.to(torch.bfloat16).to(x.dtype)
    shape = x.shape
    xf = x.float()
    if kind == "Q8_K":
        b = xf.reshape(-1, 256)
        i = b.abs().argmax(-1, keepdim=True)  # first element of largest magnitude, as the C loop keeps it
        mx = b.gather(-1, i)
        nz = mx != 0
        iscale = torch.where(nz, -127.0 / torch.where(nz, mx, 1.0), 0.0)
        q = torch.round(iscale * b).clamp(max=127.0)
        d = torch.where(nz, 1.0 / torch.where(nz, iscale, 1.0), 0.0)
        return (q * d).reshape(shape).to(x.dtype)
    if kind in ("Q8_0", "Q8_1"):
        b = xf.reshape(-1, 32)
        amax = b.abs().amax(-1, keepdim=True)
        idv = torch.where(amax != 0, 127.0 / torch.where(amax != 0, amax, 1.0), 0.0)
        q = torch.round(b * idv)
        d = (amax / 127.0).to(torch.float16).float()
        return (q * d).reshape(shape).to(x.dtype)
    raise ValueError(f"activation type {kind!r}: expected Q8_K, Q8_0, Q8_1, F16, BF16 or None")


@dataclass(frozen=True)
class _Rows:
    """Rows [start, stop) of a 2-D weight and the activation type their dot products use."""

    start: int
    stop: int
    kind: str | None


_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)  # `x @ w` arrives as Tensor.matmul


class _Mode(TorchFunctionMode):
    def __init__(self, table: dict[int, tuple[int, tuple[_Rows, ...]]], owners: dict[int, str],
                 columns: dict[int, tuple[str | None, ...]] | None = None) -> None:
        super().__init__()
        self.table = table
        self.owners = owners  # storage address -> parameter name
        # weights multiplied as ``x @ w`` (gpt-oss's experts, stored [in, out]): storage address -> activation
        # type of each column phase (gate and up interleave: columns 0::2 and 1::2)
        self.columns = columns or {}
        self.seen: set[str] = set()

    def unseen(self) -> list[str]:
        """Parameters whose matmuls were never intercepted (the model multiplies them some other way)."""
        return sorted(set(self.owners.values()) - self.seen)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _MATMUL and len(args) == 2 and not kwargs and args[1].dim() == 2:
            kinds = self.columns.get(args[1].data_ptr())
            if kinds is not None:
                x, w = args
                self.seen.add(self.owners[w.data_ptr()])
                if len(set(kinds)) == 1:
                    return func(quantize_activations(x, kinds[0]), w)
                k = len(kinds)
                outs = [func(quantize_activations(x, kind), w[:, i::k]) for i, kind in enumerate(kinds)]
                return torch.stack(outs, dim=-1).flatten(-2)  # columns back in their interleaved order
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            entry = self.table.get(w.data_ptr()) if w.dim() == 2 else None
            if entry is not None and entry[0] == w.shape[0]:
                self.seen.add(self.owners[w.data_ptr()])
                parts = entry[1]
                if len(parts) == 1:
                    return func(quantize_activations(x, parts[0].kind), w, bias)
                outs = [func(quantize_activations(x, r.kind), w[r.start:r.stop],
                             None if bias is None else bias[r.start:r.stop]) for r in parts]
                return torch.cat(outs, dim=-1)
        return func(*args, **kwargs)


@contextlib.contextmanager
def llama_cpu_activations(model: nn.Module, types: Mapping[str, str], targets: dict | None = None) -> Iterator[_Mode]:
    """Within this context, ``model``'s matmuls quantize their activations as llama.cpp's CPU backend does.

    ``types``: GGUF tensor name -> its type (a GGUF's stored types, or a resolved recipe's). After a forward
    pass, ``mode.unseen()`` names the weights whose matmul was not intercepted (should be none). Only the
    tensors named in ``types`` are intercepted (the streaming engine names its present layer's); ``targets``:
    the model's tensor targets, when already known."""
    from quantmix.export.simulate import tensor_targets

    params = dict(model.named_parameters())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = head.weight if head is not None else None
    # embeddings are row lookups (F.embedding, as llama.cpp's get_rows), unless tied to the head
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not head_w}
    per_param: dict[str, list[tuple[int, int, str | None]]] = {}
    skipped: set[str] = set()
    mla: dict[str, dict[str, str | None]] = {}  # attention module -> {"k_b": type, "v_b": type}
    phases: dict[str, dict[int, str | None]] = {}  # x @ w parameters: column phase -> activation type
    for name, tgt in (tensor_targets(model) if targets is None else targets).items():
        if name not in types:
            continue
        p = params[tgt.param]
        if name not in types or p.dim() < 2 or id(p) in lookups or name.endswith(".bias"):
            continue  # an untied embedding is only a row lookup; biases (gpt-oss's are 2-D) are added, not multiplied
        if tgt.split in ("T", "gate_il", "up_il"):  # gpt-oss: x @ w[e], gate and up interleaved in columns
            phases.setdefault(tgt.param, {})[0 if tgt.split in ("T", "gate_il") else 1] = vec_dot_type(types[name])
            continue
        if tgt.split in ("k_b", "v_b"):  # MLA: llama.cpp multiplies other activations by these (absorbed)
            mla.setdefault(tgt.param.rsplit(".kv_b_proj.", 1)[0], {})[tgt.split] = vec_dot_type(types[name])
            skipped.add(tgt.param)
            continue
        if not tgt.is_row_slice:
            raise ValueError(f"{name}: a part of {tgt.param} that llama.cpp's matmul emulation cannot intercept")
        rows = p.shape[-2] if p.dim() == 3 else p.shape[0]
        start, stop = (tgt.part.start, tgt.part.stop) if tgt.part is not None else (0, rows)
        per_param.setdefault(tgt.param, []).append((start, stop, vec_dot_type(types[name])))
    table: dict[int, tuple[int, tuple[_Rows, ...]]] = {}
    owners: dict[int, str] = {}
    for pname, parts in per_param.items():
        if pname in skipped:
            continue
        p = params[pname]
        parts.sort()
        merged: list[_Rows] = []
        for start, stop, kind in parts:  # adjacent rows with one activation type become one matmul
            if merged and merged[-1].kind == kind and merged[-1].stop == start:
                merged[-1] = _Rows(merged[-1].start, stop, kind)
            else:
                merged.append(_Rows(start, stop, kind))
        rows = p.shape[-2] if p.dim() == 3 else p.shape[0]
        if merged[0].start != 0 or merged[-1].stop != rows or any(a.stop != b.start for a, b in zip(merged, merged[1:])):
            raise ValueError(f"parameter {pname}: GGUF tensors do not cover its rows exactly")
        if p.dim() == 2:
            ptrs = [p.data_ptr()]
        else:
            ptrs = [p[e].data_ptr() for e in range(p.shape[0])]
        for ptr in ptrs:
            table[ptr] = (rows, tuple(merged))
            owners[ptr] = pname
    columns: dict[int, tuple[str | None, ...]] = {}
    for pname, by_phase in phases.items():
        p = params[pname]
        kinds = tuple(by_phase[i] for i in sorted(by_phase))
        for e in range(p.shape[0]):
            columns[p[e].data_ptr()] = kinds
            owners[p[e].data_ptr()] = pname
    with _eager_experts(model), _absorbed_mla(model, mla), _Mode(table, owners, columns) as mode:
        yield mode


@contextlib.contextmanager
def _eager_experts(model: nn.Module) -> Iterator[None]:
    """transformers' fused experts through their per-expert loop (``F.linear`` / ``@`` per expert, what the mode
    intercepts) rather than a grouped matmul kernel, for the duration."""
    before = getattr(model.config, "_experts_implementation", None)
    if before in (None, "eager"):
        yield
        return
    try:
        model.set_experts_implementation("eager")  # type: ignore[operator]
    except ValueError:  # a model without switchable experts
        yield
        return
    try:
        yield
    finally:
        model.set_experts_implementation(before)  # type: ignore[operator]


@contextlib.contextmanager
def _absorbed_mla(model: nn.Module, kinds: Mapping[str, Mapping[str, str | None]]) -> Iterator[None]:
    """MLA attention computed as llama.cpp's graph does (:func:`quantmix.model.mla.absorbed_attention`), with
    q_nope rounded to attn_k_b's activation type and the attention-weighted latent to attn_v_b's."""
    if not kinds:
        yield
        return
    from quantmix.model.mla import MLACall, absorbed_attention, mla_attention

    def around(call: MLACall) -> tuple:
        k = kinds[call.name]
        return absorbed_attention(call, lambda x: quantize_activations(x, k.get("k_b")),
                                  lambda x: quantize_activations(x, k.get("v_b"))), None

    with mla_attention(model, around, select=lambda name: name in kinds) as n:
        if n != len(kinds):
            raise ValueError(f"{len(kinds)} MLA attention modules have quantized attn_k_b / attn_v_b, "
                             f"{n} were found in {type(model).__name__}")
        yield

