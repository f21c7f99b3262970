"""The reference model's distributions, computed once per (model, text, chunking) and cached on disk.

What is stored: not the logits but the hidden state the output head reads at every scored position (float32,
``hidden_size`` numbers per token), plus the chunked token ids and the reference's exact NLL per token. The
reference distribution at a position is ``softmax(head(h))`` with the reference head, which evaluation keeps
(a copy of the float weights taken before quantization). That is exact, and small: SmolLM2-768 stores
3 KiB per scored token where llama-perplexity's ``--kl-divergence-base`` file stores 96 KiB (49,152
uint16 log-probs), and the full distribution is there, so KL can be taken in both directions.

Precision (measured by tests/test_eval.py): float32 storage reproduces the model's own logits up to the
float rounding of one matmul (|dlogit| ~1e-5), an effect on mean KLD below 1e-7. ``precision="float16"``
halves the file; its effect on mean KLD is reported by the same test (below 1e-4 on the fixtures).

The head replay is checked against the model's real logits on every chunk while the cache is built, so a
model whose logits are not ``head(h)`` (an unknown logit scaling) is refused instead of mis-measured; the
known ones (Gemma's final soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``) are replayed.

The cache key is a hash of the model directory's files (weights, config, tokenizer), the chunked token ids
(so the text, tokenizer, BOS rule, context and chunk count), the scored positions, the storage precision and
the torch / transformers versions; a changed input can never reuse a stale file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quantmix.evaluation.perplexity import (
    ScoredChunk,
    iter_scored_logits,
    make_chunks,
    scored_first,
    token_nll,
    tokenize_like_llamacpp,
)
from quantmix.paths import cache_dir, file_lock, temp_beside

__all__ = ["ReferenceError", "EvalText", "HeadReplay", "ReferenceCache", "PRECISIONS", "prepare_text",
           "model_fingerprint", "capture_head", "reference_key", "reference_distributions"]

FORMAT_VERSION = 2  # 2: computed by the streaming engine (batches of chunks)
MAGIC = b"QMREF01\n"
PRECISIONS = {"float32": np.float32, "float16": np.float16}
_ALIGN = 64


class ReferenceError(ValueError):
    """The reference cannot be computed or a cache file is unusable; the message names the file or model."""


@dataclass(frozen=True)
class EvalText:
    """An evaluation text tokenized and chunked as llama-perplexity does, and which positions are scored."""

    chunks: Tensor  # [n_chunks, n_ctx] int64, BOS already written into position 0 when add_bos
    first: int  # first scored position (n_ctx // 2, or 0 with all positions)
    add_bos: bool
    label: str  # the text's name or path, for reports
    text_sha256: str

    @property
    def n_ctx(self) -> int:
        return int(self.chunks.shape[1])

    @property
    def n_chunks(self) -> int:
        return int(self.chunks.shape[0])

    @property
    def n_scored(self) -> int:
        """Scored positions per chunk."""
        return self.n_ctx - self.first - 1

    @property
    def all_positions(self) -> bool:
        return self.first == 0

    @property
    def tokens_sha256(self) -> str:
        return hashlib.sha256(self.chunks.to(torch.int32).numpy().tobytes()).hexdigest()


def prepare_text(tokenizer: object, text: str, n_ctx: int = 512, max_chunks: int | None = None,
                 all_positions: bool = False, label: str = "") -> EvalText:
    """Tokenize ``text`` like llama-perplexity (BOS per the tokenizer) and cut it into chunks."""
    tokens, add_bos = tokenize_like_llamacpp(tokenizer, text)
    bos = int(tokenizer.bos_token_id) if add_bos else None  # type: ignore[attr-defined]
    chunks = make_chunks(tokens, n_ctx, max_chunks, bos)
    return EvalText(chunks, scored_first(n_ctx, all_positions), add_bos, label,
                    hashlib.sha256(text.encode("utf-8")).hexdigest())


def model_fingerprint(model_dir: str | Path) -> str:
    """The model directory's identity (:func:`quantmix.model.fingerprint.model_fingerprint`: each file hashed
    once per version, not on every call)."""
    from quantmix.model import fingerprint

    try:
        return fingerprint.model_fingerprint(model_dir)
    except ValueError as e:
        raise ReferenceError(str(e)) from None


# ------------------------------------------------------------------------------------------------ head replay


@dataclass
class HeadReplay:
    """The reference output head, kept aside so logits can be rebuilt from cached hidden states."""

    weight: Tensor  # [vocab, hidden] float32
    bias: Tensor | None
    softcap: float = 0.0  # logits = softcap * tanh(logits / softcap)
    scale: float = 1.0  # logits *= scale (Cohere logit_scale, 1 / Granite logits_scaling)

    def __call__(self, hidden: Tensor) -> Tensor:
        x = torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        if self.scale != 1.0:
            x = x * self.scale
        if self.softcap:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x.float()

    def describe(self) -> str:
        extra = (f", x{self.scale:g}" if self.scale != 1.0 else "") + (f", softcap {self.softcap:g}"
                                                                        if self.softcap else "")
        return f"linear {tuple(self.weight.shape)}" + (" + bias" if self.bias is not None else "") + extra


def capture_head(model: nn.Module) -> HeadReplay:
    """Copy the model's output head (call before quantizing the model in place)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(head, nn.Linear):
        raise ReferenceError(f"{type(model).__name__}: output head is {type(head).__name__}, not a linear layer")
    cfg = getattr(model, "config", None)
    tc = getattr(cfg, "text_config", None) or cfg
    softcap = float(getattr(tc, "final_logit_softcapping", None) or 0.0)
    scale = float(getattr(tc, "logit_scale", None) or 1.0)
    ls = getattr(tc, "logits_scaling", None)
    if ls:
        scale /= float(ls)
    bias = head.bias.detach().clone() if head.bias is not None else None
    return HeadReplay(head.weight.detach().clone(), bias, softcap, scale)


