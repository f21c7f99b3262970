"""A transformers module's parameters read from the checkpoint as stored, one module at a time.

transformers fuses some checkpoint tensors on load (per-expert tensors stacked into one 3-D parameter, gate and
up concatenated); :class:`ModelWeights` undoes that per parameter with the tensor catalog's mapping
(:func:`quantmix.model.catalog.checkpoint_tensors`) and reads through :class:`Checkpoint` (FP8 with block
scales, compressed-tensors and MXFP4 dequantized). :func:`materialize` and :func:`release` move a module of a
skeleton built on the meta device between "weights present" and "weights dropped": what lets the forward engine
(:mod:`quantmix.model.engine`), imatrix and the NextN loader hold one layer at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantmix.model.checkpoint import Checkpoint, CheckpointError, ScaledTensor

__all__ = ["ModelWeights", "materialize", "release", "set_tensor", "trim_heap", "module_name"]


class ModelWeights:
    """The checkpoint tensors behind each in-memory (transformers) parameter of ``cfg``'s model."""

    def __init__(self, model_dir: Path, cfg: Any) -> None:
        self.ckpt = Checkpoint(model_dir)
        self.cfg = cfg
        self.dir = Path(model_dir)

    def sources(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
        from quantmix.model.catalog import checkpoint_tensors

        return checkpoint_tensors(self.cfg, [(name, shape)])

    def load(self, name: str, shape: tuple[int, ...], pin: bool = False,
             stored: bool = False) -> torch.Tensor | ScaledTensor:
        """Parameter ``name`` of in-memory ``shape``, as a float tensor on the host (in the stored float dtype;
        ``pin``: in page-locked memory, for a fast upload). Fused parameters are filled part by part in place,
        so a layer's experts are never held twice. ``stored``: block-scaled float8 weights come as
        :class:`ScaledTensor` (stacked the same way), to be scaled on the device."""
        if name in self.ckpt:
            t = self.ckpt.get_stored(name) if stored else self.ckpt.get(name)
        else:
            parts = self.sources(name, shape)
            if len(parts) == 1 and len(parts[0][2]) == 1:
                src = parts[0][2][0]
                t = self.ckpt.get_stored(src) if stored else self.ckpt.get(src)
            else:
                try:
                    t = self._fused(parts, shape, pin, stored)
                except CheckpointError as e:
                    raise CheckpointError(f"{self.dir}: {name}: {e}") from None
                pin = False
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.dir}: {name} is {tuple(t.shape)} in the checkpoint, the model expects "
                                  f"{tuple(shape)}")
        return t.pin_memory() if pin else t

    def _fused(self, parts: list, shape: tuple[int, ...], pin: bool,
               stored: bool = False) -> torch.Tensor | ScaledTensor:
        """[experts, sum of the parts' rows, ...] from per-expert checkpoint tensors, written in place (values
        and scales stacked alike when every part is a :class:`ScaledTensor` whose blocks tile its rows)."""
        first = parts[0][2][0] if parts and parts[0][2] else None
        if stored and first is not None:
            probe = self.ckpt.get_stored(first)
            if isinstance(probe, ScaledTensor) and all(ps[1] % probe.block[0] == 0 for _, ps, _ in parts):
                return self._fused_scaled(parts, shape, pin, probe)
        out = None
        for e, off, src, x in self._expert_parts(parts, shape, self.ckpt.get):
            if out is None:
                out = torch.empty(shape, dtype=x.dtype, pin_memory=pin)
            out[e, off:off + x.shape[0]] = x
        assert out is not None
        return out

    def _expert_parts(self, parts: list, shape: tuple[int, ...], get: Any) -> Any:
        """(expert, first row in the fused parameter, source name, tensor read by ``get``) of every part, shapes
        checked."""
        off = 0
        for _, part_shape, srcs in parts:
            if len(srcs) != shape[0]:
                raise CheckpointError(f"{len(srcs)} checkpoint tensors for {shape[0]} experts")
            for e, src in enumerate(srcs):
                x = get(src)
                if tuple(x.shape) != tuple(part_shape[1:]):
                    raise CheckpointError(f"{src} is {tuple(x.shape)}, expected {tuple(part_shape[1:])}")
                yield e, off, src, x
            off += part_shape[1]

    def _fused_scaled(self, parts: list, shape: tuple[int, ...], pin: bool, like: ScaledTensor) -> ScaledTensor:
        b0, b1 = like.block
        vals = torch.empty(shape, dtype=like.values.dtype, pin_memory=pin)
        scale = torch.empty((shape[0], shape[1] // b0, -(-shape[2] // b1)), dtype=like.scale.dtype, pin_memory=pin)
        for e, off, src, x in self._expert_parts(parts, shape, self.ckpt.get_stored):
            if not isinstance(x, ScaledTensor) or x.block != like.block or x.values.dtype != vals.dtype \
                    or x.scale.dtype != scale.dtype:
                raise CheckpointError(f"{src}: stored unlike the first expert part (every part must share one "
                                      "float8 layout)")
            vals[e, off:off + x.shape[0]] = x.values
            scale[e, off // b0:(off + x.shape[0]) // b0] = x.scale
        return ScaledTensor(vals, scale, like.block)

    def buffer(self, name: str) -> torch.Tensor | None:
        """A buffer stored in the checkpoint (a router's score bias), or None when the model computes it."""
        return self.ckpt.get(name) if name in self.ckpt else None


def set_tensor(root: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    """Put ``value`` in place of parameter (or buffer) ``name`` of ``root`` without autograd bookkeeping."""
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if is_param:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def read_module(module: nn.Module, prefix: str, weights: ModelWeights, dtype: torch.dtype,
                pin: bool = False, stored: bool | None = None) -> dict[str, tuple[torch.Tensor | ScaledTensor, bool]]:
    """``module``'s parameters and stored buffers read on the host: relative name -> (tensor, is_param).
    Cast to ``dtype`` here, or with ``pin`` kept as stored in page-locked memory (uploaded fast, cast on the
    device by :func:`install`). ``stored`` (default: ``pin``): float8 block-scaled weights stay float8 with
    their scales (:class:`ScaledTensor`) and are scaled by :func:`install` on the device. Buffers the model
    computes itself are not in the result."""
    out: dict[str, tuple[torch.Tensor | ScaledTensor, bool]] = {}
    stored = pin if stored is None else stored

    def cast(t: torch.Tensor | ScaledTensor) -> torch.Tensor | ScaledTensor:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and not pin else t

    for pname, p in module.named_parameters():
        full = f"{prefix}.{pname}" if prefix else pname
        out[pname] = (cast(weights.load(full, tuple(p.shape), pin, stored)), True)
    for bname, _ in module.named_buffers():
        b = weights.buffer(f"{prefix}.{bname}" if prefix else bname)
        if b is not None:
            out[bname] = (cast(b), False)
    weights.ckpt.close()
    return out


def install(module: nn.Module, tensors: dict[str, tuple[torch.Tensor | ScaledTensor, bool]], device: torch.device,
            where: str = "", dtype: torch.dtype | None = None) -> None:
    """Put tensors read by :func:`read_module` into ``module`` on ``device`` (floats cast to ``dtype`` there);
    computed buffers move there."""
    for name, (t, is_param) in tensors.items():
        if isinstance(t, ScaledTensor):
            set_tensor(module, name, t.to_float(device, dtype or torch.float32), is_param)
            continue
        x = t.to(device, non_blocking=True)
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        set_tensor(module, name, x, is_param)
    for bname, b in list(module.named_buffers()):
        if bname in tensors:
            continue
        if b.device.type == "meta":
            raise CheckpointError(f"{where}.{bname}: buffer is neither computed by the model nor in the checkpoint")
        set_tensor(module, bname, b.to(device), False)


def materialize(module: nn.Module, prefix: str, weights: ModelWeights, device: torch.device,
                dtype: torch.dtype) -> None:
    """Load ``module``'s parameters (full names ``prefix.*``) onto ``device`` in ``dtype``; move its buffers."""
    install(module, read_module(module, prefix, weights, dtype), device, prefix)


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps large freed blocks otherwise: without this the
    resident size grows by about one layer per layer streamed)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def release(module: nn.Module) -> None:
    """Drop ``module``'s parameters (back to the meta device), freeing their memory."""
    for pname, p in list(module.named_parameters()):
        set_tensor(module, pname, torch.empty_like(p, device="meta"), True)
    trim_heap()


def module_name(model: nn.Module, target: nn.Module) -> str:
    """The dotted name of ``target`` inside ``model``."""
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ValueError(f"{type(target).__name__} is not part of {type(model).__name__}")
