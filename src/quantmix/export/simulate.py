"""Simulated quantization: give a Hugging Face model the weights llama.cpp would load from the quantized GGUF.

Each weight is replaced by its quantize -> dequantize image under the recipe, computed in GGUF row order with
the same numerics the GGUF writer uses, so a forward pass in transformers sees exactly the weights llama.cpp
computes with (up to the kernels' float arithmetic). That lets quantization errors be measured (KL-divergence,
perplexity) with a transformers forward pass, on GPU, without writing a file.

Mapping HF parameters to GGUF tensors goes through the catalog built from the model's config
(:func:`quantmix.model.catalog.catalog_from_config`, whose ``TensorInfo.hf_sources`` name the checkpoint
tensors behind each GGUF tensor) and the catalog's own undoing of transformers' in-memory fusions, so:

- plain linear weights map one to one (HF ``[out, in]`` is GGUF ``[ne0=in, ne1=out]``, same memory order);
- llama.cpp's converter permutes attn_q / attn_k rows for llama-family models (``LlamaModel.permute`` in
  conversion/llama.py, so rope can use adjacent pairs): those are permuted to GGUF order, quantized, and
  permuted back;
- merged experts: GGUF ``ffn_*_exps`` ``[ne0, ne1, n_expert]`` is the stack of per-expert checkpoint tensors;
  transformers 5 keeps them fused in memory (``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` = gate then up,
  ``down_proj`` ``[E, H, I]``), so each GGUF tensor is a slice of a fused parameter, quantized per expert with
  that expert's imatrix row;
- a GGUF stored in F16/BF16 is rounded to it first (what the quantizer read); tied embeddings are one
  parameter, quantized as token_embd (llama.cpp reuses it as the output head).
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quantmix.calibration.imatrix_io import Imatrix, read_imatrix
from quantmix.formats.registry import get_type
from quantmix.model.catalog import Catalog, TensorInfo
from quantmix.planning.recipe import Resolution

__all__ = ["SimulationError", "SimulatedTensor", "SimulationReport", "simulate_quantization",
           "permute_rows", "unpermute_rows", "PERMUTED_QK_ARCHITECTURES", "tensor_targets", "quantized_image"]

# HF architectures whose llama.cpp converter permutes q/k rows (LlamaModel and subclasses with undo_permute).
PERMUTED_QK_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "ArceeForCausalLM",
    "SmolLM3ForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM",
})


class SimulationError(ValueError):
    """The model and the recipe do not fit together; the message names the tensor or parameter."""


@dataclass(frozen=True)
class SimulatedTensor:
    """One GGUF tensor applied to the model: where it went and how much it changed the weights."""

    gguf_name: str
    qtype: str
    param: str
    rel_mse: float  # sum (w' - w)^2 / sum w^2 over this tensor
    part: tuple[int, int] | None = None  # rows [start, stop) along dim 1 of a fused 3-D expert parameter
    permuted_heads: int = 0  # q/k rows were permuted with this head count for quantization


@dataclass
class SimulationReport:
    """What :func:`simulate_quantization` did."""

    tensors: list[SimulatedTensor] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # GGUF tensors left in float32 (identity)
    not_in_model: list[str] = field(default_factory=list)  # GGUF tensors with no HF parameter (rope_freqs, ...)
    n_weights: int = 0  # weights replaced

    def by_name(self) -> dict[str, SimulatedTensor]:
        return {t.gguf_name: t for t in self.tensors}


def permute_rows(w: Tensor, n_head: int) -> Tensor:
    """llama.cpp's converter permutation (HF rotate-half layout -> GGUF interleaved pairs) of q/k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: Tensor, n_head: int) -> Tensor:
    """Inverse of :func:`permute_rows`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------ mapping


# Architectures whose converter stores RMSNorm weights as (1 + w) (conversion/gemma.py): transformers keeps w.
NORM_PLUS_ONE_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})


@dataclass(frozen=True)
class _Target:
    """Where one GGUF tensor lives in the model: parameter, slice along dim 1 of a fused 3-D parameter, the
    converter's split of one parameter into several GGUF tensors (``split``: MLA's k_b / v_b, gpt-oss's
    interleaved gate / up, a transpose), the head count of a q/k row permutation (0: none) and the constant the
    converter adds (Gemma's norms: +1).

    :meth:`read` gives the tensor in GGUF row order (numpy order of the GGUF tensor); :meth:`write` puts such a
    tensor back into the parameter's data."""

    info: TensorInfo
    param: str
    part: slice | None
    n_head_perm: int
    split: str = ""  # "", "k_b", "v_b", "gate_il", "up_il", "T"
    dims: tuple[int, ...] = ()  # MLA: (n_head_kv, qk_nope_head_dim, v_head_dim)
    shift: float = 0.0

    def view(self, data: Tensor) -> Tensor:
        """A view of the parameter's data in GGUF row order, before the q/k permutation."""
        w = data[:, self.part] if self.part is not None else data
        if self.split in ("k_b", "v_b"):
            h, nope, v = self.dims
            kv = w.view(h, nope + v, w.shape[-1])
            return kv[:, :nope, :].transpose(1, 2) if self.split == "k_b" else kv[:, nope:, :]
        if self.split in ("gate_il", "up_il"):
            t = w.transpose(-1, -2) if w.dim() == 3 else w
            start = 0 if self.split == "gate_il" else 1
            return t[:, start::2, :] if w.dim() == 3 else t[..., start::2]
        if self.split == "T":
            return w.transpose(-1, -2)
        return w

    @property
    def is_row_slice(self) -> bool:
        """The GGUF tensor's rows are whole rows of the parameter (what activation emulation can intercept)."""
        return self.split == ""

    def read(self, data: Tensor) -> Tensor:
        return self.to_gguf(self.view(data))

    def to_gguf(self, view: Tensor) -> Tensor:
        """A copy of ``view`` (what :meth:`view` gives) in GGUF order and values: q/k permuted, shift added."""
        w = permute_rows(view, self.n_head_perm) if self.n_head_perm else view.clone()
        return w + self.shift if self.shift else w

    def write(self, data: Tensor, value: Tensor) -> None:
        v = value - self.shift if self.shift else value
        if self.n_head_perm:
            v = unpermute_rows(v, self.n_head_perm)
        dst = self.view(data)
        dst.copy_(v.reshape(dst.shape).to(dst.device, dst.dtype))


def _config_catalog(model: nn.Module) -> tuple[Catalog, object]:
    from quantmix.model.catalog import catalog_from_config

    cfg = model.config  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="quantmix-sim-") as d:
        cfg.save_pretrained(d)
        return catalog_from_config(Path(d)), cfg


