"""Measured KLD of GLM's NextN (multi-token prediction) draft head when its tensors change.

The NextN layer is off the next-token path (:mod:`quantmix.evaluation.nextn`), so :class:`KLDProbe` cannot
see its tensors: changing them leaves the output exactly as it was. What they change is the draft head's
distribution of the token after next, which speculative decoding accepts or rejects. This probe measures that:
on the same calibration chunks as the main probe, the float model's final normalized hidden states are kept,
the float NextN head's log-probabilities are the reference, and a change to one NextN tensor replays only the
NextN layer and its head. Cheap: one decoder layer and one head per probe.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmix.measurement.kld_probe import KLDProbe, _kl

__all__ = ["NextNProbe"]


class NextNProbe:
    """KL(P_ref || P_changed) of the NextN head over every position of the main probe's chunks that has a
    token after next (positions 0 .. n_ctx-3)."""

    def __init__(self, probe: KLDProbe) -> None:
        from quantmix.evaluation.nextn import load_nextn
        from quantmix.export.simulate import tensor_targets

        head = load_nextn(probe.model, probe.model_dir, probe.device)
        if head is None:
            raise ValueError(f"{probe.model_dir}: the model has no NextN layer")
        self.head = head
        self.probe = probe
        with torch.no_grad():  # llama.cpp's t_h_nextn: the final hidden state after output_norm
            self.h_final = probe.engine.final_norm(probe.final_hidden())
        self._targets = tensor_targets(head.root)
        self._params = dict(head.root.named_parameters())
        self.ref_logp = torch.log_softmax(self._logits(), dim=-1)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._targets)

    @torch.no_grad()
    def _logits(self) -> Tensor:
        h = self.head.hidden(self.h_final, self.probe.chunks)[:, :-1]  # position i predicts token i + 2
        return self.head.layer.shared_head.head(h).float()

    @torch.no_grad()
    def kld(self, name: str, qtype: str) -> float:
        """Mean KLD of the NextN head with tensor ``name`` at ``qtype`` (its quantize-dequantize image, with the
        main probe's imatrix where it has the tensor); the layer is restored afterwards."""
        from quantmix.export.simulate import quantized_image

        tgt = self._targets[name]
        p = self._params[tgt.param].data
        w = tgt.read(p)
        im = self.probe.imatrix.weights_for(name, tuple(reversed(w.shape))) if self.probe.imatrix is not None else None
        saved = tgt.view(p).clone()
        try:
            tgt.write(p, quantized_image(w, qtype, "F32", im, name, self.probe.device).to(p.device))
            return float(_kl(self.ref_logp, self._logits(), self.probe.token_batch).mean())
        finally:
            tgt.view(p).copy_(saved)
