"""Perplexity of a Hugging Face causal LM, computed the way llama-perplexity computes it.

llama-perplexity (tools/perplexity/perplexity.cpp, ``perplexity()``):
- tokenizes the whole text once with special tokens, i.e. a BOS in front when the vocabulary's
  ``add_bos_token`` is set;
- cuts the tokens into ``len // n_ctx`` chunks of ``n_ctx`` (the tail is dropped), optionally at most
  ``--chunks`` of them;
- when ``add_bos`` is set, overwrites the first token of every chunk with BOS;
- scores only the second half: the logits at positions ``n_ctx/2 .. n_ctx-2`` predict tokens
  ``n_ctx/2+1 .. n_ctx-1``, i.e. ``n_ctx - n_ctx/2 - 1`` tokens per chunk;
- reports ``exp(mean NLL)`` and its standard error ``ppl * sqrt((E[x^2]-E[x]^2)/(count-1))``.

:func:`iter_scored_logits` yields the scored logits per chunk so KL-divergence and top-k agreement can be
built on the same chunking (``first=0`` scores every position instead, quantmix's ``--all-positions``; it can
also hand back the hidden state the output head read, which is what the reference cache stores).
:func:`run_llama_perplexity` runs the real tool as the oracle.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "PerplexityResult",
    "ScoredChunk",
    "tokenize_like_llamacpp",
    "make_chunks",
    "scored_first",
    "iter_scored_logits",
    "token_nll",
    "perplexity",
    "run_llama_perplexity",
]


@dataclass(frozen=True)
class PerplexityResult:
    """Mean negative log-likelihood (nats per token) over ``count`` scored tokens, and its exp."""

    nll: float
    ppl: float
    count: int
    n_chunks: int
    n_ctx: int
    ppl_stderr: float = float("nan")


@dataclass(frozen=True)
class ScoredChunk:
    """One chunk's scored positions: ``logits`` [n_scored, vocab] (float32) and the ``targets`` they predict."""

    index: int
    logits: torch.Tensor
    targets: torch.Tensor
    hidden: torch.Tensor | None = None  # [n_scored, hidden] input of the output head, when asked for


def _wants_bos(tokenizer: object) -> bool:
    """Whether the tokenizer puts BOS in front (what llama.cpp's ``add_bos_token`` mirrors after conversion)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    flag = getattr(tokenizer, "add_bos_token", None)
    if isinstance(flag, bool):
        return flag
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]  # type: ignore[operator]
    return len(ids) > 0 and ids[0] == bos


def tokenize_like_llamacpp(tokenizer: object, text: str, add_bos: bool | None = None) -> tuple[list[int], bool]:
    """Token ids of ``text`` (BOS first when ``add_bos``; None: as the tokenizer does), and add_bos."""
    if add_bos is None:
        add_bos = _wants_bos(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError(f"add_bos requested but {type(tokenizer).__name__} has no bos_token_id")
        ids = [int(bos)] + ids
    return ids, add_bos


def make_chunks(tokens: Sequence[int] | torch.Tensor, n_ctx: int, max_chunks: int | None = None,
                bos_id: int | None = None) -> torch.Tensor:
    """[n_chunks, n_ctx] chunks as llama-perplexity cuts them; first token set to ``bos_id`` when given."""
    if n_ctx < 4 or n_ctx % 2:
        raise ValueError(f"n_ctx must be an even number >= 4, got {n_ctx}")
    t = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if t.numel() < 2 * n_ctx:
        raise ValueError(f"need at least {2 * n_ctx} tokens for n_ctx={n_ctx}, the text has {t.numel()}")
    n = t.numel() // n_ctx
    if max_chunks is not None and max_chunks > 0:
        n = min(n, max_chunks)
    chunks = t[: n * n_ctx].view(n, n_ctx).clone()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def scored_first(n_ctx: int, all_positions: bool = False) -> int:
    """First scored position of a chunk: ``n_ctx // 2`` as llama-perplexity, or 0 to score every position."""
    return 0 if all_positions else n_ctx // 2


