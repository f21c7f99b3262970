"""Measured output KLD on calibration tokens, fast enough to call hundreds of times: the instrument that the
sensitivity fit and the refinement search share.

The float model runs once over the calibration chunks (:class:`~quantmix.model.engine.LayerEngine`, layer by
layer from the checkpoint); the input of every decoder layer and the reference log-probabilities are kept.
Measuring a change to some tensors (a quantize-dequantize image, or injected noise) then replays only the layers
from the first changed one onward, and compares the new distribution with the kept one token by token:
``KL(P_ref || P_changed)``, the direction llama-perplexity reports.

Breadth first: :meth:`KLDProbe.kld_many` advances a whole set of probes together, layer by layer. A probe's
state starts from the kept clean input of its first changed layer; its substituted tensors are quantized when
their layer is present; its KLD is taken at the output head in token batches (all logits are never held). So a
model bigger than memory is read once per set of probes, not once per probe. Layers that fit the engine's
resident budget stay loaded, and then a probe costs only its own layers' compute.

Why not :func:`quantmix.evaluation.evaluate.evaluate`: that is the judge (held-out text, llama.cpp's activation
numerics, a reference cache on disk); this is the optimizer's inner loop (calibration text, weights only,
partial replays). Scores every position after the first of each chunk: more signal per forward pass than
llama-perplexity's second half, and the optimizer never reports these numbers as evaluation.

Tensors are named as in the GGUF (``blk.3.ffn_down.weight``); images are in GGUF row order, the mapping onto
the Hugging Face parameters (q/k row permutation, fused gate/up experts) is the simulator's
(:func:`quantmix.export.simulate.tensor_targets`).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["KLDProbe", "ProbeDeadline", "ProbeError", "tensor_layer"]

_LAYER = re.compile(r"^blk\.(\d+)\.")
_FLOAT = ("F32", "F16", "BF16")


class ProbeError(ValueError):
    """The model cannot be probed (names the model or tensor and why)."""


class ProbeDeadline(Exception):
    """A measurement stopped at its deadline (between two layers); nothing of it is kept."""


def tensor_layer(name: str) -> int:
    """Decoder layer of a GGUF tensor name; -1 for token_embd / output / output_norm."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def _first_layer(name: str, n_layer: int) -> int:
    """The first layer a change to ``name`` affects: -1 the embedding, n_layer the head only."""
    if name.startswith("token_embd"):
        return -1
    i = tensor_layer(name)
    return i if i >= 0 else n_layer


@dataclass
class _Probe:
    values: dict[str, Tensor | str]  # tensor -> image (GGUF order) or type name
    first: int
    by_layer: dict[int, list[str]]  # layer (-1 embedding, n_layer head) -> its changed tensors