def _split_of(info: TensorInfo, n_hits: int, arch: str) -> str:
    """How the converter made GGUF tensor ``info`` out of its parameter (conversion/deepseek.py: kv_b split
    into k_b transposed and v_b; conversion/gpt_oss.py: gate/up interleaved in one fused parameter, experts
    stored transposed)."""
    key = info.name.split(".")[-2]
    if key in ("attn_k_b", "attn_v_b"):
        return "k_b" if key == "attn_k_b" else "v_b"
    if arch == "gpt-oss" and key in ("ffn_gate_exps", "ffn_up_exps"):
        return "gate_il" if key == "ffn_gate_exps" else "up_il"
    if arch == "gpt-oss" and info.name.endswith("ffn_down_exps.weight"):
        return "T"
    if n_hits > 1:
        raise SimulationError(f"{info.name}: one of {n_hits} GGUF tensors made from one parameter; simulating "
                              f"that split is not supported")
    return ""


def tensor_targets(model: nn.Module) -> dict[str, _Target]:
    """GGUF tensor name -> its place in the model."""
    from quantmix.model.catalog import checkpoint_tensors

    catalog, cfg = _config_catalog(model)
    by_source: dict[str, list[TensorInfo]] = {}
    for t in catalog:
        for s in t.hf_sources:
            by_source.setdefault(s, []).append(t)
    tc = getattr(cfg, "text_config", None) or cfg
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    permute = arch in PERMUTED_QK_ARCHITECTURES
    n_head = int(getattr(tc, "num_attention_heads", 0) or 0)
    n_kv = int(getattr(tc, "num_key_value_heads", None) or n_head)
    mla = (n_kv, int(getattr(tc, "qk_nope_head_dim", 0) or 0), int(getattr(tc, "v_head_dim", 0) or 0))
    plus_one = catalog.hparams.arch in NORM_PLUS_ONE_ARCHITECTURES
    out: dict[str, _Target] = {}
    for pname, p in model.named_parameters():
        parts = checkpoint_tensors(cfg, [(pname, tuple(p.shape))])
        fused = len(parts) > 1 or parts[0][2] != (parts[0][0],)
        off = 0
        for merged, part_shape, sources in parts:
            hits = {t.name: t for s in sources for t in by_source.get(s, [])}
            if not hits:
                off += part_shape[1] if fused and len(part_shape) > 1 else 0
                continue
            part = slice(off, off + part_shape[1]) if fused else None
            if fused:
                off += part_shape[1]
            for info in hits.values():
                split = _split_of(info, len(hits), catalog.hparams.arch)
                perm = 0
                if permute and info.tensor_class == "attn_q" and merged.endswith("q_proj.weight"):
                    perm = n_head
                elif permute and info.tensor_class == "attn_k" and merged.endswith("k_proj.weight"):
                    perm = n_kv
                shift = 1.0 if plus_one and info.name.endswith("norm.weight") else 0.0
                tgt = _Target(info, pname, part, perm, split, mla if split in ("k_b", "v_b") else (), shift)
                shape = tuple(tgt.view(torch.empty(p.shape, device="meta")).shape)
                if tuple(reversed(shape)) != tuple(info.shape):
                    raise SimulationError(f"parameter {pname} ({list(part_shape)}) does not match GGUF tensor "
                                          f"{info.name} {list(info.shape)}")
                out[info.name] = tgt
    return out