def _forward_logits(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions, [batch, keep, vocab], asking the model not to compute the rest."""
    try:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        out = model(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -keep:, :]


@torch.no_grad()
def iter_scored_logits(model: nn.Module, chunks: torch.Tensor, batch_size: int = 1, first: int | None = None,
                       with_hidden: bool = False) -> Iterator[ScoredChunk]:
    """Run every chunk through ``model`` and yield the logits of its scored positions.

    ``first``: first scored position (default ``n_ctx // 2``, llama-perplexity's second half); positions
    ``first .. n_ctx-2`` are scored, each predicting the next token. ``with_hidden``: also return what the
    output head (``model.get_output_embeddings()``) read at those positions, captured by a forward hook."""
    n_chunks, n_ctx = chunks.shape
    first = n_ctx // 2 if first is None else first
    if not 0 <= first <= n_ctx - 2:
        raise ValueError(f"first scored position {first} is outside 0..{n_ctx - 2} for n_ctx={n_ctx}")
    keep = n_ctx - first  # positions first .. n_ctx-1; the last one predicts nothing and is dropped
    device = next(model.parameters()).device
    seen: list[torch.Tensor] = []
    hook = None
    if with_hidden:
        head = model.get_output_embeddings()  # type: ignore[operator]
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output head to read hidden states from")
        hook = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    try:
        for start in range(0, n_chunks, batch_size):
            ids = chunks[start:start + batch_size].to(device)
            seen.clear()
            logits = _forward_logits(model, ids, keep)[:, :-1, :].float().cpu()
            hidden = None
            if with_hidden:
                if len(seen) != 1:
                    raise RuntimeError(f"the output head ran {len(seen)} times in one forward pass, expected once")
                hidden = seen[0][:, -keep:, :][:, :-1, :].float().cpu()
            for b in range(ids.shape[0]):
                yield ScoredChunk(start + b, logits[b], chunks[start + b, first + 1:].clone(),
                                  None if hidden is None else hidden[b])
    finally:
        if hook is not None:
            hook.remove()


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per position [n] (float64), log-softmax computed in float64."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return -lp.gather(-1, targets.long()[:, None]).squeeze(-1)


def perplexity(model: nn.Module, tokenizer: object, text: str, n_ctx: int = 512, max_chunks: int | None = None,
               add_bos: bool | None = None, batch_size: int = 1, all_positions: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with llama-perplexity's tokenization, chunking and scoring
    (``all_positions``: every position of each chunk scored, not only the second half)."""
    tokens, add_bos = tokenize_like_llamacpp(tokenizer, text, add_bos)
    bos = int(tokenizer.bos_token_id) if add_bos else None  # type: ignore[attr-defined]
    chunks = make_chunks(tokens, n_ctx, max_chunks, bos)
    was_training = model.training
    model.eval()
    total = 0.0
    total2 = 0.0
    count = 0
    try:
        for sc in iter_scored_logits(model, chunks, batch_size, first=scored_first(n_ctx, all_positions)):
            v = token_nll(sc.logits, sc.targets)
            total += float(v.sum())
            total2 += float((v * v).sum())
            count += v.numel()
    finally:
        model.train(was_training)
    return _result(total, total2, count, chunks.shape[0], n_ctx)


def _result(total: float, total2: float, count: int, n_chunks: int, n_ctx: int) -> PerplexityResult:
    nll = total / count
    ppl = math.exp(nll)
    var = total2 / count - nll * nll
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan")
    return PerplexityResult(nll, ppl, count, n_chunks, n_ctx, err)


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def run_llama_perplexity(gguf: Path, text_file: Path, n_ctx: int = 512, max_chunks: int | None = None,
                         threads: int = 2, extra_args: Sequence[str] = ()) -> PerplexityResult:
    """Run the real llama-perplexity on ``gguf`` and parse its final estimate (nll = ln ppl)."""
    from quantmix.tools.llamacpp import LlamaCppError, ensure_llamacpp

    lc = ensure_llamacpp()
    args = ["-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "-t", str(threads), "--no-repack",
            "--no-warmup"]
    if max_chunks is not None:
        args += ["--chunks", str(max_chunks)]
    proc = lc.run_until("llama-perplexity", *args, *extra_args, done="Final estimate", stdin=subprocess.DEVNULL)
    log = proc.stdout + proc.stderr
    m = _FINAL.search(log)
    c = _CHUNKS.search(log)
    if proc.returncode != 0 or m is None or c is None:
        raise LlamaCppError(f"llama-perplexity on {gguf} with {text_file} gave no estimate "
                            f"(exit {proc.returncode}):\n{log[-3000:]}")
    ppl = float(m.group(1))
    n_chunks, ctx = int(c.group(1)), int(c.group(2))
    return PerplexityResult(math.log(ppl), ppl, n_chunks * (ctx - ctx // 2 - 1), n_chunks, ctx, float(m.group(2)))
