"""How much each EXL3 linear's error moves the output: measured KLD per unit of proxy cost, one coefficient per tensor.

The measurement's cost (exllamav3's proxy error times trace(W^T H W)) ranks rates within a linear, but it does not
say what a unit of it costs in output KLD at layer 0 versus layer 40, or in a value versus a down projection. So
each GGUF tensor (one linear, or a layer's stacked experts) is quantized at one probe rate by exllamav3's own
quantizer, the dequantized weights are substituted into quantmix's streaming forward engine
(:class:`~quantmix.measurement.kld_probe.KLDProbe`, partial replay from the changed layer), and the KLD it causes on
calibration tokens is divided by that quantization's own cost:

    c_t = KLD_t(probe rate) / cost_t(probe rate),   predicted KLD(plan) = sum_t c_t * cost_t(rate_t)

(the same quadratic-regime argument as the GGUF sensitivity fit: KLD and the H-weighted squared error both grow as
the square of the weight error). The coefficient of a GGUF tensor is given to each of its Hugging Face linears.
Finished tensors go to a journal keyed by the measurement, the tokens and the probe rate, so a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from quantmix.formats.exl3 import Exl3Error, exl3_model
from quantmix.measurement.exl3_measure import Quantizer, even_indices, exl3_quantize, read_journal

__all__ = ["exl3_coefficients"]


def exl3_coefficients(model_dir: str | Path, measurement_key: str, journal: Path, *, imatrix: str | Path | None = None,
                      probe_rate: float = 3, n_ctx: int = 512, chunks: int = 2, texts: list[str | Path] | None = None,
                      device: str = "cuda", progress: bool = True,
                      quantize: Quantizer | None = None, expert_sample: int = 0) -> dict[str, float]:
    """Per EXL3 linear key (HF name without ``.weight``): KLD per unit of cost, measured at ``probe_rate``.
    ``quantize``: (weight [out, in], importance or None, rate, scratch dir) -> (dequantized weight, its cost);
    default exllamav3's quantize_exl3 (CUDA). The CPU tests give their own. ``expert_sample``: of a stacked expert
    tensor only that many experts (evenly spaced) are quantized, the rest left float; the KLD they cause over their
    own cost is the tensor's coefficient (the quadratic model is additive over experts)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from quantmix.calibration.imatrix import calibration_tokens
    from quantmix.evaluation.evaluate import load_texts
    from quantmix.measurement.kld_probe import KLDProbe
    from quantmix.model.catalog import catalog_from_config

    model_dir = Path(model_dir)
    quantize = quantize or exl3_quantize
    budgeted = {m.key for m in exl3_model(model_dir).budgeted()}
    src = load_texts(texts, "wiki-calib")
    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        ids = calibration_tokens(tok, list(src.parts), n_ctx, chunks)
    except ValueError as e:
        raise Exl3Error(f"{src.label}: {e}") from None
    # which GGUF tensor holds which budgeted linears (a layer's experts stack into one)
    members: dict[str, list[str]] = {}
    for t in catalog_from_config(model_dir):
        keys = [s.removesuffix(".weight") for s in (t.hf_sources or ())]
        if keys and all(k in budgeted for k in keys):
            members[t.name] = keys
    h = hashlib.sha256(json.dumps([measurement_key, probe_rate, expert_sample, ids.tolist()]).encode()).hexdigest()[:16]
    journal = journal.with_name(journal.name + f".{h}.jsonl")
    done = {r["tensor"]: float(r["kld_per_cost"]) for r in read_journal(journal, lambda r: float(r["kld_per_cost"]))}
    todo = [n for n in members if n not in done]
    if todo:
        probe = KLDProbe(model_dir, ids, imatrix, device)
        unknown = [n for n in todo if n not in probe.tensor_names]
        if unknown:
            raise Exl3Error(f"tensor {unknown[0]}: a linear of {model_dir} that the forward engine cannot substitute")
        with open(journal, "a") as jf:
            for name in tqdm(todo, desc="exl3 sensitivity", unit="tensor", disable=not progress):
                w = probe.original(name)
                im = probe.imatrix.weights_for(name, tuple(reversed(w.shape))) if probe.imatrix is not None else None
                stack = w if w.dim() > 2 else w[None]  # a linear is a stack of one
                image, cost = stack.clone(), 0.0
                for i in even_indices(len(stack), expert_sample if w.dim() > 2 else 0):
                    imp = None if im is None else torch.as_tensor(im[i] if im.shape[0] == len(stack) else im[0])
                    wq, c = quantize(stack[i].to(probe.device), imp, probe_rate, str(journal.parent))
                    image[i] = wq.to(w.dtype)
                    cost += c
                image = image if w.dim() > 2 else image[0]
                kld = probe.kld({name: image})
                coef = max(kld, 0.0) / cost if cost > 0 else 0.0
                jf.write(json.dumps({"tensor": name, "kld": kld, "cost": cost, "kld_per_cost": coef}) + "\n")
                jf.flush()
                os.fsync(jf.fileno())
                done[name] = coef
    return {k: done[n] for n, keys in members.items() for k in keys}