# ------------------------------------------------------------------------------------------------ numerics


def _round_to(x: Tensor, type_name: str) -> Tensor:
    if type_name == "F16":
        return x.to(torch.float16).float()
    if type_name == "BF16":
        return x.to(torch.bfloat16).float()
    return x


def quantized_image(w: Tensor, qtype: str, src_type: str, imatrix: np.ndarray | None, name: str, dev: torch.device,
                    out_dtype: torch.dtype = torch.float32) -> Tensor:
    """quantize -> dequantize of GGUF-ordered rows ``w`` [..., rows, ne0] (leading dim: experts), in
    ``out_dtype`` on ``dev``. One expert at a time in float32: besides the result, only one expert's rows are
    ever held in float32 (a DeepSeek-V3 expert stack is 15 GB in float32)."""
    from quantmix.formats.api import dequantize, quantize
    from quantmix.formats.ggml_backend import preferred_backend

    backend = preferred_backend(qtype, dev)  # ggml's C on a CPU where it is faster: same bytes
    ne0 = w.shape[-1]
    flat = w.reshape(-1, w.shape[-2], ne0) if w.dim() > 2 else w.reshape(1, -1, ne0)
    out = torch.empty(flat.shape, dtype=out_dtype, device=dev)
    for e in range(flat.shape[0]):
        x = _round_to(flat[e].detach().to(device=dev, dtype=torch.float32), src_type)
        if qtype == src_type:
            out[e] = x
            continue
        im = None
        if imatrix is not None:
            im = torch.from_numpy(np.ascontiguousarray(imatrix[e if imatrix.shape[0] > 1 else 0])).to(dev)
        q = quantize(x.contiguous(), qtype, im, name=name, backend=backend)
        out[e] = dequantize(q, qtype, ne0, name=name)
    return out.reshape(w.shape)