class KLDProbe:
    """Mean KL(P_ref || P_changed) over the calibration tokens for a set of changed tensors.

    ``chunks``: [n_chunks, n_ctx] token ids (calibration text, never the evaluation text). ``imatrix``: the
    importance matrix quantize-dequantize images are made with. ``image_cache_bytes``: how many bytes of
    images :meth:`image` keeps (least recently used dropped first). ``resident_bytes``: layer weights the engine
    keeps loaded (default: what fits a third of the memory; 0 streams every pass). ``state_bytes``: memory for
    the hidden states of probes advancing together (more probes than fit run in several groups; default the
    engine's in-memory budget ``hidden_bytes``, beyond which states spill to files)."""

    def __init__(self, model_dir: str | Path, chunks: Tensor, imatrix: object | None = None,
                 device: str | torch.device | None = None, image_cache_bytes: int = 4 << 30,
                 token_batch: int = 1024, *, dtype: torch.dtype = torch.float32, resident_bytes: int | None = None,
                 state_bytes: int | None = None, batch_tokens: int = 2048, hidden_bytes: int | None = None) -> None:
        from quantmix.calibration.imatrix_io import read_imatrix
        from quantmix.model.engine import EngineError, LayerEngine

        self.model_dir = Path(model_dir)
        self.imatrix = read_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
        try:
            self.engine = LayerEngine(self.model_dir, device, dtype, resident_bytes=resident_bytes,
                                      hidden_bytes=hidden_bytes)
        except EngineError as e:
            raise ProbeError(str(e)) from None
        self.device = self.engine.device
        self.model = self.engine.model
        self.layers = self.engine.layers
        self.n_layer = self.engine.n_layer
        self.chunks = torch.as_tensor(chunks, dtype=torch.long).to(self.device)
        self.batches = self.engine.batches(self.chunks.cpu(), batch_tokens)
        self.token_batch = token_batch
        self._targets = self.engine.targets
        self._params_of = {n: t.param for n, t in self._targets.items()}
        width = int(self.engine.config.get_text_config().hidden_size)
        self._state_size = self.chunks.numel() * width * torch.finfo(dtype).bits // 8
        self.state_bytes = self.engine.hidden_pool.budget if state_bytes is None else state_bytes
        self._originals: dict[str, Tensor] = {}  # float weights of present tensors that hold an image now
        self._orig_device = 0  # bytes of those kept on the (CUDA) device
        self._orig_host = 0  # bytes of those kept in host memory
        self.originals_bytes = 8 << 30  # device memory for them
        self.originals_host_bytes = 8 << 30  # host memory for them; beyond both, read again from the checkpoint
        self._reread: set[str] = set()  # present tensors holding an image, float weights not kept: re-read them
        self._base: dict[str, str] = {}  # tensor -> type held in the model between measurements
        self._images: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._image_bytes = 0
        self.image_cache_bytes = image_cache_bytes
        self.forward_tokens = 0  # tokens x (decoder layers run / all layers): the cost in forward-pass tokens
        self.head_passes = 0
        self._stale_from: int | None = None  # kept layer inputs from this layer on predate the base state
        self._capture()

    # -------------------------------------------------------------------------------------------- reference

    @torch.no_grad()
    def _capture(self) -> None:
        """Run the float model once; keep every decoder layer's input and the reference log-probs."""
        self._record_inputs()
        parts = [torch.log_softmax(lg, dim=-1) for lg in self._head_logits(self._inputs[self.n_layer])]
        self.ref_logp = torch.cat(parts).reshape(self.chunks.shape[0], self.chunks.shape[1] - 1, -1)
        self.n_tokens = int(self.ref_logp.shape[0] * self.ref_logp.shape[1])
        self.forward_tokens = self.head_passes = 0

    @torch.no_grad()
    def _record_inputs(self) -> None:
        """Every layer's input (and the last layer's output) under the current base state."""
        for st in getattr(self, "_inputs", []):
            st.clear()
        eng = self.engine
        self._inputs = [eng.store(on_device=eng.hidden_fits_device(self.batches, self.n_layer + 1))
                        for _ in range(self.n_layer + 1)]
        for j, h in enumerate(self._embedded()):
            self._inputs[0][j] = h
        self._run_group([], None, record_from=0)  # every layer's input recorded, no probe

    def _embedded(self) -> list[Tensor]:
        return self.engine.embed(self.batches)

    def final_hidden(self) -> Tensor:
        """The last decoder layer's output for every chunk under the base state, [n_chunks, n_ctx, hidden]."""
        if self._stale_from is not None:
            self.kld_many([])  # re-records the layer inputs the base state changed
        return torch.cat([self._inputs[self.n_layer][j].to(self.device) for j in range(len(self.batches))])

    def _head_logits(self, hidden: object) -> Iterator[Tensor]:
        """Logits of every scored token (all positions but each chunk's last), ``token_batch`` at a time, in
        chunk order; ``hidden``: a store (or list) of last-layer outputs per batch."""
        for j in range(len(self.batches)):
            h = hidden[j]
            flat = h[:, :-1].reshape(-1, h.shape[-1])
            for k in range(0, flat.shape[0], self.token_batch):
                yield self.engine.logits(flat[k:k + self.token_batch])

    @contextlib.contextmanager
    def _present(self, i: int) -> Iterator[None]:
        """Layer ``i`` loaded, holding the base state's images."""
        with self.engine.layer(i) as fresh:
            if fresh:  # just read: float weights, whatever images the last load held are gone
                self._drop_originals(i)
                for n, q in self._base.items():
                    if tensor_layer(n) == i:
                        self._set(n, self.image(n, q))
            try:
                yield
            finally:
                if not self.engine.is_resident(i):  # released: its float copies are of no use any more
                    self._drop_originals(i)

    def _drop_originals(self, layer: int) -> None:
        for n in [n for n in self._originals if tensor_layer(n) == layer]:
            self._pop_original(n)
        self._reread -= {n for n in self._reread if tensor_layer(n) == layer}

    def _pop_original(self, name: str) -> Tensor:
        t = self._originals.pop(name)
        n = t.numel() * t.element_size()
        if t.device.type == "cpu":
            self._orig_host -= n
        else:
            self._orig_device -= n
        return t

    def _checkpoint_param(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """Tensor ``name``'s whole parameter as the checkpoint stores it, in the compute dtype, on the host."""
        w = self.engine.weights.load(self._target(name).param, shape)
        w = w.to(self.engine.dtype if w.is_floating_point() else w.dtype)
        self.engine.weights.ckpt.close()  # drop the mapping (its pages are the page cache's, not ours)
        return w

    # -------------------------------------------------------------------------------------------- tensors

    @property
    def tensor_names(self) -> list[str]:
        return list(self._targets)

    def _target(self, name: str) -> object:
        try:
            return self._targets[name]
        except KeyError:
            raise ProbeError(f"tensor {name}: not a weight of {self.model_dir.name}") from None

    def _data(self, name: str) -> Tensor:
        return self.engine.parameter(self._target(name).param).data

    def original(self, name: str) -> Tensor:
        """The float weights of tensor ``name`` in GGUF row order (a copy; read from the checkpoint when its
        layer is not loaded)."""
        tgt = self._target(name)
        if name in self._originals:  # the float weights, while an image is held in the model
            return tgt.to_gguf(self._originals[name].to(self.device))
        data = self._data(name)
        if data.device.type == "meta" or name in self._reread:  # not loaded, or holding an image
            data = self._checkpoint_param(name, tuple(data.shape))
        return tgt.read(data)

    def image(self, name: str, qtype: str, src_type: str = "F32") -> Tensor:
        """quantize -> dequantize image of tensor ``name`` at ``qtype`` (GGUF row order), cached."""
        from quantmix.export.simulate import quantized_image

        key = (name, qtype)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        w = self.original(name)
        im = self.imatrix.weights_for(name, tuple(reversed(w.shape))) if self.imatrix is not None else None
        if qtype in _FLOAT:  # a float type: the weights rounded to it
            src_type = qtype
        # in the compute dtype: an image is written into the model's parameter, which holds no more than that
        img = quantized_image(w, qtype, src_type, im, name, self.device, self.engine.dtype)
        self._images[key] = img
        self._image_bytes += img.numel() * img.element_size()
        while self._image_bytes > self.image_cache_bytes and len(self._images) > 1:
            _, old = self._images.popitem(last=False)
            self._image_bytes -= old.numel() * old.element_size()
        return img

    def _set(self, name: str, value_gguf_order: Tensor | None) -> None:
        """Write an image into a present tensor (None: back to the base state's image, else the float)."""
        tgt = self._target(name)
        data = self._data(name)
        v = tgt.view(data)
        if value_gguf_order is None:
            if name in self._base:
                value_gguf_order = self.image(name, self._base[name])
            elif name in self._originals:
                v.copy_(self._pop_original(name).to(v.device))
                return
            elif name in self._reread:
                self._reread.discard(name)
                v.copy_(tgt.view(self._checkpoint_param(name, tuple(data.shape))).to(v.device))
                return
            else:
                return
        if name not in self._originals and name not in self._reread:
            # on the device while they fit ``originals_bytes`` (a probe changes one tensor at a time), then in host
            # memory up to ``originals_host_bytes``, then not kept at all (read again from the checkpoint when
            # needed): a whole base recipe's float copies would double a layer's memory (GLM-4.6: 15 GB a layer)
            n = v.numel() * v.element_size()
            if v.device.type != "cpu" and self._orig_device + n <= self.originals_bytes:
                self._originals[name] = v.detach().clone()
                self._orig_device += n
            elif self._orig_host + n <= self.originals_host_bytes:
                self._originals[name] = v.detach().to("cpu", copy=True)
                self._orig_host += n
            else:
                self._reread.add(name)
        tgt.write(data, value_gguf_order)

    @contextlib.contextmanager
    def _changed(self, values: Mapping[str, Tensor | str], names: Iterable[str]) -> Iterator[None]:
        names = list(names)
        try:
            for n in names:
                v = values[n]
                self._set(n, self.image(n, v) if isinstance(v, str) else v.to(self.device))
            yield
        finally:
            for n in names:
                self._set(n, None)

    # -------------------------------------------------------------------------------------------- measuring

    @torch.no_grad()
    def kld(self, changes: Mapping[str, Tensor | str]) -> float:
        """Mean KL(P_ref || P_changed) with each named tensor replaced (an image in GGUF row order, or a type
        name meaning its quantize-dequantize image); the model is restored afterwards."""
        return float(self.kld_tokens(changes).mean())

    @torch.no_grad()
    def kld_tokens(self, changes: Mapping[str, Tensor | str]) -> Tensor:
        """Per-token KL(P_ref || P_changed), [n_chunks * (n_ctx - 1)] float64."""
        return self.kld_many([changes])[0]

    def _plan(self, changes: Mapping[str, Tensor | str]) -> _Probe:
        by_layer: dict[int, list[str]] = {}
        for n in changes:
            self._target(n)
            by_layer.setdefault(_first_layer(n, self.n_layer), []).append(n)
        if "token_embd.weight" in changes and self._tied():  # the head reads the same weights
            by_layer.setdefault(self.n_layer, []).append("token_embd.weight")
        first = min(by_layer) if by_layer else self.n_layer
        return _Probe(dict(changes), first, by_layer)

    def _tied(self) -> bool:
        head = self.model.get_output_embeddings()
        return head is not None and head.weight is self.model.get_input_embeddings().weight

    def group_size(self) -> int:
        """How many probes advance together within ``state_bytes``."""
        return max(1, int(self.state_bytes // max(self._state_size, 1)))

    def _groups(self, plans: list[_Probe]) -> list[list[int]]:
        order = sorted(range(len(plans)), key=lambda k: plans[k].first)
        g = self.group_size()
        return [order[s:s + g] for s in range(0, len(order), g)]

    def cost(self, changes_list: Sequence[Mapping[str, Tensor | str]]) -> dict[str, int]:
        """What :meth:`kld_many` will spend on ``changes_list``: probe-layer steps (a probe through one layer or
        the head), layers read from the checkpoint, forward-pass tokens, and the number of probe groups."""
        plans = [self._plan(c) for c in changes_list]
        n = self.n_layer
        groups = self._groups(plans)
        rec = self._stale_from
        if rec is not None and not groups:
            groups = [[]]
        reads = 0
        for g, grp in enumerate(groups):
            start = max(0, min([plans[k].first for k in grp] + ([rec] if rec is not None and g == 0 else [])))
            reads += sum(1 for i in range(start, n) if not self.engine.is_resident(i))
        rec_tokens = int(self.chunks.numel() * (n - max(rec, 0)) / n) if rec is not None and rec < n else 0
        return {"steps": sum(n - max(p.first, 0) + 1 for p in plans) + (n - max(rec, 0) if rec is not None else 0),
                "layer_reads": reads, "groups": len(groups),
                "forward_tokens": sum(int(self.chunks.numel() * (n - max(p.first, 0)) / n) for p in plans) + rec_tokens}

    @torch.no_grad()
    def kld_many(self, changes_list: Sequence[Mapping[str, Tensor | str]],
                 progress: Callable[[int], None] | None = None,
                 done: Callable[[int, Tensor], None] | None = None, deadline: float | None = None) -> list[Tensor]:
        """Per-token KL(P_ref || P_changed) of every probe in ``changes_list`` (each a set of changed
        tensors), all advancing together layer by layer (in groups of :meth:`group_size`, earliest first
        layer first). ``progress``: called with each batch of probe-layer steps taken (see :meth:`cost`);
        ``done``: called with (index, per-token KL) as each group finishes (to save results as they come).
        ``deadline``: a ``time.monotonic()`` value; past it, :class:`ProbeDeadline` is raised between layers."""
        plans = [self._plan(c) for c in changes_list]
        out: list[Tensor | None] = [None] * len(plans)
        groups = self._groups(plans)
        rec, self._stale_from = self._stale_from, None
        try:
            if rec is not None and rec < 0:  # the base changed the embedding: every input is recorded again
                self._record_inputs()
                rec = None
            if rec is not None and rec >= self.n_layer:
                rec = None  # head tensors only: no layer input changed
            if rec is not None and not groups:
                groups = [[]]
            for g, group in enumerate(groups):
                kls = self._run_group([plans[k] for k in group], progress, rec if g == 0 else None, deadline)
                rec = None
                for k, kl in zip(group, kls):
                    out[k] = kl
                    if done is not None:
                        done(k, kl)
        except BaseException:
            if rec is not None:
                self._stale_from = rec  # interrupted while re-recording: the next measurement does it again
            raise
        return out  # type: ignore[return-value]

    def _run_group(self, plans: list[_Probe], progress: Callable[[int], None] | None,
                   record_from: int | None = None, deadline: float | None = None) -> list[Tensor]:
        """Advance ``plans`` together; with ``record_from``, also re-record the base state's layer inputs from
        that layer on, in the same pass (each layer's recording comes before the probes that start there)."""
        eng = self.engine
        n = self.n_layer
        states: dict[int, object] = {}
        try:
            for k, p in enumerate(plans):
                if p.first < 0:  # the embedding changed: the first layer's input is recomputed
                    with self._changed(p.values, p.by_layer[-1]):
                        st = states[k] = eng.store(on_device=eng.hidden_fits_device(self.batches, len(plans)))
                        for j, h in enumerate(eng.embed(self.batches, recompute=True)):
                            st[j] = h
            start = max(0, min([p.first for p in plans] + ([record_from] if record_from is not None else []),
                               default=n))
            for i in range(start, n):
                if deadline is not None and time.monotonic() > deadline:
                    raise ProbeDeadline(f"deadline reached at layer {i}")
                active = [k for k, p in enumerate(plans) if p.first <= i]
                with self._present(i):
                    if record_from is not None and i >= record_from:
                        for j in range(len(self.batches)):
                            self._inputs[i + 1][j] = eng.run(i, self._inputs[i][j], self.batches, j)
                    for k in active:
                        p = plans[k]
                        src = states.get(k, self._inputs[i])
                        if k not in states:
                            states[k] = eng.store(on_device=eng.hidden_fits_device(self.batches, len(plans)))
                        dst = states[k]
                        with self._changed(p.values, p.by_layer.get(i, [])):
                            for j in range(len(self.batches)):
                                dst[j] = eng.run(i, src[j], self.batches, j)
                if progress is not None:
                    progress(len(active) + (record_from is not None and i >= record_from))
            if record_from is not None:
                self.forward_tokens += int(self.chunks.numel() * (n - record_from) / n)
            results = []
            for k, p in enumerate(plans):
                h = states.get(k, self._inputs[n])
                with self._changed(p.values, p.by_layer.get(n, [])):  # output, output_norm, a tied token_embd
                    results.append(self._kl(h))
                if progress is not None:
                    progress(1)
                self.forward_tokens += int(self.chunks.numel() * (n - max(p.first, 0)) / n) if p.first < n else 0
                self.head_passes += 1
            return results
        finally:
            for st in states.values():
                st.clear()

    def _kl(self, hidden: object) -> Tensor:
        """Per-token KL(ref || q) of last-layer outputs ``hidden`` (per batch), in token batches."""
        ref = self.ref_logp.reshape(-1, self.ref_logp.shape[-1])
        out = torch.empty(ref.shape[0], dtype=torch.float64)
        pos = 0
        for lg in self._head_logits(hidden):
            lr = ref[pos:pos + lg.shape[0]].to(lg.device)
            lq = torch.log_softmax(lg, dim=-1)
            out[pos:pos + lg.shape[0]] = (lr.exp() * (lr - lq)).sum(-1).double().cpu()
            pos += lg.shape[0]
        return out.clamp_min_(0.0)

    def quantized_changes(self, types: Mapping[str, str]) -> dict[str, str]:
        """The part of a recipe (tensor -> type) that changes this model: quantized types of its tensors."""
        return {n: t for n, t in types.items() if t not in _FLOAT and n in self._targets}

    def changes_over_base(self, types: Mapping[str, str]) -> dict[str, str]:
        """What measuring ``types`` (some tensors' types) on top of the base state changes: quantized types
        other than the base's, and float types of tensors the base holds quantized (their float weights rounded)."""
        out = {}
        for n, t in types.items():
            if n not in self._targets:
                continue
            if t in _FLOAT:
                if n in self._base:
                    out[n] = t
            elif self._base.get(n) != t:
                out[n] = t
        return out

    def identity(self) -> str:
        """What a measurement of this probe depends on (model files, imatrix, tokens, dtype, device type), hashed:
        the key under which results computed with it may be reused."""
        import hashlib
        import json

        from quantmix.calibration.imatrix_io import imatrix_bytes
        from quantmix.formats.api import NUMERICS_VERSION
        from quantmix.model.fingerprint import model_fingerprint

        h = hashlib.sha256()
        h.update(json.dumps([model_fingerprint(self.model_dir), NUMERICS_VERSION, str(self.engine.dtype),
                             self.device.type, list(self.chunks.shape)]).encode())
        h.update(hashlib.sha256(imatrix_bytes(self.imatrix)).digest() if self.imatrix is not None else b"none")
        h.update(self.chunks.cpu().to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def kld_of_types(self, types: Mapping[str, str]) -> float:
        """Mean KLD of a whole recipe (tensor -> type; float types and unnamed tensors stay as they are),
        measured on top of the base state (:meth:`set_base`): give only what differs from it."""
        return self.kld(self.quantized_changes(types))

    @torch.no_grad()
    def set_base(self, types: Mapping[str, str]) -> None:
        """Hold a recipe in the model, so that measuring a few changes on top of it replays only from the first
        changed layer (refinement's moves). The layer inputs it changes (from the first layer where it differs
        from the last base) are recorded again during the next measurement's pass, not in a pass of their own."""
        new = self.quantized_changes(types)
        old = self._base
        differ = [n for n in set(old) | set(new) if old.get(n) != new.get(n)]
        self._base = {}
        for n in old:  # present tensors back to float; absent ones are float when next read
            if self._data(n).device.type != "meta":
                self._set(n, None)
        self._base = new
        for n, q in self._base.items():
            if self._data(n).device.type != "meta":
                self._set(n, self.image(n, q))
        if differ:
            first = min(_first_layer(n, self.n_layer) for n in differ)
            self._stale_from = first if self._stale_from is None else min(first, self._stale_from)

    def release_images(self, names: Iterable[str] | None = None) -> None:
        """Drop cached images (all, or those of the named tensors)."""
        keep = set(names) if names is not None else None
        for key in list(self._images):
            if keep is None or key[0] in keep:
                old = self._images.pop(key)
                self._image_bytes -= old.numel() * old.element_size()

    def close(self) -> None:
        """Free the kept hidden states and the engine's reader."""
        for st in getattr(self, "_inputs", []):
            st.clear()
        self.engine.close()


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
