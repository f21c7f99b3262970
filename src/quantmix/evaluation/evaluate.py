"""``quantmix eval``: a quantized model against its float reference, on real text, every standard metric.

One call: load the float model (float32), get the cached reference distributions (computed on first use,
:mod:`quantmix.evaluation.reference`), keep the reference output head aside, quantize the model in place
(a recipe through :func:`quantmix.export.simulate.simulate_quantization`, or a GGUF file's dequantized
weights through :func:`quantmix.evaluation.gguf_model.load_gguf_weights`), then score every chunk and compare
the two distributions token by token (:mod:`quantmix.evaluation.kld`).

``act_quant="llama-cpu"`` (the default) runs the quantized model with llama.cpp's CPU matmul numerics
(activations quantized to Q8_K / Q8_0 before each quantized dot product, :mod:`quantmix.evaluation.llama_cpu`),
so the KLD is what llama-perplexity reports for the same GGUF; ``"none"`` measures the weights' effect alone.
The reference is never emulated: it is the float32 model, as llama-perplexity's base is the F32/F16 GGUF.
Not emulated either: llama.cpp's CPU flash attention, which accumulates V in F16 in the base run and in the
quantized run alike; it adds a quant-independent ~0.0015 to llama-perplexity's KLD on smollm2-768 (its
``-fa off`` gives what quantmix gives).

Default scoring is llama-perplexity's (chunks of ``n_ctx``, second half scored, BOS per chunk) so the numbers
can be set beside published ones; ``all_positions`` scores every position. The default evaluation set is the
first 32,768 tokens of ``wiki-eval`` (64 chunks of 512, 16,320 scored tokens), what a 2-core CPU evaluates
in minutes per quantization on the 200M-parameter fixtures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from quantmix.evaluation.kld import KLDStats, MetricsAccumulator, token_metrics
from quantmix.evaluation.nextn import NextNHead, load_nextn
from quantmix.evaluation.perplexity import iter_scored_logits
from quantmix.evaluation.reference import (
    EvalText,
    HeadReplay,
    capture_head,
    prepare_text,
    reference_distributions,
)
from quantmix.planning.recipe import RecipeSpec

__all__ = ["DEFAULT_EVAL_TOKENS", "DEFAULT_TEXT", "QuantSource", "EvalResult", "TextSource", "TextSourceError",
           "load_texts", "recipe_source", "gguf_source", "model_label", "evaluate", "evaluate_tokens"]

DEFAULT_EVAL_TOKENS = 32768
DEFAULT_TEXT = "wiki-eval"


@dataclass(frozen=True)
class QuantSource:
    """What is evaluated: a recipe applied in torch (``spec``, optional ``imatrix``) or a GGUF file."""

    spec: RecipeSpec | None = None
    gguf: Path | None = None
    imatrix: Path | None = None
    label: str = ""

    @property
    def kind(self) -> str:
        return "gguf" if self.gguf is not None else "recipe"

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.gguf is not None:
            return self.gguf.name.removesuffix(".gguf")
        assert self.spec is not None
        return self.spec.describe() + (" + imatrix" if self.imatrix else "")


def recipe_source(spec: RecipeSpec, imatrix: str | Path | None = None, label: str = "") -> QuantSource:
    return QuantSource(spec=spec, imatrix=Path(imatrix) if imatrix else None, label=label)


def gguf_source(path: str | Path, label: str = "") -> QuantSource:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such GGUF file")
    return QuantSource(gguf=p, label=label)


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: what was compared (``meta``) and the statistics (``stats``)."""

    meta: dict
    stats: KLDStats
    nextn: KLDStats | None = None  # GLM's NextN (MTP) draft head, quantized against float (evaluation.nextn)

    def row(self) -> dict:
        """One flat record (a row of runs.jsonl / runs.csv): meta fields, the statistics, the NextN head's
        (prefixed ``nextn_``) where the model has one."""
        extra = {f"nextn_{k}": v for k, v in self.nextn.as_dict().items()} if self.nextn is not None else {}
        return {**self.meta, **self.stats.as_dict(), **extra}


class TextSourceError(ValueError):
    """A text file that cannot be used (missing, unreadable, not UTF-8, empty); the message names it."""


