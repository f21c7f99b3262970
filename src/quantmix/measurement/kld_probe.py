"""Measured output KLD on calibration tokens, fast enough to call hundreds of times: the instrument that the
sensitivity fit and the refinement search share.

The float model runs once over the calibration chunks; the input of every decoder layer and the reference
log-probabilities are kept. Measuring a change to some tensors (a quantize-dequantize image, or injected
noise) then replays only the layers from the first changed one onward, and compares the new distribution
with the kept one token by token: ``KL(P_ref || P_changed)``, the direction llama-perplexity reports.

Why not :func:`quantmix.evaluation.evaluate.evaluate`: that is the judge (held-out text, llama.cpp's activation
numerics, a reference cache on disk); this is the optimizer's inner loop (calibration text, weights only,
everything in memory, partial replays). Scores every position after the first of each chunk: more signal per
forward pass than llama-perplexity's second half, and the optimizer never reports these numbers as evaluation.

Tensors are named as in the GGUF (``blk.3.ffn_down.weight``); images are in GGUF row order, the mapping onto
the Hugging Face parameters (q/k row permutation, fused gate/up experts) is the simulator's
(:func:`quantmix.export.simulate.tensor_targets`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["KLDProbe", "ProbeError", "tensor_layer"]

_LAYER = re.compile(r"^blk\.(\d+)\.")


class ProbeError(ValueError):
    """The model cannot be probed (names the model or tensor and why)."""


def tensor_layer(name: str) -> int:
    """Decoder layer of a GGUF tensor name; -1 for token_embd / output / output_norm."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


@dataclass
class _Place:
    param: Tensor  # the live parameter's data (a view into the model)
    target: object  # quantmix.export.simulate._Target: how the GGUF tensor maps onto the parameter

    def view(self) -> Tensor:
        return self.target.view(self.param)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    cfg = getattr(model, "config", None)
    tc = getattr(cfg, "text_config", None) or cfg
    n = int(getattr(tc, "num_hidden_layers", 0) or 0)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0:
            return mod
    raise ProbeError(f"{type(model).__name__}: cannot find its {n} decoder layers")


