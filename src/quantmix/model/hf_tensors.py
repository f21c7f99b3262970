"""A Hugging Face checkpoint's tensors as the GGUF holds them, read one at a time: no float copy of the model.

llama.cpp's converter renames the checkpoint's tensors, stacks per-expert tensors into 3-D ones, permutes the
q/k rows of llama-type attention, splits MLA's kv_b into attn_k_b / attn_v_b, interleaves gpt-oss's gate/up and
adds 1 to Gemma's norms. Measuring errors on a 700 GB model should not need the 1.4 TB F32 GGUF that
conversion writes first, so :class:`HFTensors` gives each GGUF tensor's float32 values on demand, straight from
the safetensors (FP8 and MXFP4 dequantized), through the same mapping the probes and the simulator use
(:func:`quantmix.export.simulate.tensor_targets`; the tensors beyond the decoder layers, GLM's NextN, by their
catalog sources). Tests hold every tensor equal, bit for bit, to the converter's F32 output.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from quantmix.model.checkpoint import CheckpointError
from quantmix.model.weights import ModelWeights

__all__ = ["HFTensors"]


class HFTensors:
    """The GGUF tensors (names, ggml shapes, float32 values in numpy order) of the model in ``model_dir``."""

    def __init__(self, model_dir: str | Path) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from quantmix.export.simulate import tensor_targets
        from quantmix.model.catalog import catalog_from_config
        from quantmix.model.engine import _config

        self.dir = Path(model_dir)
        cfg = _config(self.dir)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(cfg)
        model.tie_weights()
        self.catalog = catalog_from_config(self.dir)
        self.targets = tensor_targets(model)
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.weights = ModelWeights(self.dir, cfg)
        self._info = {t.name: t for t in self.catalog}
        self._last: tuple[str, torch.Tensor] | None = None  # the last parameter read (gate and up share one)

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        """ggml order (ne0 first), as the GGUF header writes it."""
        return tuple(self._info[name].shape)

    def _param(self, pname: str) -> torch.Tensor:
        if self._last is None or self._last[0] != pname:
            self._last = None
            t = self.weights.load(pname, self._shapes[pname])
            self._last = (pname, t.float())
        return self._last[1]

    def _part(self, tgt: object) -> torch.Tensor | None:
        """The rows ``tgt.part`` of a fused expert parameter, stacked from their per-expert checkpoint tensors
        (float32), without reading the other parts: half the memory of the whole fused parameter (DeepSeek-V3's
        gate_up is 30 GB in float32). None when the target is not such a part."""
        if tgt.part is None or tgt.split or tgt.param in self.weights.ckpt:
            return None
        off = 0
        for _, part_shape, srcs in self.weights.sources(tgt.param, self._shapes[tgt.param]):
            rows = slice(off, off + part_shape[1])
            off += part_shape[1]
            if (rows.start, rows.stop) == (tgt.part.start, tgt.part.stop) and len(srcs) == part_shape[0]:
                out = torch.empty(part_shape, dtype=torch.float32)
                for e, src in enumerate(srcs):
                    out[e] = self.weights.ckpt.get(src)
                return out
        return None

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as the converter's F32 GGUF holds it: float32, shape ggml's reversed."""
        if name not in self._info:
            raise CheckpointError(f"{self.dir}: the model has no GGUF tensor {name}")
        want = tuple(reversed(self._info[name].shape))
        tgt = self.targets.get(name)
        part = self._part(tgt) if tgt is not None else None
        if part is not None:  # one part of a fused expert parameter (gate of gate_up): only its sources read
            w = tgt.to_gguf(part)
        elif tgt is not None:
            w = tgt.read(self._param(tgt.param))
        else:  # beyond the decoder layers (NextN) or a stored buffer: the catalog's sources as they are
            srcs = self._info[name].hf_sources
            if not srcs:
                raise CheckpointError(f"{self.dir}: tensor {name} has no checkpoint source")
            parts = [self.weights.ckpt.get(s).float() for s in srcs]
            w = parts[0] if len(parts) == 1 else torch.stack(parts)
        self.weights.ckpt.close()
        w = w.reshape(want) if w.numel() == torch.Size(want).numel() else w
        if tuple(w.shape) != want:
            raise CheckpointError(f"{self.dir}: tensor {name} reads as {list(w.shape)}, the GGUF's is {list(want)}")
        return w.contiguous()

    def mxfp4_bytes(self, name: str) -> np.ndarray:
        """An expert tensor the release stores in MXFP4 (gpt-oss), as the converter keeps it: ggml's MXFP4 blocks
        (the e8m0 scale byte, then 16 bytes whose low nibbles are the block's first 16 values and high nibbles the
        last 16), gate and up taken from the interleaved rows of gate_up_proj. uint8, flat."""
        tgt = self.targets.get(name)
        ckpt = self.weights.ckpt
        rule = ckpt._rules.get(tgt.param) if tgt is not None else None
        if rule is None or rule.kind != "mxfp4":
            raise CheckpointError(f"{self.dir}: tensor {name} is not stored in MXFP4")
        blocks, scales = ckpt.raw(rule.parts[0]), ckpt.raw(rule.parts[1])  # [E, rows, G, 16], [E, rows, G]
        if tgt.split in ("gate_il", "up_il"):
            k = 0 if tgt.split == "gate_il" else 1
            blocks, scales = blocks[:, k::2], scales[:, k::2]
        # the release: byte j holds values 2j (low nibble) and 2j+1 (high); ggml: values j (low) and j+16 (high)
        vals = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 32)
        packed = vals[..., :16] | (vals[..., 16:] << 4)
        out = torch.cat((scales.unsqueeze(-1), packed), dim=-1).contiguous().numpy().reshape(-1)
        ckpt.close()
        return out

    def identity(self, name: str) -> str:
        """A hash that changes whenever the values of ``name`` can: its sources' files (each hashed once per
        file version, :mod:`quantmix.model.fingerprint`), the config and the tensor's name."""
        from quantmix.model.fingerprint import file_sha256

        tgt = self.targets.get(name)
        srcs = ([s for _, _, ss in self.weights.sources(tgt.param, self._shapes[tgt.param]) for s in ss]
                if tgt is not None else list(self._info[name].hf_sources))
        files = set()
        ckpt = self.weights.ckpt
        for s in srcs:
            rule = ckpt._rules.get(s)  # a dequantized weight is read from its stored parts (weight and scale)
            for p in ((*rule.parts, s) if rule is not None else (s,)):
                if p in ckpt.where:
                    files.add(ckpt.where[p])
        h = hashlib.sha256(name.encode() + b"\0" + file_sha256(self.dir / "config.json").encode())
        for f in sorted(files):
            h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
        return h.hexdigest()


def converted_metadata(model_dir: str | Path) -> Path:
    """The header of the model's F32 conversion by llama.cpp's own converter, key-values and tensor infos byte
    for byte, with the data left as a hole (:mod:`quantmix.tools.convert_meta`): made once per model version,
    in the cache, taking almost no disk."""
    from quantmix.model.fingerprint import model_fingerprint
    from quantmix.paths import cache_dir, file_lock
    from quantmix.tools.llamacpp import llamacpp_source

    d = Path(model_dir)
    fp = model_fingerprint(d)[:16]
    out = cache_dir() / "converted" / f"{d.name}-{fp}-f32.meta.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"convert-meta-{fp}"):
        if not out.exists():
            tmp = out.with_suffix(".tmp.gguf")
            llamacpp_source().convert(d, tmp, "f32", metadata_only=True)
            tmp.replace(out)
    return out