@dataclass(frozen=True)
class TextSource:
    """A text the job reads: a built-in text or files joined in order, with what reports record of each part
    (name, bytes, sha256), so a plan or a card says exactly which text it was measured on."""

    names: tuple[str, ...]  # built-in name or path of each part
    parts: tuple[str, ...]  # their contents, decoded as UTF-8 from the exact bytes (no newline translation)
    sha256s: tuple[str, ...]

    @property
    def label(self) -> str:
        return " + ".join(self.names)

    @property
    def content(self) -> str:
        """The parts as one string (evaluation scores them as one text, as llama-perplexity one file)."""
        return "".join(self.parts)

    @property
    def key(self) -> str:
        """For cache keys: the sha256 of a single part (its file's sha256sum), else a hash of the parts'."""
        return self.sha256s[0] if len(self.sha256s) == 1 else hashlib.sha256(
            json.dumps(list(self.sha256s)).encode()).hexdigest()

    def records(self) -> list[dict]:
        """One {name, bytes, sha256} per part, in order: what plans and reports write down."""
        return [{"name": n, "bytes": len(t.encode("utf-8")), "sha256": h}
                for n, t, h in zip(self.names, self.parts, self.sha256s)]


def load_texts(texts: str | Path | TextSource | Sequence[str | Path] | None, default: str) -> TextSource:
    """``texts`` (files or built-in text names, joined in order; None or empty: the built-in ``default``)
    read and checked once, so a bad file fails at the start of a job rather than hours into it."""
    from quantmix.fixtures.text import NAMES, text_path

    if isinstance(texts, TextSource):
        return texts
    if texts is None or isinstance(texts, (str, Path)):
        texts = [texts if texts is not None else default]
    if not texts:
        texts = [default]
    names, parts, shas = [], [], []
    for t in texts:
        builtin = str(t) in NAMES and not Path(t).exists()
        p = text_path(str(t)) if builtin else Path(t)
        if p.is_dir():
            raise TextSourceError(f"{p}: a directory, not a text file")
        if not builtin and not p.is_file():
            raise TextSourceError(f"{p}: no such text file, and not a built-in text ({', '.join(NAMES)})")
        try:
            data = p.read_bytes()
            content = data.decode("utf-8")
        except OSError as e:
            raise TextSourceError(f"{t}: unreadable text file ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise TextSourceError(f"{t}: not UTF-8 text ({e})") from None
        if not content.strip():
            raise TextSourceError(f"{t}: the text file is empty")
        names.append(str(t))
        parts.append(content)
        shas.append(hashlib.sha256(data).hexdigest())
    return TextSource(tuple(names), tuple(parts), tuple(shas))


def model_label(model_dir: Path) -> str:
    """A short name for reports: the directory's name (a fixture's ``.../NAME/hf`` gives NAME)."""
    return model_dir.parent.name if model_dir.name == "hf" else model_dir.name


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _apply(model: torch.nn.Module, model_dir: Path, quant: QuantSource, device: torch.device,
           nextn: NextNHead | None = None) -> dict:
    """Quantize ``model`` (and its NextN layer) in place; returns the size fields and an identity hash of what
    was applied."""
    if quant.gguf is not None:
        from quantmix.evaluation.gguf_model import load_gguf_weights

        rep = load_gguf_weights(model, quant.gguf)
        if nextn is not None:
            load_gguf_weights(nextn.root, quant.gguf, partial=True)
        types = sorted(set(rep.types.values()))
        return {"size_bytes": rep.n_bytes, "n_elements": rep.n_elements, "bpw": rep.bpw,
                "types": ",".join(types), "quant_sha256": _file_sha256(quant.gguf), "type_map": rep.types}
    from quantmix.export.simulate import simulate_quantization
    from quantmix.model.catalog import catalog_from_config
    from quantmix.planning.recipe import resolve

    assert quant.spec is not None
    res = resolve(catalog_from_config(model_dir), quant.spec, imatrix_present=quant.imatrix is not None)
    simulate_quantization(model, res, imatrix=quant.imatrix, device=device)
    if nextn is not None:
        simulate_quantization(nextn.root, res, imatrix=quant.imatrix, device=device)
    n_el = sum(a.tensor.n_elements for a in res.assignments)
    ident = json.dumps({"types": res.types(), "imatrix": _file_sha256(quant.imatrix) if quant.imatrix else None},
                       sort_keys=True)
    return {"size_bytes": res.n_bytes, "n_elements": n_el, "bpw": 8.0 * res.n_bytes / n_el,
            "types": ",".join(sorted({a.qtype for a in res.assignments})),
            "quant_sha256": hashlib.sha256(ident.encode()).hexdigest(), "type_map": res.types()}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"quantmix eval: {msg}", file=sys.stderr, flush=True)


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_dir(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a Hugging Face model directory (no config.json)")
    return d


def evaluate(model_dir: str | Path, quant: QuantSource,
             text: str | Path | TextSource | Sequence[str | Path] | None = None, n_ctx: int = 512,
             max_chunks: int | None = None, all_positions: bool = False, precision: str = "float32",
             act_quant: str = "llama-cpu", device: str | torch.device | None = None, progress: bool = False,
             reference_cache: Path | None = None) -> EvalResult:
    """Evaluate ``quant`` against the float model in ``model_dir`` (a Hugging Face directory) on ``text``
    (a built-in text name, UTF-8 files joined in order, or a :class:`TextSource`; default wiki-eval), tokenized
    and chunked as llama-perplexity does.

    ``max_chunks``: None = the first DEFAULT_EVAL_TOKENS tokens (``32768 // n_ctx`` chunks); <= 0 = the whole
    text. ``all_positions``: score every position, not only each chunk's second half. ``precision``: how the
    reference hidden states are cached ("float32" exact, "float16" half size). ``act_quant``: "llama-cpu"
    (llama.cpp's 8-bit activations in quantized matmuls) or "none" (the weights' effect alone)."""
    from transformers import AutoTokenizer

    model_dir = _check_model_dir(model_dir)
    if max_chunks is None:
        max_chunks = max(DEFAULT_EVAL_TOKENS // n_ctx, 1)
    elif max_chunks <= 0:
        max_chunks = None
    src = load_texts(text, DEFAULT_TEXT)
    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        et = prepare_text(tok, src.content, n_ctx, max_chunks, all_positions, src.label)
    except ValueError as e:  # e.g. too short for llama-perplexity's two chunks: say which text
        raise TextSourceError(f"{src.label}: {e}") from None
    res = evaluate_tokens(model_dir, quant, et, precision, act_quant, device, progress, reference_cache)
    return EvalResult({**res.meta, "text_bytes": sum(r["bytes"] for r in src.records())}, res.stats, res.nextn)


@torch.no_grad()
def evaluate_tokens(model_dir: str | Path, quant: QuantSource, text: EvalText, precision: str = "float32",
                    act_quant: str = "llama-cpu", device: str | torch.device | None = None, progress: bool = False,
                    reference_cache: Path | None = None) -> EvalResult:
    """:func:`evaluate` on an already chunked text (any token ids the model's vocabulary holds)."""
    from quantmix.evaluation.llama_cpu import ACT_QUANT_MODES, llama_cpu_activations
    from quantmix.model.catalog import catalog_from_config
    from quantmix.model.checkpoint import load_float_model

    if act_quant not in ACT_QUANT_MODES:
        raise ValueError(f"act_quant {act_quant!r}: choose one of {', '.join(ACT_QUANT_MODES)}")
    t0 = time.time()
    model_dir = _check_model_dir(model_dir)
    dev = _device(device)
    et = text
    model = load_float_model(model_dir, dtype=torch.float32, device=dev)  # FP8 / MXFP4 checkpoints dequantized
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        with contextlib.suppress(ValueError):  # the reference with the same expert loop as the emulated run
            model.set_experts_implementation("eager")
    head = capture_head(model)
    nextn = load_nextn(model, model_dir, dev)
    nextn_ref = _nextn_reference(model, nextn, et) if nextn is not None else None
    _log(progress, f"reference: {et.n_chunks} chunks of {et.n_ctx} ({et.n_chunks * et.n_scored} scored tokens)")
    ref = reference_distributions(model, model_dir, et, precision, head, reference_cache,
                                  (lambda i, n: _log(progress, f"reference chunk {i}/{n}")) if progress else None)
    _log(progress, f"applying {quant.describe()}")
    applied = _apply(model, model_dir, quant, dev, nextn)
    type_map = applied.pop("type_map")
    acc = MetricsAccumulator()
    acc_nextn = MetricsAccumulator()
    with contextlib.ExitStack() as stack:
        mode = stack.enter_context(llama_cpu_activations(model, type_map)) if act_quant == "llama-cpu" else None
        if nextn is not None:
            if act_quant == "llama-cpu":
                stack.enter_context(llama_cpu_activations(nextn.root, type_map))
            finals = stack.enter_context(_final_hidden(model))
        for sc in iter_scored_logits(model, et.chunks, first=et.first):
            if nextn is not None and nextn_ref is not None:
                ids = et.chunks[sc.index:sc.index + 1].to(dev)
                q_h = nextn.hidden(finals.pop(), ids)[0, et.first:-1]
                acc_nextn.add(token_metrics(nextn_ref.head(nextn_ref.hidden[sc.index]),
                                            nextn.layer.shared_head.head(q_h).float().cpu(),
                                            et.chunks[sc.index, et.first + 2:]))
            if mode is not None and sc.index == 0 and mode.unseen():
                raise RuntimeError(f"llama.cpp activation emulation never saw the matmul of {mode.unseen()[0]} "
                                   f"({type(model).__name__} multiplies it without F.linear); use act_quant='none'")
            ref_logits = ref.logits(sc.index, head).cpu()
            acc.add(token_metrics(ref_logits, sc.logits, sc.targets))
            _log(progress, f"chunk {sc.index + 1}/{et.n_chunks}")
    stats = acc.summary()
    ref_el = catalog_from_config(model_dir).n_elements
    fp = ref.meta["model_sha256"]
    key = hashlib.sha256(json.dumps([fp, applied["quant_sha256"], et.tokens_sha256, et.first, precision,
                                     act_quant]).encode())
    meta = {
        "key": key.hexdigest()[:20],
        "model": model_label(model_dir),
        "model_sha256": fp[:16],
        "quant": quant.describe(),
        "kind": quant.kind,
        **{k: v for k, v in applied.items() if k != "quant_sha256"},
        "quant_sha256": applied["quant_sha256"][:16],
        "ref_size_bytes": ref_el * 4,
        "text": et.label,
        "text_sha256": et.text_sha256[:16],
        "n_ctx": et.n_ctx,
        "n_chunks": et.n_chunks,
        "scoring": "all-positions" if et.all_positions else "second-half",
        "reference_precision": precision,
        "act_quant": act_quant,
        "device": dev.type,
    }
    stats_nextn = acc_nextn.summary() if nextn is not None else None
    if stats_nextn is not None:
        meta["nextn"] = f"layer {nextn.layer_index}: KLD {stats_nextn.kld:.6f}, same top {stats_nextn.same_top_p:.3f}"
    _log(progress, f"done in {time.time() - t0:.0f} s")
    return EvalResult(meta, stats, stats_nextn)


@dataclass
class _NextNReference:
    """The float NextN head's inputs at every chunk's scored positions, and the float head to read them."""

    hidden: list[torch.Tensor]  # per chunk [n_scored - 1, hidden]
    head: HeadReplay


@contextlib.contextmanager
def _final_hidden(model: torch.nn.Module):  # noqa: ANN202 - a generator context
    """Collect the main model's final normalized hidden states [1, T, hidden] (all positions: the NextN
    layer's attention reads them all), one per forward pass."""
    seen: list[torch.Tensor] = []
    norm = model.get_decoder().norm  # type: ignore[operator]
    h = norm.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        yield seen
    finally:
        h.remove()


def _nextn_reference(model: torch.nn.Module, nextn: NextNHead, et: EvalText) -> _NextNReference:
    """Run the float model and its float NextN layer over every chunk (before quantization)."""
    dev = next(model.parameters()).device
    out = []
    with _final_hidden(model) as finals:
        for i in range(et.n_chunks):
            ids = et.chunks[i:i + 1].to(dev)
            model.get_decoder()(input_ids=ids, use_cache=False)  # type: ignore[operator]
            out.append(nextn.hidden(finals.pop(), ids)[0, et.first:-1].float().cpu())
    w = nextn.head_weight()
    return _NextNReference(out, HeadReplay(w.detach().clone(), None))