class KLDProbe:
    """Mean KL(P_ref || P_changed) over the calibration tokens for a set of changed tensors.

    ``chunks``: [n_chunks, n_ctx] token ids (calibration text, never the evaluation text). ``imatrix``: the
    importance matrix quantize-dequantize images are made with. ``image_cache_bytes``: how many bytes of
    images :meth:`image` keeps (least recently used dropped first)."""

    def __init__(self, model_dir: str | Path, chunks: Tensor, imatrix: object | None = None,
                 device: str | torch.device | None = None, image_cache_bytes: int = 4 << 30,
                 token_batch: int = 1024) -> None:
        from quantmix.calibration.imatrix_io import read_imatrix
        from quantmix.export.simulate import tensor_targets
        from quantmix.model.checkpoint import load_float_model

        self.model_dir = Path(model_dir)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.imatrix = read_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
        self.model = load_float_model(self.model_dir, dtype=torch.float32, device=self.device)
        self.layers = _decoder_layers(self.model)
        self.chunks = chunks.to(self.device)
        self.token_batch = token_batch
        params = dict(self.model.named_parameters())
        self._targets = tensor_targets(self.model)
        self._places = {n: _Place(params[t.param].data, t) for n, t in self._targets.items()}
        self._originals: dict[str, Tensor] = {}
        self._base: dict[str, Tensor] = {}  # tensor -> image held in the model between measurements
        self._images: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._image_bytes = 0
        self.image_cache_bytes = image_cache_bytes
        self.forward_tokens = 0  # tokens x (decoder layers run / all layers): the cost in forward-pass tokens
        self.head_passes = 0
        self._capture()

    # -------------------------------------------------------------------------------------------- reference

    @torch.no_grad()
    def _capture(self) -> None:
        """Run the float model once; keep every decoder layer's input and the reference log-probs."""
        inputs: list[Tensor | None] = [None] * len(self.layers)
        # each layer's own arguments: sliding-window and full-attention layers get other masks and rotary
        # tables (Gemma 2/3, gpt-oss), so one layer's cannot be replayed for another
        kwargs_seen: list[dict] = [{} for _ in self.layers]

        def pre_hook(i: int):  # noqa: ANN202 - closure factory
            def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
                kwargs_seen[i].update({k: v for k, v in kwargs.items() if k != "hidden_states"})
                kwargs_seen[i]["_args_rest"] = args[1:]
            return hook

        final: list[Tensor] = []

        def last_hook(mod: nn.Module, args: tuple, output: object) -> None:
            final.append((output[0] if isinstance(output, tuple) else output).detach().clone())

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(last_hook))
        try:
            out = self.model(input_ids=self.chunks, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in inputs):
            raise ProbeError(f"{self.model_dir}: not every decoder layer ran in the forward pass")
        self._layer_inputs = inputs + final  # [L] is the last layer's output: the head's input before the norm
        self._find_embed_scale(inputs[0])
        self._layer_kwargs = kwargs_seen
        self.ref_logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        self.n_tokens = int(self.ref_logp.shape[0] * self.ref_logp.shape[1])
        replay = self._replay_from(0)
        if not torch.allclose(replay, out.logits[:, :-1].float(), atol=1e-4, rtol=1e-4):
            raise ProbeError(f"{self.model_dir}: replaying the decoder layers does not reproduce the model's "
                             f"logits (max diff {(replay - out.logits[:, :-1]).abs().max():.2e}); unsupported "
                             f"architecture for layer replay")
        self.forward_tokens = self.head_passes = 0

    def _embed(self) -> Tensor:
        """The first decoder layer's input for the calibration chunks (embedding, scaled where the model does:
        Gemma's embedding module scales in its own forward; others leave the scale to the model's forward,
        which :meth:`_capture` finds out by comparing with what the first layer received)."""
        h = self.model.get_input_embeddings()(self.chunks)
        return h * self._embed_scale if self._embed_scale is not None else h

    def _find_embed_scale(self, first_input: Tensor) -> None:
        self._embed_scale = None
        h = self._embed()
        if torch.allclose(h, first_input):
            return
        scale = getattr(self.model.get_input_embeddings(), "embed_scale", None)
        if scale is not None and torch.allclose(h * scale, first_input):
            self._embed_scale = scale
            return
        raise ProbeError(f"{self.model_dir}: the embedding does not give the first decoder layer's input; "
                         f"unsupported architecture for layer replay")

    def _head(self, h: Tensor) -> Tensor:
        base = getattr(self.model, self.model.base_model_prefix, None)
        norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None)
        if norm is None:
            raise ProbeError(f"{type(self.model).__name__}: no final norm found")
        logits = self.model.get_output_embeddings()(norm(h))
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits  # Gemma 2's soft-capped logits

    def _layer(self, i: int, h: Tensor) -> Tensor:
        kw = dict(self._layer_kwargs[i])
        rest = kw.pop("_args_rest", ())
        o = self.layers[i](h, *rest, **kw)
        return o[0] if isinstance(o, tuple) else o

    def _replay_from(self, first: int) -> Tensor:
        """Logits of the current weights, running decoder layers ``first``.. from the kept inputs."""
        if first < 0:  # the embedding changed: recompute the first layer's input
            h = self._embed()
            first = 0
        else:
            h = self._layer_inputs[first]  # first == L: only the head changed
        for i in range(first, len(self.layers)):
            h = self._layer(i, h)
        self.forward_tokens += int(self.chunks.numel() * (len(self.layers) - first) / len(self.layers))
        self.head_passes += 1
        return self._head(h)[:, :-1].float()

    # -------------------------------------------------------------------------------------------- tensors

    @property
    def tensor_names(self) -> list[str]:
        return list(self._places)

    def original(self, name: str) -> Tensor:
        """The float weights of tensor ``name`` in GGUF row order (a copy)."""
        p = self._place(name)
        if name in self._originals:  # the float weights, while an image is held in the model
            return p.target.to_gguf(self._originals[name])
        return p.target.read(p.param)

    def _place(self, name: str) -> _Place:
        try:
            return self._places[name]
        except KeyError:
            raise ProbeError(f"tensor {name}: not a weight of {self.model_dir.name}") from None

    def image(self, name: str, qtype: str, src_type: str = "F32") -> Tensor:
        """quantize -> dequantize image of tensor ``name`` at ``qtype`` (GGUF row order), cached."""
        from quantmix.export.simulate import quantized_image

        key = (name, qtype)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        w = self.original(name)
        im = self.imatrix.weights_for(name, tuple(reversed(w.shape))) if self.imatrix is not None else None
        img = quantized_image(w, qtype, src_type, im, name, self.device).to(w.device)
        self._images[key] = img
        self._image_bytes += img.numel() * img.element_size()
        while self._image_bytes > self.image_cache_bytes and len(self._images) > 1:
            _, old = self._images.popitem(last=False)
            self._image_bytes -= old.numel() * old.element_size()
        return img

    def _set(self, name: str, value_gguf_order: Tensor | None) -> None:
        p = self._place(name)
        v = p.view()
        if value_gguf_order is None:  # back to the base state (the base image, else the float weights)
            if name in self._base:
                value_gguf_order = self._base[name]
            elif name in self._originals:
                v.copy_(self._originals.pop(name))
                return
            else:
                return
        if name not in self._originals:
            self._originals[name] = v.clone()
        p.target.write(p.param, value_gguf_order)

    # -------------------------------------------------------------------------------------------- measuring

    @torch.no_grad()
    def kld(self, changes: Mapping[str, Tensor | str]) -> float:
        """Mean KL(P_ref || P_changed) with each named tensor replaced (an image in GGUF row order, or a type
        name meaning its quantize-dequantize image); the model is restored afterwards."""
        return float(self.kld_tokens(changes).mean())

    @torch.no_grad()
    def kld_tokens(self, changes: Mapping[str, Tensor | str]) -> Tensor:
        """Per-token KL(P_ref || P_changed), [n_chunks * (n_ctx - 1)] float64."""
        if not changes:  # the base state itself: only the head is replayed
            return _kl(self.ref_logp, self._replay_from(len(self.layers)), self.token_batch)
        values = {n: (self.image(n, v) if isinstance(v, str) else v) for n, v in changes.items()}
        try:
            for n, v in values.items():
                self._set(n, v)
            first = min(-1 if n.startswith("token_embd") else tensor_layer(n) if tensor_layer(n) >= 0
                        else len(self.layers) for n in values)
            logits = self._replay_from(first)
        finally:
            for n in values:
                self._set(n, None)
        return _kl(self.ref_logp, logits, self.token_batch)

    def quantized_changes(self, types: Mapping[str, str]) -> dict[str, str]:
        """The part of a recipe (tensor -> type) that changes this model: quantized types of its tensors."""
        return {n: t for n, t in types.items() if t not in ("F32", "F16", "BF16") and n in self._places}

    def kld_of_types(self, types: Mapping[str, str]) -> float:
        """Mean KLD of a whole recipe (tensor -> type; float types and unnamed tensors stay as they are),
        measured on top of the base state (:meth:`set_base`): give only what differs from it."""
        return self.kld(self.quantized_changes(types))

    @torch.no_grad()
    def set_base(self, types: Mapping[str, str]) -> None:
        """Hold a recipe in the model and re-record every layer's input under it, so that measuring a few
        changes on top of it replays only from the first changed layer (refinement's moves)."""
        for n in list(self._base):
            self._base.pop(n)
            self._set(n, None)
        for n, q in self.quantized_changes(types).items():
            img = self.image(n, q)
            self._base[n] = img
            self._set(n, img)
        self._record_inputs()

    @torch.no_grad()
    def _record_inputs(self) -> None:
        h = self._embed()
        inputs = []
        for i in range(len(self.layers)):
            inputs.append(h)
            h = self._layer(i, h)
        self._layer_inputs = inputs + [h]
        self.forward_tokens += int(self.chunks.numel())

    def release_images(self, names: Iterable[str] | None = None) -> None:
        """Drop cached images (all, or those of the named tensors)."""
        keep = set(names) if names is not None else None
        for key in list(self._images):
            if keep is None or key[0] in keep:
                old = self._images.pop(key)
                self._image_bytes -= old.numel() * old.element_size()


def _kl(ref_logp: Tensor, logits: Tensor, batch: int) -> Tensor:
    """Per-token KL(ref || q) from reference log-probs and new logits, in token batches (bounded memory)."""
    r = ref_logp.reshape(-1, ref_logp.shape[-1])
    q = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(r.shape[0], dtype=torch.float64)
    for i in range(0, r.shape[0], batch):
        lr = r[i:i + batch]
        lq = torch.log_softmax(q[i:i + batch], dim=-1)
        out[i:i + batch] = (lr.exp() * (lr - lq)).sum(-1).double().cpu()
    return out.clamp_min_(0.0)
