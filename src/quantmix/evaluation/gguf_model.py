"""Load a quantized GGUF's weights into the matching Hugging Face model, so transformers can evaluate it.

Each GGUF tensor is dequantized (quantmix's numerics, bit-identical to ggml's ``to_float``; gguf-py's for
types quantmix has no numerics for) and written into the parameter it came from. The GGUF-name -> parameter
mapping (plain linears, llama's q/k row permutation, slices of fused expert parameters) is the one
:mod:`quantmix.export.simulate` uses, so a GGUF and a simulated recipe load the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantmix.model.gguf_header import GGUFTensor, read_gguf_header

__all__ = ["GGUFLoadError", "GGUFLoadReport", "load_gguf_weights", "dequantize_gguf_tensor"]


# A GGUF tensor whose dequantized values differ from the float weights by more than the weights themselves
# (relative squared error above 1: worse than storing zeros) is not a quantization of them. For scale, on Gaussian
# 256 x 512 weights: IQ1_S, the coarsest type, 0.24; IQ2_XXS 0.12; Q2_K 0.07; another draw of the same shape 1.99.
MAX_REL_ERROR = 1.0


class GGUFLoadError(ValueError):
    """The GGUF does not fit the model; the message names the file and tensor."""


@dataclass
class GGUFLoadReport:
    """What :func:`load_gguf_weights` did."""

    path: Path
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor -> its stored type
    not_in_model: list[str] = field(default_factory=list)  # GGUF tensors with no parameter (rope_freqs, ...)
    off_main_path: list[str] = field(default_factory=list)  # NextN / MTP layers: not in the next-token forward
    n_bytes: int = 0  # tensor data, all tensors (quantmix's size unit)
    n_elements: int = 0  # all tensors

    @property
    def bpw(self) -> float:
        return 8.0 * self.n_bytes / self.n_elements if self.n_elements else 0.0


def dequantize_gguf_tensor(t: GGUFTensor, mm: np.memmap, data_offset: int) -> torch.Tensor:
    """One GGUF tensor as float32, shaped as numpy sees it (ggml's shape reversed)."""
    from quantmix.formats.api import dequantize, supported_types

    raw = np.array(mm[data_offset + t.offset: data_offset + t.offset + t.n_bytes])
    if raw.size != t.n_bytes:
        raise GGUFLoadError(f"{t.shard}: tensor {t.name} is truncated ({raw.size} of {t.n_bytes} bytes)")
    shape = tuple(reversed(t.shape))
    if t.type_name in supported_types():
        return dequantize(torch.from_numpy(raw), t.type_name, t.shape[0], name=t.name).reshape(shape)
    import gguf

    try:
        qt = gguf.GGMLQuantizationType[t.type_name]
        out = gguf.quants.dequantize(raw, qt)
    except (KeyError, NotImplementedError) as e:
        raise GGUFLoadError(f"{t.shard}: tensor {t.name} has type {t.type_name}, which neither quantmix nor "
                            f"gguf-py can dequantize ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def _main_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    tc = getattr(cfg, "text_config", None) or cfg
    return int(getattr(tc, "num_hidden_layers", 0) or 0)


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without trailing 1s (GGUF headers store ggml_n_dims dimensions: [256, 1] is written [256])."""
    s = list(shape)
    while len(s) > 1 and s[-1] == 1:
        s.pop()
    return tuple(s)


class GGUFWeights:
    """A GGUF's tensors checked against a model (names, shapes), written into it on demand: all at once
    (:func:`load_gguf_weights`) or a decoder layer at a time as the streaming engine loads it.

    ``partial``: ``model`` holds only some of the GGUF's tensors (a NextN layer on its own); the others are
    not checked. ``targets``: the model's tensor targets, when already known."""

    def __init__(self, model: nn.Module, gguf_path: str | Path, partial: bool = False,
                 targets: dict | None = None) -> None:
        from quantmix.export.simulate import tensor_targets
        from quantmix.model.catalog import beyond_decoder_layers

        self.path = path = Path(gguf_path)
        header = read_gguf_header(path)
        self.header = header
        self.tensors = tensors = {t.name: t for t in header.tensors}
        self.targets = targets = tensor_targets(model) if targets is None else targets
        missing = sorted(set(targets) - set(tensors))
        if missing:
            raise GGUFLoadError(f"{path}: has no tensor {missing[0]} ({len(missing)} of the model's tensors "
                                f"missing): not a quantization of this model")
        report = GGUFLoadReport(path, n_bytes=header.tensor_bytes,
                                n_elements=sum(t.n_elements for t in header.tensors))
        n_main = _main_layers(model)
        for name, t in tensors.items():
            report.types[name] = t.type_name
            if name not in targets and not partial:
                if beyond_decoder_layers(name, n_main):  # a NextN layer: not on the next-token path, so leaving
                    # it out of the evaluation is exact
                    report.off_main_path.append(name)
                    continue
                if len([d for d in t.shape if d > 1]) > 1:
                    raise GGUFLoadError(f"{path}: tensor {name} {list(t.shape)} has no parameter in "
                                        f"{type(model).__name__}: not a quantization of this model")
                report.not_in_model.append(name)
        for name, tgt in targets.items():
            t = tensors[name]
            if _squeeze(t.shape) != _squeeze(tgt.info.shape):
                raise GGUFLoadError(f"{path}: tensor {name} has shape {list(t.shape)}, the model's is "
                                    f"{list(tgt.info.shape)}: not a quantization of this model")
        self.report = report
        self._maps = {p: np.memmap(p, dtype=np.uint8, mode="r") for p in header.paths}

    @torch.no_grad()
    def apply(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        """Write the GGUF's dequantized values into ``model`` (every target, or ``names``; their parameters
        must be present, in float32, and hold the float weights)."""
        params = dict(model.named_parameters())
        for name in (self.targets if names is None else names):
            tgt = self.targets[name]
            t = self.tensors[name]
            p = params[tgt.param]
            if p.dtype != torch.float32:
                raise GGUFLoadError(f"parameter {tgt.param} is {p.dtype}: load the model in float32 to hold the "
                                    f"GGUF's dequantized weights exactly")
            w = dequantize_gguf_tensor(t, self._maps[t.shard], self.header.data_offsets[t.shard])
            dst = tgt.view(p.data)
            if dst.numel() != w.numel():
                raise GGUFLoadError(f"{self.path}: tensor {name} ({w.numel()} values) does not fill {tgt.param} "
                                    f"{list(dst.shape)}")
            ref = tgt.read(p.data).reshape(w.shape).double()
            den = float(ref.square().sum())
            rel = float((w.double() - ref).square().sum()) / den if den > 0 else 0.0
            if rel > MAX_REL_ERROR:  # worse than all zeros: not this model's weights quantized
                raise GGUFLoadError(f"{self.path}: tensor {name} is not a quantization of {tgt.param} of this "
                                    f"model (relative squared error {rel:.3g} against the float weights; any "
                                    f"quantization of them is below {MAX_REL_ERROR:g}): the GGUF is of another "
                                    f"model")
            tgt.write(p.data, w)


@torch.no_grad()
def load_gguf_weights(model: nn.Module, gguf_path: str | Path, partial: bool = False) -> GGUFLoadReport:
    """Replace, in place, every weight of ``model`` that the GGUF holds by the GGUF's (dequantized) values.

    The model must be the GGUF's own architecture and shapes (the float model it was quantized from), loaded
    in float32. Every parameter the converter writes must be in the GGUF. ``partial``: ``model`` holds only
    some of the GGUF's tensors (a NextN layer on its own); the others are not checked."""
    g = GGUFWeights(model, gguf_path, partial)
    g.apply(model)
    return g.report
