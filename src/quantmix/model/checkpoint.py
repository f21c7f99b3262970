"""Checkpoints read as the float weights they stand for: plain, block-scaled FP8, compressed-tensors, MXFP4.

Real releases store weights quantized: DeepSeek-V3, GLM-4.6-FP8 and Qwen3-*-FP8 keep ``float8_e4m3fn`` weights
with a float32 ``<name>_scale_inv`` per 128x128 block; compressed-tensors checkpoints keep ``weight`` plus
``weight_scale`` (per tensor, channel or block); gpt-oss keeps its experts as MXFP4 (``*_blocks`` + ``*_scales``).
Every consumer of weights here (imatrix, KLD probes, evaluation) needs the real values, so this reader undoes
those encodings exactly as llama.cpp's converter does (``conversion/base.py`` ``dequant_model``): weight times
the scale of its block, edge blocks cropped, the auxiliary tensors hidden. What it cannot read (another quant
method, a float8 tensor with no scale, an integer weight) is an error naming file, tensor and dtype: a silent
cast would hand the optimizer wrong weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Checkpoint", "CheckpointError", "ScaledTensor", "load_float_model", "mxfp4_to_float"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALES = (*_FLOATS, torch.float8_e8m0fnu)

# FP4 e2m1 code -> value (the low nibble holds the even element), as transformers' integrations/mxfp4.py
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class CheckpointError(ValueError):
    """A checkpoint cannot be read as float weights; the message names the file, the tensor and why."""


@dataclass(frozen=True)
class _Rule:
    """How one visible tensor is made from stored ones: ``parts`` = (weight,) or (weight, scale) or
    (blocks, scales); ``block`` = the scale's block shape (None: per tensor or per channel)."""

    kind: str  # "plain" | "scaled" | "mxfp4"
    parts: tuple[str, ...]
    block: tuple[int, ...] | None = None


def _quant_config(model_dir: Path) -> dict[str, Any]:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        return {}
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    qc = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config") or {}
    return qc if isinstance(qc, dict) else {}


def _rules(names: list[str], qc: dict[str, Any], where: str) -> dict[str, _Rule]:
    """Visible name -> rule, following the converter's ``dequant_model`` for ``qc['quant_method']``."""
    stored = set(names)
    method = qc.get("quant_method")
    rules: dict[str, _Rule] = {}
    hidden: set[str] = set()

    def scaled(weight: str, scale: str, block: Any) -> None:
        if weight not in stored:
            raise CheckpointError(f"{where}: scale tensor {scale!r} has no weight {weight!r}")
        rules[weight] = _Rule("scaled", (weight, scale), tuple(int(b) for b in block) if block else None)
        hidden.add(scale)

    if method == "fp8":
        block = qc.get("weight_block_size")
        for n in names:
            if n.endswith("_scale_inv"):
                scaled(n.removesuffix("_scale_inv"), n, block)
            elif n.endswith(".qscale_weight"):  # Mistral's format
                scaled(n.removesuffix("qscale_weight") + "weight", n, block)
            elif n.endswith((".activation_scale", "_activation_scale", ".qscale_act")):  # unused
                hidden.add(n)
    elif method == "compressed-tensors":
        fmt = qc.get("format")
        groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
        weights = [g.get("weights") or {} for g in groups]
        if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
            raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} is not read (float-quantized, "
                                  "int-quantized and naive-quantized are)")
        if not weights or any(w != weights[0] for w in weights):
            raise CheckpointError(f"{where}: compressed-tensors needs one weight scheme, found {len(weights)}")
        w = weights[0]
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel", "block") or w.get("group_size") is not None:
            raise CheckpointError(f"{where}: compressed-tensors weight strategy {strategy!r} is not read "
                                  "(tensor, channel and block are)")
        if w.get("symmetric") is False:
            raise CheckpointError(f"{where}: asymmetric compressed-tensors weights (zero points) are not read")
        block = w.get("block_structure") if strategy == "block" else None
        for n in names:
            if n.endswith(".weight_scale"):
                scaled(n.removesuffix("_scale"), n, block)
            elif n.endswith((".input_scale", ".weight_zero_point", ".input_zero_point", ".k_scale", ".v_scale")):
                hidden.add(n)
    elif method == "mxfp4":
        for n in names:
            if n.endswith("_blocks") and n.removesuffix("_blocks") + "_scales" in stored:
                base = n.removesuffix("_blocks")
                rules[base] = _Rule("mxfp4", (n, base + "_scales"))
                hidden.update((n, base + "_scales"))
    elif method is not None:
        raise CheckpointError(f"{where}: quantization_config.quant_method {method!r} is not read "
                              "(fp8, compressed-tensors and mxfp4 are)")
    for n in names:
        if n not in hidden and n not in rules:
            rules[n] = _Rule("plain", (n,))
    return dict(sorted(rules.items()))


