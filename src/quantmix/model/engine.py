"""One forward engine: a Hugging Face decoder run layer by layer from its checkpoint, bounded by a layer's memory.

Why: the models quantmix's users quantize hold 100-700 B parameters; none fits one device in float32, most not
even the host. imatrix, the sensitivity probes, refinement and eval all run the same loop (as ExLlamaV3's
conversion runs one): the model is a skeleton on the meta device; the embedding, the final norm and the output
head are loaded once; then for each decoder layer in turn its weights are read from the safetensors (as stored:
BF16, FP16, FP8 with block scales, MXFP4), every sequence's hidden state goes through it, and the weights are
dropped. While layer i computes, a worker thread reads layer i+1 into (pinned) host memory.

A pass:

1. :meth:`LayerEngine.prepare` embeds the token batches and records what the decoder hands every layer
   (attention masks, rotary tables, positions): those depend on positions, not on hidden states, so every
   later pass over the same batches reuses them.
2. ``with engine.layer(i) as fresh:`` makes layer i's weights present (``fresh``: just read, so float; else it
   stayed resident and holds whatever was written into it); :meth:`run` sends one batch through it.
3. :meth:`logits` applies the final norm and the head (with Gemma's soft-capping / Cohere's scale).

Layers stay resident after their first read while they fit ``resident_bytes`` (small models are read once and
run as fast as a whole loaded model); beyond it every pass streams. Hidden states live in a
:class:`HiddenStore`: on the host (or the device when small), spilled to files beyond its budget.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from quantmix.model.checkpoint import CheckpointError
from quantmix.model.weights import ModelWeights, install, module_name, read_module, release, set_tensor

__all__ = ["EngineError", "LayerEngine", "Batches", "HiddenStore", "default_resident_bytes"]


class EngineError(ValueError):
    """The model cannot be run layer by layer (names the model, layer or tensor and why)."""


class _LayerInputs(Exception):
    """Raised by a layer recorder: the decoder's per-layer inputs are recorded, stop the forward."""


def _mem_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def default_resident_bytes(device: torch.device) -> int:
    """How many bytes of layer weights may stay resident: a third of the free device memory on CUDA, a third
    of the available host memory on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 3)
    return _mem_available() // 3


# ------------------------------------------------------------------------------------------------ hidden states


class HiddenStore:
    """Tensors of equal role (one per token batch, per layer or per probe), kept in memory up to ``budget_bytes``
    (shared by every store made with the same ``pool``) and in files of ``spill_dir`` beyond it."""

    def __init__(self, pool: _Pool, place: torch.device) -> None:
        self.pool = pool
        self.place = place  # where in-memory tensors are kept (the device, or the host)
        self._mem: dict[int, Tensor] = {}
        self._disk: dict[int, tuple[Path, tuple[int, ...], torch.dtype]] = {}

    def __setitem__(self, key: int, t: Tensor) -> None:
        self.drop(key)
        n = t.numel() * t.element_size()
        if self.pool.take(n):
            self._mem[key] = t.detach().to(self.place)
            return
        path = self.pool.spill_file()
        host = t.detach().to("cpu")
        if host.dtype == torch.bfloat16:  # numpy has no bfloat16: store its bits
            host = host.view(torch.int16)
        np.save(path, host.contiguous().numpy(), allow_pickle=False)
        self._disk[key] = (path, tuple(t.shape), t.dtype)

    def __getitem__(self, key: int) -> Tensor:
        if key in self._mem:
            return self._mem[key]
        path, _, dtype = self._disk[key]
        t = torch.from_numpy(np.load(path, allow_pickle=False))
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t

    def __contains__(self, key: int) -> bool:
        return key in self._mem or key in self._disk

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def drop(self, key: int) -> None:
        t = self._mem.pop(key, None)
        if t is not None:
            self.pool.give(t.numel() * t.element_size())
        d = self._disk.pop(key, None)
        if d is not None:
            d[0].unlink(missing_ok=True)

    def clear(self) -> None:
        for k in list(self._mem) + list(self._disk):
            self.drop(k)

    @property
    def spilled(self) -> int:
        return len(self._disk)


@dataclass
class _Pool:
    """The shared memory budget of hidden-state stores and their spill folder (made on first spill)."""

    budget: int
    used: int = 0
    spill_dir: Path | None = None
    _tmp: tempfile.TemporaryDirectory | None = None
    spills: int = 0  # tensors written to files so far

    def take(self, n: int) -> bool:
        if self.used + n > self.budget:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n

    def spill_file(self) -> Path:
        if self._tmp is None:
            base = self.spill_dir
            if base is None:
                from quantmix.paths import cache_dir

                base = cache_dir() / "spill"
            base.mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix=f"hidden-{os.getpid()}-", dir=base)
        self.spills += 1
        return Path(self._tmp.name) / f"{self.spills}.npy"

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Batches:
    """Token batches of one run and what the decoder passes each layer for each batch."""

    ids: list[Tensor]  # per batch [rows, n_ctx] int64, on the host
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)  # [layer][batch] -> (args, kwargs)
    embedded: list[Tensor] | None = None  # the first layer's inputs seen while recording, until first used

    @property
    def n_tokens(self) -> int:
        return sum(int(b.numel()) for b in self.ids)

    def __len__(self) -> int:
        return len(self.ids)


# ------------------------------------------------------------------------------------------------ engine


def _config(model_dir: Path) -> Any:
    """:func:`~quantmix.model.checkpoint.float_config`, its failures as EngineError naming the file."""
    from quantmix.model.checkpoint import float_config

    try:
        return float_config(model_dir)
    except CheckpointError as e:
        raise EngineError(str(e)) from None
    except Exception as e:  # transformers raises many kinds
        raise EngineError(f"{model_dir}/config.json: transformers cannot read it ({e})") from None


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str | torch.dtype) -> torch.dtype:
    """The engine's compute dtype from its name (``float32`` or ``bfloat16``: bfloat16 halves a layer's device
    memory, which DeepSeek-V3's 45 GB float32 layers need on one GPU)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise EngineError(f"compute dtype {name!r}: choose {' or '.join(COMPUTE_DTYPES)}") from None