# ------------------------------------------------------------------------------------------------ cache file


@dataclass
class ReferenceCache:
    """A cached reference: per chunk, the hidden states at the scored positions and the exact NLL."""

    path: Path
    meta: dict
    tokens: np.ndarray  # [n_chunks, n_ctx] int32
    hidden: np.ndarray  # [n_chunks, n_scored, hidden] float32 | float16
    nll: np.ndarray  # [n_chunks, n_scored] float64, from the model's own float32 logits

    @property
    def precision(self) -> str:
        return str(self.meta["precision"])

    def hidden_chunk(self, i: int) -> Tensor:
        return torch.from_numpy(np.array(self.hidden[i], dtype=np.float32))

    def logits(self, i: int, head: HeadReplay) -> Tensor:
        """Reference logits of chunk ``i``'s scored positions, [n_scored, vocab] float32."""
        return head(self.hidden_chunk(i).to(head.weight.device))

    def check_tokens(self, text: EvalText) -> None:
        if self.tokens.shape != tuple(text.chunks.shape) or not np.array_equal(self.tokens, text.chunks.numpy()):
            raise ReferenceError(f"{self.path}: cached tokens differ from the evaluation text's")


def _layout(n_chunks: int, n_ctx: int, n_scored: int, hidden: int, precision: str) -> dict[str, dict]:
    arrays = {
        "tokens": ("int32", (n_chunks, n_ctx)),
        "nll": ("float64", (n_chunks, n_scored)),
        "hidden": (precision, (n_chunks, n_scored, hidden)),
    }
    out, off = {}, 0
    for name, (dt, shape) in arrays.items():
        out[name] = {"dtype": dt, "shape": list(shape), "offset": off}
        off += -(-int(np.dtype(dt).itemsize * math.prod(shape)) // _ALIGN) * _ALIGN
    return out


def _header_bytes(meta: dict) -> bytes:
    raw = json.dumps(meta, sort_keys=True).encode()
    raw += b" " * (-(len(MAGIC) + 8 + len(raw)) % _ALIGN)
    return MAGIC + len(raw).to_bytes(8, "little") + raw


def read_reference(path: str | Path) -> ReferenceCache:
    """Open a reference cache file (memory-mapped)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(len(MAGIC))
            n = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise ReferenceError(f"{p}: unreadable reference cache ({e})") from None
    if magic != MAGIC or meta.get("format") != FORMAT_VERSION:
        raise ReferenceError(f"{p}: not a quantmix reference cache of format {FORMAT_VERSION}")
    base = len(MAGIC) + 8 + n
    arrays = {}
    size = p.stat().st_size
    for name, a in meta["arrays"].items():
        dt = np.dtype(a["dtype"])
        end = base + a["offset"] + dt.itemsize * math.prod(a["shape"])
        if end > size:
            raise ReferenceError(f"{p}: truncated ({size} bytes, array {name} ends at {end})")
        arrays[name] = np.memmap(p, dtype=dt, mode="r", offset=base + a["offset"], shape=tuple(a["shape"]))
    return ReferenceCache(p, meta, arrays["tokens"], arrays["hidden"], arrays["nll"])


def reference_key(model_fp: str, text: EvalText, precision: str, model_dtype: str) -> str:
    """The hash a cached reference must carry to be reused."""
    import transformers

    parts = {"format": FORMAT_VERSION, "model": model_fp, "tokens": text.tokens_sha256, "n_ctx": text.n_ctx,
             "first": text.first, "precision": precision, "dtype": model_dtype, "torch": torch.__version__,
             "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _build(model: nn.Module, text: EvalText, head: HeadReplay, precision: str, meta: dict, out: Path,
           progress: Callable[[int, int], None] | None,
           scored: Callable[[], Iterable[ScoredChunk]] | None = None) -> None:
    n_hidden = int(head.weight.shape[1])
    layout = _layout(text.n_chunks, text.n_ctx, text.n_scored, n_hidden, precision)
    meta = dict(meta, arrays=layout)
    header = _header_bytes(meta)
    base = len(header)
    total = base + max(a["offset"] + np.dtype(a["dtype"]).itemsize * math.prod(a["shape"]) for a in layout.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(out)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(header)
            fh.truncate(total)
        mm = {k: np.memmap(tmp, dtype=np.dtype(a["dtype"]), mode="r+", offset=base + a["offset"],
                           shape=tuple(a["shape"])) for k, a in layout.items()}
        mm["tokens"][:] = text.chunks.numpy().astype(np.int32)
        worst = 0.0
        chunks = scored() if scored is not None else iter_scored_logits(model, text.chunks, first=text.first,
                                                                        with_hidden=True)
        for sc in chunks:
            assert sc.hidden is not None
            replay = head(sc.hidden.to(head.weight.device)).cpu()
            err = float((replay - sc.logits).abs().max())
            tol = 1e-4 * max(1.0, float(sc.logits.abs().max()))
            if not err <= tol:
                raise ReferenceError(
                    f"{type(model).__name__}: its logits are not the output head applied to the hidden state "
                    f"({head.describe()}): max difference {err:.3g} in chunk {sc.index}; this architecture's "
                    f"logit post-processing is unknown to quantmix's reference cache")
            worst = max(worst, err)
            mm["hidden"][sc.index] = sc.hidden.numpy().astype(PRECISIONS[precision])
            mm["nll"][sc.index] = token_nll(sc.logits, sc.targets).numpy()
            if progress is not None:
                progress(sc.index + 1, text.n_chunks)
        for m in mm.values():
            m.flush()
        del mm
        with open(tmp, "r+b") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def reference_distributions(model: nn.Module, model_dir: str | Path, text: EvalText, precision: str = "float32",
                            head: HeadReplay | None = None, cache: Path | None = None,
                            progress: Callable[[int, int], None] | None = None,
                            scored: Callable[[], Iterable[ScoredChunk]] | None = None) -> ReferenceCache:
    """The cached reference of ``model`` (loaded from ``model_dir``, not yet quantized) on ``text``; computed
    and written on first use. ``cache``: the directory (default ``cache_dir()/reference``). ``scored``: makes
    the chunks' logits and head inputs (the streaming engine's pass; default a forward of ``model`` per chunk),
    called only when the cache is built."""
    if precision not in PRECISIONS:
        raise ReferenceError(f"reference precision {precision!r}: choose one of {sorted(PRECISIONS)}")
    head = head if head is not None else capture_head(model)
    fp = model_fingerprint(model_dir)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    key = reference_key(fp, text, precision, dtype)
    d = cache if cache is not None else cache_dir() / "reference"
    path = d / f"{key[:32]}.qmref"
    meta = {"format": FORMAT_VERSION, "key": key, "model_dir": str(model_dir), "model_sha256": fp,
            "text": text.label, "text_sha256": text.text_sha256, "tokens_sha256": text.tokens_sha256,
            "n_ctx": text.n_ctx, "n_chunks": text.n_chunks, "first": text.first, "add_bos": text.add_bos,
            "precision": precision, "model_dtype": dtype, "head": head.describe()}
    with file_lock(f"reference-{key[:16]}"):
        if path.exists():
            try:
                ref = read_reference(path)
                if ref.meta.get("key") == key:
                    ref.check_tokens(text)
                    return ref
            except ReferenceError:
                pass  # damaged or foreign: rebuilt below
        was_training = model.training
        model.eval()
        try:
            _build(model, text, head, precision, meta, path, progress, scored)
        finally:
            model.train(was_training)
    ref = read_reference(path)
    ref.check_tokens(text)
    return ref