def _scaled(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, ...] | None) -> torch.Tensor | None:
    """float32 ``w`` x its scale: one scale per ``block`` tile of the last dims (edge tiles cropped), else per
    tensor or per output channel; None when the scale's shape does not fit the weight."""
    x, s = w.float(), scale.float()
    if block is not None:
        k = len(block)
        if x.dim() < k:
            return None
        lead, tail = tuple(x.shape[:-k]), tuple(x.shape[-k:])
        grid = tuple(math.ceil(d / b) for d, b in zip(tail, block))
        if tuple(s.shape) != lead + grid:
            return None
        if all(d % b == 0 for d, b in zip(tail, block)):  # whole tiles: no full-size copy of the scale
            tiles = [v for n, b in zip(grid, block) for v in (n, b)]
            ones = [v for n in grid for v in (n, 1)]
            return (x.reshape(*lead, *tiles) * s.reshape(*lead, *ones)).reshape(x.shape)
        for i, b in enumerate(block):
            s = s.repeat_interleave(b, dim=x.dim() - k + i)
        return x * s[tuple(slice(0, d) for d in x.shape)]
    if s.numel() == 1:
        return x * s.reshape(())
    if x.dim() >= 1 and s.numel() == x.shape[0] and s.shape[0] == x.shape[0]:  # per output channel
        return x * s.reshape(x.shape[0], *([1] * (x.dim() - 1)))
    return None


