"""Importance matrices (llama-imatrix's statistics) computed with transformers, one layer at a time.

What llama-imatrix collects (tools/imatrix/imatrix.cpp), and what we match:

- Text: the whole file is tokenized (a BOS in front when the vocabulary adds one), cut into chunks of ``n_ctx``
  tokens (the tail is dropped; ``--chunks`` caps the count), and the first token of every chunk is replaced by
  BOS when the vocabulary adds one (SmolLM2's does not). Every token of every chunk is counted.
- Tensors: every matrix multiplication whose weight is named ``blk.*`` (so routers and the shared-expert gate
  too), plus ``output.weight`` only with ``--process-output`` (off by default); never ``token_embd``. Per input
  channel the sum of squared activations; per matrix the number of rows seen. For 3-D expert tensors
  (``*_exps``) each (token, expert) routing adds to that expert's row only; gate and up share the routed
  hidden states, down gets act(gate) * up of the same tokens.
- File: ``chunk_count`` = chunks run, ``chunk_size`` = n_ctx, ``datasets`` = the text files as given.

We also keep the sum of activations (``in_sum``, for mean-activation aware error models), in float64 while
accumulating. ``all_experts`` (ExLlamaV3's approach) sends every token through every expert for the statistics
only (the hidden states passed on keep the real routing), so no expert is left uncalibrated.

Memory stays bounded whatever the model's size: the forward pass is quantmix's one streaming engine
(:mod:`quantmix.model.engine`), which reads one decoder layer at a time from the safetensors checkpoint (the
next one read in the background), runs every row through it and drops it. HF parameter names map onto GGUF tensor names through
the tensor catalog (:mod:`quantmix.model.catalog`), the same mapping llama.cpp's converter applies.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantmix.calibration.activations import ActivationStats, ChannelStats, hook_modules
from quantmix.calibration.imatrix_io import Imatrix, ImatrixEntry, ImatrixError
from quantmix.model.weights import module_name

__all__ = [
    "compute_imatrix",
    "compute_imatrix_tokens",
    "imatrix_from_stats",
    "calibration_tokens",
    "ExpertCoverage",
    "expert_coverage",
    "coverage_report",
]

DEFAULT_BATCH_TOKENS = 2048  # llama-imatrix's default n_batch: 4 chunks of 512 per forward


# ------------------------------------------------------------------------------------------------ text


def _read_texts(texts: Sequence[str | Path]) -> list[str]:
    if not texts:
        raise ImatrixError("no calibration text given")
    out = []
    for t in texts:
        p = Path(t)
        if not p.is_file():
            raise ImatrixError(f"{p}: no such calibration text file")
        try:
            out.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ImatrixError(f"{p}: not UTF-8 text ({e})") from None
        if not out[-1].strip():
            raise ImatrixError(f"{p}: calibration text file is empty")
    return out


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front when asked for special tokens (llama.cpp's ``add_bos``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos


def _encode_prefix(tokenizer: Any, text: str, need: int | None) -> list[int]:
    """Token ids of ``text``, or of a prefix long enough for ``need`` tokens (tokenizing 2 MB takes seconds)."""
    if need is not None:
        n_chars = max(4096, need * 6)
        while n_chars < len(text):
            ids = tokenizer(text[:n_chars], add_special_tokens=False)["input_ids"]
            # tokens near the cut may differ from the whole text's: keep a margin and drop it
            if len(ids) >= need + 64:
                return ids[: len(ids) - 64]
            n_chars *= 2
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def calibration_tokens(tokenizer: Any, texts: Sequence[str], n_ctx: int = 512,
                       max_chunks: int | None = None) -> torch.Tensor:
    """The [n_chunk, n_ctx] token chunks llama-imatrix would run for ``texts`` (joined in order).

    With a BOS-adding vocabulary the stream starts with BOS and each chunk's first token is replaced by it.
    """
    if n_ctx < 1:
        raise ImatrixError(f"n_ctx must be positive, got {n_ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise ImatrixError(f"max_chunks must be positive, got {max_chunks}")
    add_bos = _tokenizer_adds_bos(tokenizer)
    need = None if max_chunks is None else max_chunks * n_ctx
    ids: list[int] = [int(tokenizer.bos_token_id)] if add_bos else []
    for text in texts:
        left = None if need is None else max(need - len(ids), 0)
        if left == 0:
            break
        ids += _encode_prefix(tokenizer, text, left)
    n_chunk = len(ids) // n_ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    if n_chunk == 0:
        raise ImatrixError(f"the calibration text gives {len(ids)} tokens, less than one chunk of {n_ctx}")
    chunks = torch.tensor(ids[: n_chunk * n_ctx], dtype=torch.long).view(n_chunk, n_ctx)
    if add_bos:
        chunks[:, 0] = int(tokenizer.bos_token_id)
    return chunks


# ------------------------------------------------------------------------------------------------ streaming


class _Resume:
    """imatrix's job state on disk (ExLlamaV3's conversion keeps one the same way): after a layer, the layer
    index, the statistics so far and every batch's hidden state, written atomically at most every
    ``every_s`` seconds. A run with the same inputs (``key``) continues after the last saved layer, with the
    identical result; a state of other inputs is ignored and replaced."""

    def __init__(self, folder: Path | None, key: str, every_s: float) -> None:
        self.path = folder / "imatrix-state.pt" if folder is not None else None
        self.key = key
        self.every_s = every_s
        self.last = time.monotonic()

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # torn or foreign file: start over
            return None
        return state if isinstance(state, dict) and state.get("key") == self.key else None

    def save(self, layer: int, stats: ActivationStats, hidden: list[torch.Tensor], force: bool = False) -> None:
        if self.path is None or (not force and time.monotonic() - self.last < self.every_s):
            return
        from quantmix.paths import temp_beside

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(self.path)
        os.close(fd)
        state = {"key": self.key, "layer": layer, "hidden": [h.cpu() for h in hidden],
                 "stats": {k: [v.in_sum2.cpu(), v.in_sum.cpu(), v.counts.cpu()] for k, v in stats.stats.items()}}
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.last = time.monotonic()

    def done(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@torch.no_grad()
def _stream(model_dir: Path, chunks: torch.Tensor, all_experts: bool, device: torch.device,
            dtype: torch.dtype, process_output: bool, batch_tokens: int,
            progress: bool, resume: _Resume | None = None) -> tuple[ActivationStats, nn.Module]:
    """Run ``chunks`` through the model layer by layer (:class:`~quantmix.model.engine.LayerEngine`, nothing
    kept resident: one pass); the statistics and the (meta) model skeleton. ``resume``: continue a saved job."""
    from tqdm import tqdm

    from quantmix.model.engine import EngineError, LayerEngine

    try:
        engine = LayerEngine(model_dir, device, dtype, resident_bytes=0)
    except EngineError as e:
        raise ImatrixError(str(e)) from None
    with engine:
        batches = engine.batches(chunks, batch_tokens)
        store = engine.store(on_device=engine.hidden_fits_device(batches))
        stats = ActivationStats(all_experts=all_experts)
        state = resume.load() if resume is not None else None
        start = 0
        if state is not None and len(state["hidden"]) == len(batches):
            start = int(state["layer"])
            for j, h in enumerate(state["hidden"]):
                store[j] = h.to(device)
            for k, (s2, s1, c) in state["stats"].items():
                stats.stats[k] = ChannelStats(s2.to(device), s1.to(device), c.to(device))
            batches.embedded = None
            print(f"quantmix imatrix: resuming after layer {start - 1} of {engine.n_layer} ({resume.path})",
                  file=sys.stderr)
        else:
            for j, h in enumerate(engine.embed(batches)):
                store[j] = h
        bar = tqdm(total=engine.n_layer, initial=start, desc="imatrix", unit="layer", disable=not progress,
                   file=sys.stderr)
        for i, layer in enumerate(engine.layers):
            if i < start:
                continue
            try:
                with engine.layer(i), hook_modules(layer, stats, f"{engine.layers_name}.{i}"):
                    for j in range(len(batches)):
                        store[j] = engine.run(i, store[j], batches, j)
            except EngineError as e:
                raise ImatrixError(str(e)) from None
            batches.calls[i] = []
            bar.update(1)
            if resume is not None and i + 1 < engine.n_layer:
                resume.save(i + 1, stats, [store[j] for j in range(len(batches))])
        bar.close()
        # the output projection's input: the final norm of the last hidden states (no logits needed)
        model = engine.model
        head = model.get_output_embeddings()
        tied = bool(getattr(engine.config.get_text_config(), "tie_word_embeddings", False))
        if process_output and head is not None and not tied:
            try:
                norm = engine.final_norm
            except EngineError as e:
                raise ImatrixError(f"{e}; cannot collect output.weight") from None
            st = stats.channel(f"{module_name(model, head)}.weight", 1, int(head.weight.shape[1]), device)
            for j in range(len(batches)):
                st.add(norm(store[j].to(device)))
        store.clear()
    stats.n_tokens = int(chunks.numel())
    return stats, model


# ------------------------------------------------------------------------------------------------ GGUF names


_MLA_PARTS = {"k_b_proj": "attn_k_b.weight", "v_b_proj": "attn_v_b.weight"}


def imatrix_from_stats(stats: ActivationStats, model: nn.Module, model_dir: str | Path, chunk_count: int,
                       chunk_size: int, datasets: Sequence[str] = (), process_output: bool = False) -> Imatrix:
    """Statistics keyed by HF parameter name (``model``'s, any device, meta included) -> imatrix entries keyed
    by GGUF tensor name. Only ``blk.*`` tensors are kept, and ``output.weight`` with ``process_output``."""
    from quantmix.model.catalog import checkpoint_tensors, catalog_from_config

    model_dir = Path(model_dir)
    cfg = model.config
    cat = catalog_from_config(model_dir)
    by_source: dict[str, list] = {}
    for t in cat.tensors:
        for src in t.hf_sources:
            by_source.setdefault(src, []).append(t)
    im = Imatrix(model_dir, datasets=list(datasets), chunk_count=int(chunk_count), chunk_size=int(chunk_size))
    problems = []
    for key in sorted(stats.stats):
        st: ChannelStats = stats.stats[key].cpu()
        mla = next((part for part in _MLA_PARTS if key.endswith(f".{part}.weight")), None)
        if mla is not None:  # MLA's absorbed halves of kv_b (activations._mla_taps)
            src = key[: -len(f"{mla}.weight")] + "kv_b_proj.weight"
            found = [t for t in by_source.get(src, []) if t.name.endswith(_MLA_PARTS[mla])]
            targets = [(t, st) for t in found]
            if not targets:
                problems.append(f"{key}: no {_MLA_PARTS[mla]} tensor for {src} in the catalog")
        elif any(t.name.endswith(_MLA_PARTS["k_b_proj"]) for t in by_source.get(key, [])):
            continue  # kv_b itself is not in the GGUF: the converter splits it, its halves are counted above
        else:
            try:
                shape = tuple(model.get_parameter(key).shape)
            except AttributeError:
                problems.append(f"{key}: not a parameter of the model")
                continue
            targets = [(t, st) for _, _, srcs in checkpoint_tensors(cfg, [(key, shape)])
                       for t in by_source.get(srcs[0], [])]  # none: tied lm_head, vision tower, ...
            # (two: gpt-oss's fused gate_up feeds both ffn_gate_exps and ffn_up_exps from one input)
        for t, st in targets:
            if not (t.name.startswith("blk.") or (process_output and t.name == "output.weight")):
                continue
            n_mat = math.prod(t.shape[2:])
            if tuple(st.in_sum2.shape) != (n_mat, t.shape[0]):
                problems.append(f"{t.name}: statistics of {key} are {tuple(st.in_sum2.shape)}, "
                                f"the tensor {list(t.shape)} needs ({n_mat}, {t.shape[0]})")
                continue
            counts = np.rint(st.counts.numpy()).astype(np.int64)
            sums, sums1 = st.in_sum2.numpy().astype(np.float32), st.in_sum.numpy().astype(np.float32)
            if n_mat > 1 and "_exps." not in t.name and np.all(counts == counts[0]):
                # a dense 3-D tensor (MLA's per-head k_b / v_b): one count for all its matrices, as llama-imatrix
                # keeps it ("use a single count per dense tensor"), so the files agree entry for entry
                sums, sums1, counts = sums.reshape(1, -1), sums1.reshape(1, -1), counts[:1]
            im.entries[t.name] = ImatrixEntry(sums, counts, sums1)
    if problems:
        print("quantmix imatrix: skipped: " + "; ".join(problems), file=sys.stderr)
    if not im.entries:
        raise ImatrixError(f"{model_dir}: no statistics map onto GGUF tensors")
    im.entries = dict(sorted(im.entries.items()))
    return im


# ------------------------------------------------------------------------------------------------ API


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ImatrixError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many kinds
        raise ImatrixError(f"{model_dir}/config.json: transformers cannot read it ({e})") from None


def compute_imatrix_tokens(
    model_dir: str | Path,
    chunks: torch.Tensor,
    all_experts: bool = False,
    device: str | torch.device | None = None,
    *,
    datasets: Sequence[str] = (),
    process_output: bool = False,
    dtype: torch.dtype = torch.float32,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    save_every_s: float = 60.0,
) -> Imatrix:
    """The importance matrix of the model in ``model_dir`` over token ``chunks`` [n_chunk, n_ctx] (each chunk
    run as its own sequence, ``batch_tokens`` tokens per forward). See the module docstring.

    ``resume_dir``: where the job's state is saved (every ``save_every_s`` seconds, after a layer) and found
    again after an interrupt (kill -9 included): the run continues after the last saved layer."""
    model_dir = Path(model_dir)
    cfg = _config(model_dir)
    chunks = torch.as_tensor(chunks, dtype=torch.long)
    if chunks.dim() != 2 or chunks.numel() == 0:
        raise ImatrixError(f"token chunks must be a non-empty [n_chunk, n_ctx] tensor, got {tuple(chunks.shape)}")
    vocab = int(getattr(cfg.get_text_config(), "vocab_size", 0) or 0)
    if vocab and (int(chunks.min()) < 0 or int(chunks.max()) >= vocab):
        raise ImatrixError(f"{model_dir}: token ids outside the vocabulary of {vocab}")
    dev = _device(device)
    resume = None
    if resume_dir is not None:
        from quantmix.model.fingerprint import model_fingerprint

        key = hashlib.sha256(json.dumps([model_fingerprint(model_dir), hashlib.sha256(chunks.numpy().tobytes()).hexdigest(),
                                         list(chunks.shape), all_experts, str(dtype), process_output, batch_tokens,
                                         dev.type, torch.__version__]).encode()).hexdigest()
        resume = _Resume(Path(resume_dir), key, save_every_s)
    stats, model = _stream(model_dir, chunks, all_experts, dev, dtype, process_output, batch_tokens, progress,
                           resume)
    im = imatrix_from_stats(stats, model, model_dir, chunks.shape[0], chunks.shape[1], datasets, process_output)
    if resume is not None:
        resume.done()
    return im


def compute_imatrix(
    model_dir: str | Path,
    texts: Sequence[str | Path],
    n_ctx: int = 512,
    max_chunks: int | None = None,
    all_experts: bool = False,
    device: str | torch.device | None = None,
    *,
    process_output: bool = False,
    dtype: torch.dtype = torch.float32,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    save_every_s: float = 60.0,
) -> Imatrix:
    """llama-imatrix's statistics (plus ``in_sum``) of the HF model in ``model_dir`` over the text files
    ``texts``: chunks of ``n_ctx`` tokens, at most ``max_chunks``; ``all_experts``: every token through every
    expert; ``device``: CUDA when present, else the CPU; ``process_output``: also ``output.weight``
    (llama-imatrix's ``--process-output``). Entries are keyed by GGUF tensor name; write with
    :func:`quantmix.calibration.imatrix_io.write_imatrix`."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    _config(model_dir)
    strings = _read_texts(texts)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many kinds
        raise ImatrixError(f"{model_dir}: no usable tokenizer ({e})") from None
    if not tok("Hello world", add_special_tokens=False)["input_ids"]:
        raise ImatrixError(f"{model_dir}: no usable tokenizer (it encodes text to no tokens; tokenizer files missing?)")
    chunks = calibration_tokens(tok, strings, n_ctx, max_chunks)
    return compute_imatrix_tokens(model_dir, chunks, all_experts, device, datasets=[str(t) for t in texts],
                                  process_output=process_output, dtype=dtype, batch_tokens=batch_tokens,
                                  progress=progress, resume_dir=resume_dir, save_every_s=save_every_s)


# ------------------------------------------------------------------------------------------------ coverage


@dataclass(frozen=True)
class ExpertCoverage:
    """Tokens that calibrated each expert of one layer (from its routed expert tensors' counts)."""

    layer: str  # "blk.N"
    tensor: str
    counts: np.ndarray  # int64 [n_expert]

    def below(self, threshold: int) -> list[int]:
        return [int(e) for e in np.nonzero(self.counts < threshold)[0]]


def expert_coverage(im: Imatrix) -> list[ExpertCoverage]:
    """Per layer with expert tensors: tokens per expert (the first expert tensor of the layer, by name;
    all of a layer's routed tensors see the same tokens)."""
    seen: dict[str, ExpertCoverage] = {}
    for name in sorted(im.entries):
        e = im.entries[name]
        if e.n_mat <= 1 or not name.startswith("blk."):
            continue
        layer = ".".join(name.split(".")[:2])
        if layer not in seen:
            seen[layer] = ExpertCoverage(layer, name, e.counts.astype(np.int64))
    return sorted(seen.values(), key=lambda c: int(c.layer.split(".")[1]))


def coverage_report(im: Imatrix, threshold: int | None = None) -> str:
    """A text report: per MoE layer min / median / max tokens per expert and the experts below ``threshold``
    tokens (default: a tenth of an even share of the routed tokens)."""
    cov = expert_coverage(im)
    if not cov:
        return "expert coverage: no expert tensors (dense model)"
    lines = [f"expert coverage ({len(cov)} MoE layers, {cov[0].counts.size} experts each)"]
    total_low = total_zero = 0
    for c in cov:
        thr = threshold if threshold is not None else max(1, int(c.counts.mean() / 10))
        low = c.below(thr)
        zero = int((c.counts == 0).sum())
        total_low += len(low)
        total_zero += zero
        line = (f"  {c.layer:>7}: tokens per expert min {int(c.counts.min())}, median {int(np.median(c.counts))}, "
                f"max {int(c.counts.max())}")
        if low:
            shown = ", ".join(f"{e} ({int(c.counts[e])})" for e in low[:16])
            more = f" and {len(low) - 16} more" if len(low) > 16 else ""
            line += f"; {len(low)} below {thr}: {shown}{more}"
        lines.append(line)
    lines.append(f"  experts below threshold: {total_low}, never routed: {total_zero}"
                 + (" (use --all-experts to calibrate them)" if total_zero else ""))
    return "\n".join(lines)
