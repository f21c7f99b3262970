"""GLM-4.5 / 4.6's NextN (multi-token prediction) layer, run as llama.cpp's ``graph_mtp`` runs it.

The checkpoint's layer ``num_hidden_layers`` is not part of the next-token forward (transformers ignores its
weights; llama.cpp skips it in the main graph), so the main KLD is exact without it. It drafts the token after
next for speculative decoding, and a quantization that damages it costs draft acceptance, not output quality.
Its quality is measured here on its own (src/models/glm4-moe.cpp, ``graph_mtp``): at position i it reads the
main model's final *normalized* hidden state h_i (llama.cpp's ``t_h_nextn``, after ``output_norm``) and the
embedding of token i+1 (its own ``embed_tokens``), computes ``eh_proj([enorm(e), hnorm(h)])``, one decoder
layer (attention with the main model's rope, the MoE), ``shared_head.norm`` and ``shared_head.head``, and
predicts token i+2. Rope is relative, so the positions it is given (0, 1, ...) do not change its output.

The layer's parameters are named as in the checkpoint (``model.layers.N.*``), so the tensor catalog, the
simulator and the GGUF loader map them like any other tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["NextNHead", "nextn_layers", "load_nextn"]


def nextn_layers(cfg: object) -> int:
    """How many NextN layers the config's checkpoint holds (GLM-4.5 / 4.6: 1; other models: 0)."""
    tc = getattr(cfg, "text_config", None) or cfg
    if getattr(tc, "model_type", "") != "glm4_moe":
        return 0
    return int(getattr(tc, "num_nextn_predict_layers", 0) or 0)


@dataclass
class NextNHead:
    """The NextN layer (``root``: a module whose parameters are named ``model.layers.N.*``) and what it runs
    with: the main model's rotary embedding and configuration."""

    root: nn.Module
    layer: nn.Module
    rotary: nn.Module
    config: object
    layer_index: int

    @torch.no_grad()
    def hidden(self, h_final: Tensor, ids: Tensor) -> Tensor:
        """What ``shared_head.head`` reads [b, T-1, hidden]: position i from the main model's normalized final
        hidden state ``h_final[:, i]`` [b, T, hidden] and token ``ids[:, i + 1]``; it predicts ``ids[:, i + 2]``."""
        from transformers.masking_utils import create_causal_mask

        lay = self.layer
        e = lay.enorm(lay.embed_tokens(ids[:, 1:]))
        h = lay.hnorm(h_final[:, :-1].to(e.dtype))
        x = lay.eh_proj(torch.cat([e, h], dim=-1))
        pos = torch.arange(x.shape[1], device=x.device)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=pos)
        x = lay(x, attention_mask=mask, position_ids=pos, position_embeddings=self.rotary(x, pos))
        x = x[0] if isinstance(x, tuple) else x
        return lay.shared_head.norm(x)

    def head_weight(self) -> Tensor:
        return self.layer.shared_head.head.weight


def load_nextn(model: nn.Module, model_dir: str | Path, device: torch.device) -> NextNHead | None:
    """The first NextN layer of ``model``'s checkpoint in float32 on ``device``, or None when the model has
    none. Built like the main model's last decoder layer (same class, the MoE), plus eh_proj, enorm, hnorm,
    shared_head and the layer's own embed_tokens, and loaded from the checkpoint as stored (FP8 dequantized)."""
    from accelerate import init_empty_weights

    from quantmix.model.weights import ModelWeights, materialize

    cfg = model.config  # type: ignore[attr-defined]
    if not nextn_layers(cfg):
        return None
    tc = getattr(cfg, "text_config", None) or cfg
    decoder = model.get_decoder()  # type: ignore[operator]
    n = int(tc.num_hidden_layers)
    last = decoder.layers[n - 1]
    hid = int(tc.hidden_size)
    with init_empty_weights(include_buffers=False):
        layer = type(last)(tc, n)
        norm_cls = type(last.input_layernorm)
        layer.eh_proj = nn.Linear(2 * hid, hid, bias=False)
        layer.enorm = norm_cls(hid, eps=tc.rms_norm_eps)
        layer.hnorm = norm_cls(hid, eps=tc.rms_norm_eps)
        layer.shared_head = nn.Module()
        layer.shared_head.norm = norm_cls(hid, eps=tc.rms_norm_eps)
        layer.shared_head.head = nn.Linear(hid, int(tc.vocab_size), bias=False)
        layer.embed_tokens = nn.Embedding(int(tc.vocab_size), hid)
    root = nn.Module()
    root.config = cfg  # type: ignore[assignment]
    root.model = nn.Module()
    root.model.layers = nn.ModuleDict({str(n): layer})
    materialize(layer, f"model.layers.{n}", ModelWeights(Path(model_dir), cfg), device, torch.float32)
    layer.eval()
    return NextNHead(root, layer, decoder.rotary_emb, tc, n)