class LayerEngine:
    """The model of ``model_dir`` on ``device`` in ``dtype``, run one decoder layer at a time (module docstring).

    ``resident_bytes``: layer weights allowed to stay loaded between passes (default
    :func:`default_resident_bytes`; 0 streams every pass). ``hidden_bytes``: memory for hidden states before
    they spill to files (default: a quarter of the available host memory)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, *, resident_bytes: int | None = None,
                 hidden_bytes: int | None = None, spill_dir: Path | None = None,
                 stored_scales: bool | None = None) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        # float8 block-scaled weights read, pinned and uploaded as stored, scaled on the device (default on CUDA)
        self.stored_scales = self.device.type == "cuda" if stored_scales is None else stored_scales
        self.config = _config(self.model_dir)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        try:
            self.weights = ModelWeights(self.model_dir, self.config)
        except CheckpointError as e:
            raise EngineError(str(e)) from None
        self.decoder = self.model.get_decoder()
        layers = getattr(self.decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise EngineError(f"{self.model_dir}: {type(self.decoder).__name__} has no decoder layer list to "
                              f"stream through")
        self.layers: nn.ModuleList = layers
        self.layers_name = module_name(self.model, layers)
        self.n_layer = len(layers)
        self._load_outside()
        self.resident_bytes = default_resident_bytes(self.device) if resident_bytes is None else resident_bytes
        self._resident: set[int] = set()
        self._resident_used = 0
        self._pool_io = ThreadPoolExecutor(1, thread_name_prefix="quantmix-layer-read")
        self._pending: dict[int, Future] = {}
        self.layer_reads = 0  # layers read from the checkpoint (tests and cost reports)
        self.read_wait_s = 0.0  # time the compute waited for a layer's read (I/O bound when large)
        self.max_loaded = 0  # most layers present at once, resident ones included
        self._loaded: set[int] = set()
        self.hidden_pool = _Pool(_mem_available() // 4 if hidden_bytes is None else hidden_bytes,
                                 spill_dir=spill_dir)
        self._targets: dict | None = None

    # -------------------------------------------------------------------------------------------- outside layers

    def _outside_params(self) -> list[tuple[str, nn.Parameter]]:
        pre = self.layers_name + "."
        return [(n, p) for n, p in self.model.named_parameters() if not n.startswith(pre)]

    def _load_outside(self) -> None:
        """Embedding, final norm, head (tied or not) and every computed buffer outside the layers (rotary)."""
        self.model.tie_weights()  # on the meta device the tie is not made: lm_head would be read as its own
        pre = self.layers_name + "."
        try:
            for name, p in self._outside_params():
                t = self.weights.load(name, tuple(p.shape))
                set_tensor(self.model, name, t.to(self.device, self.dtype if t.is_floating_point() else t.dtype),
                           True)
        except CheckpointError as e:
            raise EngineError(str(e)) from None
        self.weights.ckpt.close()
        self.model.tie_weights()
        for mod_name, mod in self.model.named_modules():
            if mod_name.startswith(pre) or mod_name == self.layers_name:
                continue
            for bname, b in list(mod._buffers.items()):
                if b is not None and b.device.type != "meta":
                    mod._buffers[bname] = b.to(self.device)

    # -------------------------------------------------------------------------------------------- prologue

    def batches(self, chunks: Tensor, batch_tokens: int = 2048) -> Batches:
        """``chunks`` [n, n_ctx] cut into batches of about ``batch_tokens`` tokens, their per-layer calls recorded."""
        chunks = torch.as_tensor(chunks, dtype=torch.long)
        if chunks.dim() != 2 or chunks.numel() == 0:
            raise EngineError(f"token chunks must be a non-empty [n_chunk, n_ctx] tensor, got {tuple(chunks.shape)}")
        rows = max(1, batch_tokens // chunks.shape[1])
        b = Batches([chunks[i:i + rows] for i in range(0, chunks.shape[0], rows)])
        b.embedded = self._record(b, b.calls)
        return b

    @torch.no_grad()
    def embed(self, batches: Batches, recompute: bool = False) -> list[Tensor]:
        """The first layer's input for every batch, with the embedding as it is now (``recompute`` after a
        change to it; else the inputs seen while recording the batches are handed out once, not computed again)."""
        if batches.embedded is not None and not recompute:
            out, batches.embedded = batches.embedded, None
            return out
        return self._record(batches, None)

    def _record(self, batches: Batches, calls: list | None) -> list[Tensor]:
        n = self.n_layer
        stop_at = n - 1 if calls is not None else 0
        if calls is not None:
            calls[:] = [[] for _ in range(n)]
        first: list[Tensor] = []

        def recorder(i: int):  # noqa: ANN202 - closure factory
            def forward(*args: Any, **kwargs: Any) -> Tensor:
                h = args[0] if args else kwargs.pop("hidden_states")
                if calls is not None:
                    calls[i].append((tuple(args[1:]), kwargs))
                if i == 0:
                    first.append(h)
                if i == stop_at:
                    raise _LayerInputs
                return h
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = recorder(i)
        try:
            with torch.no_grad():
                for ids in batches.ids:
                    try:
                        self.decoder(input_ids=ids.to(self.device), use_cache=False)
                    except _LayerInputs:
                        pass
                    else:
                        raise EngineError(f"{type(self.decoder).__name__} did not call its layers in order")
        finally:
            for layer in self.layers:
                del layer.forward
        return first

    # -------------------------------------------------------------------------------------------- layers

    def _prefix(self, i: int) -> str:
        return f"{self.layers_name}.{i}"

    def _read(self, i: int) -> dict:
        return read_module(self.layers[i], self._prefix(i), self.weights, self.dtype, pin=self.device.type == "cuda",
                           stored=self.stored_scales)

    def _fetch(self, i: int) -> Future:
        if i not in self._pending:
            self._pending[i] = self._pool_io.submit(self._read, i)
        return self._pending[i]

    def layer_bytes(self, i: int) -> int:
        return sum(p.numel() * torch.finfo(self.dtype).bits // 8 for p in self.layers[i].parameters())

    @contextlib.contextmanager
    def layer(self, i: int, prefetch: int | None = -1) -> Iterator[bool]:
        """Layer ``i``'s weights present for the duration; yields whether they were just read (float weights).

        ``prefetch``: the layer to read in the background meanwhile (default ``i + 1``; None: none)."""
        if not 0 <= i < self.n_layer:
            raise EngineError(f"layer {i}: the model has {self.n_layer} decoder layers")
        fresh = i not in self._resident
        if fresh:
            t0 = time.perf_counter()
            try:
                tensors = self._fetch(i).result()
            except CheckpointError as e:
                raise EngineError(f"layer {i}: {e}") from None
            finally:
                self._pending.pop(i, None)
            self.read_wait_s += time.perf_counter() - t0
            install(self.layers[i], tensors, self.device, self._prefix(i), self.dtype)
            del tensors
            self.layer_reads += 1
            self._loaded.add(i)
            self.max_loaded = max(self.max_loaded, len(self._loaded) + len(self._pending))
        nxt = i + 1 if prefetch == -1 else prefetch
        if nxt is not None and 0 <= nxt < self.n_layer and nxt not in self._resident:
            self._fetch(nxt)
        try:
            yield fresh
        finally:
            if fresh:
                n = self.layer_bytes(i)
                if self._resident_used + n <= self.resident_bytes:
                    self._resident.add(i)
                    self._resident_used += n
                else:
                    release(self.layers[i])
                    self._loaded.discard(i)

    def run(self, i: int, h: Tensor, batches: Batches, j: int) -> Tensor:
        """Layer ``i`` (present) on hidden state ``h`` of batch ``j``."""
        args, kwargs = batches.calls[i][j]
        out = self.layers[i](h.to(self.device), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def is_resident(self, i: int) -> bool:
        return i in self._resident

    def evict(self, i: int) -> None:
        """Drop resident layer ``i`` (its weights were changed in place): the next use reads it again."""
        if i in self._resident:
            self._resident.discard(i)
            self._resident_used -= self.layer_bytes(i)
            release(self.layers[i])
            self._loaded.discard(i)

    def cancel_prefetch(self) -> None:
        """Wait for and drop background reads (before the layers change, or at the end of a pass)."""
        for f in self._pending.values():
            with contextlib.suppress(Exception):
                f.result()
        self._pending.clear()

    # -------------------------------------------------------------------------------------------- epilogue

    @property
    def final_norm(self) -> nn.Module:
        norm = getattr(self.decoder, "norm", None) or getattr(self.decoder, "final_layernorm", None)
        if not isinstance(norm, nn.Module):
            raise EngineError(f"{type(self.decoder).__name__}: no final norm found")
        return norm

    def logits(self, h: Tensor) -> Tensor:
        """Logits (float32) of the last layer's output ``h``: final norm, head, soft-capping or scale."""
        head = self.model.get_output_embeddings()
        x = head(self.final_norm(h.to(self.device)))
        tc = self.config.get_text_config()
        scale = float(getattr(tc, "logit_scale", None) or 1.0)
        if getattr(tc, "logits_scaling", None):
            scale /= float(tc.logits_scaling)
        if scale != 1.0:
            x = x * scale
        cap = getattr(tc, "final_logit_softcapping", None)
        return (torch.tanh(x / cap) * cap if cap else x).float()

    # -------------------------------------------------------------------------------------------- tensors

    @property
    def targets(self) -> dict:
        """GGUF tensor name -> its place in the model (:func:`quantmix.export.simulate.tensor_targets`)."""
        if self._targets is None:
            from quantmix.export.simulate import tensor_targets

            self._targets = tensor_targets(self.model)
        return self._targets

    def parameter(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def hidden_fits_device(self, batches: Batches, copies: int = 1) -> bool:
        """Whether ``copies`` hidden states of all of ``batches`` fit 2 GiB of the device (else: the host)."""
        width = int(self.config.get_text_config().hidden_size)
        return self.device.type == "cpu" or copies * batches.n_tokens * width * 4 <= (2 << 30)

    def store(self, on_device: bool = False) -> HiddenStore:
        """A hidden-state store of this engine's pool (on the device when ``on_device``, else the host)."""
        return HiddenStore(self.hidden_pool, self.device if on_device else torch.device("cpu"))

    @torch.no_grad()
    def forward_hidden(self, batches: Batches, progress: bool = False, desc: str = "forward") -> list[Tensor]:
        """The last layer's output for every batch (float model, or whatever the layers hold), streamed."""
        from tqdm import tqdm

        hs = self.embed(batches)
        store = self.store(on_device=self.hidden_fits_device(batches))
        for j, h in enumerate(hs):
            store[j] = h
        del hs
        for i in tqdm(range(self.n_layer), desc=desc, unit="layer", disable=not progress):
            with self.layer(i):
                for j in range(len(batches)):
                    store[j] = self.run(i, store[j], batches, j)
        out = [store[j] for j in range(len(batches))]
        store.clear()
        return out

    def close(self) -> None:
        self.cancel_prefetch()
        self._pool_io.shutdown(wait=True)
        self.hidden_pool.close()

    def __enter__(self) -> LayerEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chunk_rows(batches: Batches) -> Sequence[tuple[int, int]]:
    """(batch, row) of every chunk, in chunk order."""
    return [(j, r) for j, b in enumerate(batches.ids) for r in range(b.shape[0])]
