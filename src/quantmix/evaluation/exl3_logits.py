"""The quantized side of an evaluation when it is an EXL3 directory: logits from exllamav3's own inference.

EXL3 weights are trellis-coded behind random Hadamard transforms; decoding them is exllamav3's job (its CUDA
kernels), so the quantized pass is exllamav3's ``Model.forward`` on the same token chunks, without a cache, and the
reference side stays quantmix's streaming engine. What was evaluated is identified by the directory's files
(fingerprint per file version), its size by the stored tensors and its bpw as exllamav3 counts it (decoder linears).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from quantmix.formats.exl3 import Exl3Error, read_exl3_dir

__all__ = ["Exl3Logits", "check_exl3", "exl3_applied"]


def check_exl3(exl3_dir: Path, device: torch.device) -> dict:
    """What Exl3Logits needs, checked up front: a valid EXL3 directory, a CUDA device, exllamav3 installed. Returns
    the directory's size fields (:func:`exl3_applied`, from the one reading of its headers)."""
    stored = read_exl3_dir(exl3_dir)
    if device.type != "cuda":
        raise Exl3Error(f"{exl3_dir}: exllamav3 runs EXL3 models on CUDA only (device is {device})")
    import importlib.util
    if importlib.util.find_spec("exllamav3") is None:
        raise Exl3Error("evaluating an EXL3 model needs exllamav3 (pip install exllamav3; a CUDA toolkit builds "
                        "its extension on first use)")
    return exl3_applied(exl3_dir, stored)


def exl3_applied(exl3_dir: Path, stored: tuple[dict, list] | None = None) -> dict:
    """The size fields of an evaluation row for an EXL3 directory (checked as read_exl3_dir checks it; ``stored``:
    what read_exl3_dir already returned for it)."""
    from quantmix.model.fingerprint import model_fingerprint

    qc, linears = stored if stored is not None else read_exl3_dir(exl3_dir)
    body = [s for s in linears if s.key != "lm_head"]
    numel = sum(s.numel for s in linears)
    rates = sorted({s.rate for s in body})
    head = [s.rate for s in linears if s.key == "lm_head"]
    return {"size_bytes": sum(s.n_bytes for s in linears), "n_elements": numel,
            "bpw": sum(s.rate * s.numel for s in body) / max(sum(s.numel for s in body), 1),
            "types": "EXL3 " + ",".join(f"{r:g}" for r in rates) + (f" head {head[0]:g}" if head else ""),
            "quant_sha256": hashlib.sha256(model_fingerprint(exl3_dir).encode()).hexdigest(),
            "exl3_bits": qc.get("bits")}


class Exl3Logits:
    """An EXL3 model loaded by exllamav3 on one CUDA device (what :func:`check_exl3` checks);
    ``logits(ids)`` for [batch, n_ctx] token ids."""

    def __init__(self, exl3_dir: str | Path, device: torch.device) -> None:
        from exllamav3 import Config, Model

        self.dir = Path(exl3_dir)
        self.model = Model.from_config(Config.from_directory(str(self.dir)))
        self.model.load(f"cuda:{device.index or 0}")

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.forward(ids, {"attn_mode": "flash_attn_nc"}).float()

    def close(self) -> None:
        self.model.unload()