# ------------------------------------------------------------------------------------------------ public


@torch.no_grad()
def simulate_quantization(
    model: nn.Module,
    resolution: Resolution,
    imatrix: str | Path | Imatrix | None = None,
    device: str | torch.device | None = None,
    *,
    only: Collection[str] | None = None,
    targets: dict[str, _Target] | None = None,
) -> SimulationReport:
    """Replace, in place, every weight of ``model`` by what llama.cpp would load from the GGUF that
    :func:`quantmix.export.gguf_writer.quantize_gguf` writes for ``resolution`` (and ``imatrix``).

    One GGUF tensor at a time (bounded extra memory). ``device``: where quantization runs (default: CUDA when
    present); results are written back to each parameter's own device. Parameters should be float32: a
    lower-precision model cannot hold the dequantized values exactly (a SimulationError says so). ``only``: just
    these tensors (the streaming engine's present layer; the rest of the model may be on the meta device);
    ``targets``: the model's tensor targets, when already known."""
    from quantmix.export.gguf_writer import needs_imatrix

    im = read_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    targets = tensor_targets(model) if targets is None else targets
    params = dict(model.named_parameters())
    report = SimulationReport()
    ftype = resolution.spec.ftype
    for a in resolution.assignments:
        name = a.tensor.name
        if only is not None and name not in only:
            continue
        src_type = a.tensor.source_type or "F32"
        qtype = src_type if a.reason.startswith("not quantized") else get_type(a.qtype).name
        tgt = targets.get(name)
        if tgt is None:
            report.not_in_model.append(name)
            continue
        if tuple(tgt.info.shape) != tuple(a.tensor.shape):
            raise SimulationError(f"tensor {name}: the recipe's shape {list(a.tensor.shape)} is not the model's "
                                  f"{list(tgt.info.shape)}")
        if qtype == "F32" and src_type == "F32":
            report.unchanged.append(name)
            continue
        p = params[tgt.param]
        if p.dtype != torch.float32:
            raise SimulationError(f"parameter {tgt.param} is {p.dtype}: load the model in float32 to simulate "
                                  f"quantization exactly")
        w_im = None
        if qtype != src_type and im is not None:
            w_im = im.weights_for(name, tuple(a.tensor.shape))
        if w_im is None and qtype != src_type and needs_imatrix(name, qtype, ftype):
            raise SimulationError(f"tensor {name}: type {qtype} needs an importance matrix (imatrix)")
        view = tgt.view(p.data)
        if view.dim() == 3 and not tgt.n_head_perm and not tgt.shift:
            # an expert stack: each expert quantized and written back in place, so no copy of the whole stack
            # is made (DeepSeek-V3's is 15 GB in float32, beside a 45 GB layer)
            pieces = [(view[e:e + 1], w_im[e:e + 1] if w_im is not None and w_im.shape[0] > 1 else w_im)
                      for e in range(view.shape[0])]
        else:
            pieces = [(None, w_im)]
        ref = err = 0.0
        for dst, piece_im in pieces:
            wq = tgt.read(p.data) if dst is None else dst.clone()
            new = quantized_image(wq, qtype, src_type, piece_im, name, dev).to(p.device)
            for a_, b_ in zip(wq.reshape(-1, wq.shape[-1]).split(1 << 14),
                              new.reshape(-1, wq.shape[-1]).split(1 << 14)):
                ref += float(a_.double().square().sum())  # in slices: a whole expert tensor in float64 is 15 GB
                err += float((b_.double() - a_.double()).square().sum())
            if dst is None:
                tgt.write(p.data, new)
            else:
                dst.copy_(new)
            del wq, new
        part = (tgt.part.start, tgt.part.stop) if tgt.part is not None else None
        report.tensors.append(SimulatedTensor(name, qtype, tgt.param, float(err / ref) if ref > 0 else 0.0, part,
                                              tgt.n_head_perm))
        report.n_weights += int(view.numel())
    return report