@dataclass
class ScaledTensor:
    """A weight kept as stored (float8 or int8 values and their block scales) until it is on the device that
    computes with it: a quarter of float32's bytes to read, pin and upload; :meth:`to_float` does the scaling
    there, one leading slice (expert) at a time, so no float32 copy of a whole expert stack is ever made."""

    values: torch.Tensor  # [..., rows, cols] float8 / int8
    scale: torch.Tensor  # [..., ceil(rows / b0), ceil(cols / b1)]
    block: tuple[int, ...]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def pin_memory(self) -> ScaledTensor:
        return ScaledTensor(self.values.pin_memory(), self.scale.pin_memory(), self.block)

    def to_float(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        w = self.values.to(device, non_blocking=True)
        s = self.scale.to(device, non_blocking=True)
        if w.dim() == 2:
            return _scaled(w, s, self.block).to(dtype)  # type: ignore[union-attr]
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
        for e in range(w.shape[0]):
            out[e] = _scaled(w[e], s[e], self.block)  # type: ignore[index]
        return out


def mxfp4_to_float(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 ``blocks`` uint8 [..., G, 16] (two e2m1 codes a byte, even element in the low nibble) and e8m0
    ``scales`` uint8 [..., G] -> float32 [..., G * 32]: code value x 2^(scale - 127), exact in float32."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32)
    vals = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)
    vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return vals.flatten(-2)


class Checkpoint:
    """Lazy access by name to a model directory's safetensors tensors (single file or sharded), each as the
    float tensor it stands for: plain floats as stored, quantized ones dequantized to float32. ``keys()``
    lists what the model sees; auxiliary scale/block tensors are hidden, as llama.cpp's converter hides them."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self._open = safe_open
        self._handles: dict[Path, Any] = {}
        self.where: dict[str, Path] = {}  # stored tensor -> file
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            self.where = {k: self.dir / v for k, v in wmap.items()}
            by_file: dict[Path, list[str]] = {}
            for k, f in self.where.items():
                by_file.setdefault(f, []).append(k)
            for f, named in sorted(by_file.items()):  # fail now, not hours into a run
                if not f.exists():
                    raise CheckpointError(f"{f}: safetensors shard missing (named by {index.name})")
                have = set(self._handle(f).keys())
                lost = sorted(k for k in named if k not in have)
                if lost:
                    raise CheckpointError(f"{f}: the index puts {lost[0]!r} (and {len(lost) - 1} more) in this "
                                          "shard, which does not hold it")
            self.close()
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors weights (other checkpoint formats are not read)")
            for f in files:
                for k in self._handle(f).keys():
                    self.where[k] = f
        self.quantization = _quant_config(self.dir)
        self._rules = _rules(sorted(self.where), self.quantization, str(self.dir))

    def _handle(self, f: Path) -> Any:
        if f not in self._handles:
            if not f.exists():
                raise CheckpointError(f"{f}: safetensors shard missing")
            try:
                self._handles[f] = self._open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt ({e})") from None
        return self._handles[f]

    def keys(self) -> list[str]:
        """The tensors the model sees, sorted (dequantized ones under their weight's name)."""
        return list(self._rules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __contains__(self, key: str) -> bool:
        return key in self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def close(self) -> None:
        """Unmap the files: pages read so far stop counting against this process."""
        self._handles.clear()

    def raw(self, key: str) -> torch.Tensor:
        """A stored tensor as it is on disk (auxiliary ones included), no conversion."""
        if key not in self.where:
            raise CheckpointError(f"{self.dir}: checkpoint has no tensor {key!r}")
        f = self.where[key]
        h = self._handle(f)
        try:
            return h.get_tensor(key)
        except Exception as e:  # a shard the index names but that lacks the tensor, a dtype torch lacks
            raise CheckpointError(f"{f}: tensor {key!r} cannot be read ({e})") from None

    def _bad(self, key: str, t: torch.Tensor, why: str) -> CheckpointError:
        return CheckpointError(f"{self.where[key]}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')} "
                               f"{list(t.shape)}: {why}")

    def get_stored(self, key: str) -> torch.Tensor | ScaledTensor:
        """Tensor ``key`` as :meth:`get` gives it, except that a block-scaled float8 / int8 weight whose blocks
        tile it exactly comes as a :class:`ScaledTensor` (scaled later, on the device)."""
        rule = self._rules.get(key)
        if rule is not None and rule.kind == "scaled" and rule.block is not None and len(rule.block) == 2:
            w, sc = (self.raw(p) for p in rule.parts)
            grid = tuple(-(-d // b) for d, b in zip(w.shape[-2:], rule.block))
            if w.dtype in (*_FP8, torch.int8) and sc.dtype in _SCALES and w.dim() >= 2 \
                    and all(d % b == 0 for d, b in zip(w.shape[-2:], rule.block)) \
                    and tuple(sc.shape) == tuple(w.shape[:-2]) + grid:
                return ScaledTensor(w, sc, rule.block)
        return self.get(key)

    def get(self, key: str) -> torch.Tensor:
        """The real float tensor named ``key``."""
        rule = self._rules.get(key)
        if rule is None:
            raise CheckpointError(f"{self.dir}: checkpoint has no tensor {key!r}")
        if rule.kind == "plain":
            t = self.raw(key)
            if t.dtype in _FLOATS:
                return t
            how = ("float8 without a scale tensor" if t.dtype in (*_FP8, torch.float8_e8m0fnu)
                   else "not a float weight")
            method = self.quantization.get("quant_method")
            raise self._bad(key, t, f"{how} (quant_method {method!r}); not read rather than cast")
        if rule.kind == "scaled":
            w, s = (self.raw(p) for p in rule.parts)
            if w.dtype not in (*_FLOATS, *_FP8, torch.int8):
                raise self._bad(rule.parts[0], w, "a scaled weight must be float8, int8 or float")
            if s.dtype not in _SCALES:
                raise self._bad(rule.parts[1], s, "a scale must be float")
            out = _scaled(w, s, rule.block)
            if out is None:
                raise self._bad(rule.parts[1], s, f"does not fit weight {list(w.shape)} "
                                f"(block {list(rule.block) if rule.block else 'none'})")
            return out
        b, s = (self.raw(p) for p in rule.parts)
        if b.dtype != torch.uint8 or s.dtype != torch.uint8 or b.dim() < 2 or b.shape[-1] != 16 \
                or tuple(b.shape[:-1]) != tuple(s.shape):
            raise self._bad(rule.parts[0], b, f"MXFP4 blocks need uint8 [..., G, 16] with uint8 scales [..., G], "
                            f"scales are {str(s.dtype).removeprefix('torch.')} {list(s.shape)}")
        out = mxfp4_to_float(b, s)  # [..., rows, in]
        # gpt-oss's experts multiply x @ W: in memory [E, in, out], the transpose of the stored rows
        return out.transpose(-1, -2).contiguous() if out.dim() == 3 else out


def float_config(model_dir: str | Path) -> Any:
    """The model's transformers config for a float model: ``quantization_config`` dropped (quantmix reads FP8 /
    MXFP4 weights dequantized). transformers' own errors on an unreadable config.json propagate."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
        if hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")  # the model we build holds floats
    return cfg


def load_float_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                     device: str | torch.device | None = None) -> torch.nn.Module:
    """The transformers model of ``model_dir`` in ``dtype`` on ``device`` (CPU by default), every weight read
    through :class:`Checkpoint`: for a plain checkpoint what ``from_pretrained(dtype=...)`` gives, for a
    quantized one the float model (the config's ``quantization_config`` dropped, weights dequantized), which
    transformers itself would refuse on a CPU or keep in fp8 modules. Per-expert checkpoint tensors are fused
    into transformers' in-memory parameters by :class:`quantmix.model.weights.ModelWeights`' mapping (:mod:`quantmix.model.catalog`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from quantmix.model.weights import ModelWeights, materialize

    model_dir = Path(model_dir)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cfg = float_config(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.tie_weights()  # on the meta device the tie is not made: lm_head would be read as its own tensor
    weights = ModelWeights(model_dir, cfg)
    materialize(model, "", weights, dev, dtype)
    for name, b in list(model.named_buffers()):  # stored buffers (router score bias) in dtype, as from_pretrained
        if name in weights.ckpt and b.is_floating_point():
            mod, _, leaf = name.rpartition(".")
            model.get_submodule(mod)._buffers[leaf] = b.to(dtype)
    model.tie_weights()  # loading replaced the shared parameter: tie lm_head to the loaded embeddings again
    return model.eval()
