"""``quantmix eval``: a quantized model against its float reference, on real text, every standard metric.

One call, on the streaming engine (:mod:`quantmix.model.engine`: one decoder layer loaded at a time, so any
model that fits the disk can be evaluated): get the cached reference distributions (a float32 pass on first
use, :mod:`quantmix.evaluation.reference`), keep the reference output head aside, then run the quantized
model, each layer quantized as it is loaded (a recipe through
:func:`quantmix.export.simulate.simulate_quantization`, or a GGUF file's dequantized weights through
:class:`quantmix.evaluation.gguf_model.GGUFWeights`), and compare the two distributions token by token
(:mod:`quantmix.evaluation.kld`).

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from quantmix.evaluation.kld import KLDStats, MetricsAccumulator, token_metrics
from quantmix.evaluation.nextn import NextNHead, load_nextn
from quantmix.evaluation.perplexity import ScoredChunk
from quantmix.evaluation.reference import (
    EvalText,
    HeadReplay,
    capture_head,
    prepare_text,
    reference_distributions,
)
from quantmix.measurement.kld_probe import tensor_layer
from quantmix.model.engine import Batches, LayerEngine, chunk_rows
from quantmix.planning.recipe import RecipeSpec

__all__ = ["DEFAULT_EVAL_TOKENS", "DEFAULT_TEXT", "QuantSource", "EvalResult", "TextSource", "TextSourceError",
           "load_texts", "recipe_source", "gguf_source", "model_label", "evaluate", "evaluate_tokens"]

DEFAULT_EVAL_TOKENS = 32768
DEFAULT_TEXT = "wiki-eval"


@dataclass(frozen=True)
class QuantSource:
    """What is evaluated: a recipe applied in torch (``spec``, optional ``imatrix``), a GGUF file, or an EXL3
    directory (run by exllamav3)."""

    spec: RecipeSpec | None = None
    gguf: Path | None = None
    imatrix: Path | None = None
    label: str = ""
    exl3: Path | None = None

    @property
    def kind(self) -> str:
        return "gguf" if self.gguf is not None else "exl3" if self.exl3 is not None else "recipe"

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.gguf is not None:
            return self.gguf.name.removesuffix(".gguf")
        if self.exl3 is not None:
            return self.exl3.name
        assert self.spec is not None
        return self.spec.describe() + (" + imatrix" if self.imatrix else "")


def recipe_source(spec: RecipeSpec, imatrix: str | Path | None = None, label: str = "") -> QuantSource:
    return QuantSource(spec=spec, imatrix=Path(imatrix) if imatrix else None, label=label)


def exl3_source(path: str | Path, label: str = "") -> QuantSource:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: not an EXL3 model directory (no config.json)")
    return QuantSource(exl3=p, label=label)


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
    from quantmix.model.fingerprint import file_sha256

    return file_sha256(p)


class _Quantizer:
    """Writes ``quant`` into the engine's model a part at a time (the tensors outside the layers, then each
    layer as it is loaded) and into the NextN layer; knows the size fields and the tensor types."""

    def __init__(self, engine: LayerEngine, model_dir: Path, quant: QuantSource, device: torch.device,
                 nextn: NextNHead | None) -> None:
        self.engine = engine
        self.device = device
        self.quant = quant
        self._gguf = None
        self._res = None
        if quant.gguf is not None:
            from quantmix.evaluation.gguf_model import GGUFWeights, load_gguf_weights

            self._gguf = GGUFWeights(engine.model, quant.gguf, targets=engine.targets)
            rep = self._gguf.report
            if nextn is not None:
                load_gguf_weights(nextn.root, quant.gguf, partial=True)
            self.type_map = dict(rep.types)
            self.applied = {"size_bytes": rep.n_bytes, "n_elements": rep.n_elements, "bpw": rep.bpw,
                            "types": ",".join(sorted(set(rep.types.values()))),
                            "quant_sha256": _file_sha256(quant.gguf)}
            return
        from quantmix.export.simulate import simulate_quantization
        from quantmix.model.catalog import catalog_from_config
        from quantmix.planning.recipe import resolve

        assert quant.spec is not None
        self._res = res = resolve(catalog_from_config(model_dir), quant.spec, imatrix_present=quant.imatrix is not None)
        self._imatrix = None
        if quant.imatrix is not None:
            from quantmix.calibration.imatrix_io import read_imatrix

            self._imatrix = read_imatrix(quant.imatrix)
        if nextn is not None:
            simulate_quantization(nextn.root, res, imatrix=self._imatrix, device=device)
        n_el = sum(a.tensor.n_elements for a in res.assignments)
        ident = json.dumps({"types": res.types(), "imatrix": _file_sha256(quant.imatrix) if quant.imatrix else None},
                           sort_keys=True)
        self.type_map = res.types()
        self.applied = {"size_bytes": res.n_bytes, "n_elements": n_el, "bpw": 8.0 * res.n_bytes / n_el,
                        "types": ",".join(sorted({a.qtype for a in res.assignments})),
                        "quant_sha256": hashlib.sha256(ident.encode()).hexdigest()}

    def names(self, layer: int) -> list[str]:
        """The model's GGUF tensors of decoder layer ``layer`` (-1: those outside the layers)."""
        return [n for n in self.engine.targets if tensor_layer(n) == layer]

    def apply(self, names: list[str]) -> None:
        if self._gguf is not None:
            self._gguf.apply(self.engine.model, names)
        else:
            from quantmix.export.simulate import simulate_quantization

            simulate_quantization(self.engine.model, self._res, imatrix=self._imatrix, device=self.device,
                                  only=set(names), targets=self.engine.targets)

    def types_of(self, names: list[str]) -> dict[str, str]:
        return {n: self.type_map[n] for n in names if n in self.type_map}


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
                    reference_cache: Path | None = None, *, resident_bytes: int | None = None,
                    batch_tokens: int = 2048) -> EvalResult:
    """:func:`evaluate` on an already chunked text (any token ids the model's vocabulary holds).

    Both passes run on the streaming engine (:class:`~quantmix.model.engine.LayerEngine`): the float pass only
    when the reference is not cached yet (or the model has a NextN layer), the quantized pass with each layer's
    tensors quantized as the layer is loaded. ``resident_bytes``: the engine's budget for keeping layers
    loaded (0: read every layer on every pass)."""
    from quantmix.evaluation.llama_cpu import ACT_QUANT_MODES
    from quantmix.model.catalog import catalog_from_config
    from quantmix.model.engine import LayerEngine

    if act_quant not in ACT_QUANT_MODES:
        raise ValueError(f"act_quant {act_quant!r}: choose one of {', '.join(ACT_QUANT_MODES)}")
    t0 = time.time()
    model_dir = _check_model_dir(model_dir)
    dev = _device(device)
    et = text
    if quant.exl3 is not None:  # a bad directory or no GPU: said before the reference pass, not after it
        from quantmix.evaluation.exl3_logits import check_exl3

        exl3_fields = check_exl3(quant.exl3, dev)
    with LayerEngine(model_dir, dev, torch.float32, resident_bytes=resident_bytes) as engine:
        model = engine.model
        if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
            with contextlib.suppress(ValueError):  # the reference with the same expert loop as the emulated run
                model.set_experts_implementation("eager")
        head = capture_head(model)
        batches = engine.batches(et.chunks, batch_tokens)
        rows = chunk_rows(batches)
        float_final: list[torch.Tensor] = []

        def float_pass() -> list[torch.Tensor]:
            if not float_final:
                float_final.extend(engine.forward_hidden(batches, progress, "reference"))
            return float_final

        def scored() -> Iterator[ScoredChunk]:
            final = float_pass()
            for c, (j, r) in enumerate(rows):
                normed = engine.final_norm(final[j][r, et.first:-1])
                logits = engine.logits(final[j][r, et.first:-1]).cpu()
                yield ScoredChunk(c, logits, et.chunks[c, et.first + 1:].clone(), normed.float().cpu())

        nextn = load_nextn(model, model_dir, dev)
        _log(progress, f"reference: {et.n_chunks} chunks of {et.n_ctx} ({et.n_chunks * et.n_scored} scored tokens)")
        ref = reference_distributions(model, model_dir, et, precision, head, reference_cache,
                                      (lambda i, n: _log(progress, f"reference chunk {i}/{n}")) if progress else None,
                                      scored=scored)
        nextn_ref = None
        if nextn is not None:
            nextn_ref = _nextn_reference(engine, nextn, et, float_pass(), rows)
        float_final.clear()
        acc = MetricsAccumulator()
        acc_nextn = MetricsAccumulator()
        if quant.exl3 is not None:  # the quantized side runs in exllamav3; the reference stays ours
            from quantmix.evaluation.exl3_logits import Exl3Logits

            _log(progress, f"loading {quant.describe()} in exllamav3")
            x = Exl3Logits(quant.exl3, dev)
            try:
                for c in range(et.n_chunks):
                    q_logits = x.logits(et.chunks[c:c + 1])[0, et.first:-1].cpu()  # exllamav3 reads ids on the host
                    acc.add(token_metrics(ref.logits(c, head).cpu(), q_logits, et.chunks[c, et.first + 1:]))
            finally:
                x.close()
            applied = exl3_fields
            nextn = None  # exllamav3 does not run the NextN head for scoring
        else:
            _log(progress, f"applying {quant.describe()}")
            qz = _Quantizer(engine, model_dir, quant, dev, nextn)
            final = _quantized_pass(engine, batches, qz, act_quant, progress)
            with _head_numerics(engine, qz, act_quant):
                for c, (j, r) in enumerate(rows):
                    q_logits = engine.logits(final[j][r, et.first:-1]).cpu()
                    acc.add(token_metrics(ref.logits(c, head).cpu(), q_logits, et.chunks[c, et.first + 1:]))
            applied = qz.applied
        if nextn is not None and nextn_ref is not None:
            with contextlib.ExitStack() as stack:
                if act_quant == "llama-cpu":
                    from quantmix.evaluation.llama_cpu import llama_cpu_activations

                    stack.enter_context(llama_cpu_activations(nextn.root, qz.type_map))
                for c, (j, r) in enumerate(rows):
                    ids = et.chunks[c:c + 1].to(dev)
                    q_h = nextn.hidden(engine.final_norm(final[j][r:r + 1]), ids)[0, et.first:-1]
                    acc_nextn.add(token_metrics(nextn_ref.head(nextn_ref.hidden[c]),
                                                nextn.layer.shared_head.head(q_h).float().cpu(),
                                                et.chunks[c, et.first + 2:]))
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
        "act_quant": act_quant if quant.exl3 is None else "exllamav3",
        "device": dev.type,
    }
    stats_nextn = acc_nextn.summary() if nextn is not None else None
    if stats_nextn is not None:
        meta["nextn"] = f"layer {nextn.layer_index}: KLD {stats_nextn.kld:.6f}, same top {stats_nextn.same_top_p:.3f}"
    _log(progress, f"done in {time.time() - t0:.0f} s")
    return EvalResult(meta, stats, stats_nextn)


def _layer_numerics(engine: LayerEngine, qz: _Quantizer, names: list[str], act_quant: str):  # noqa: ANN202
    """llama.cpp's activation rounding for ``names``' matmuls (a no-op context with act_quant 'none')."""
    if act_quant != "llama-cpu":
        return contextlib.nullcontext(None)
    from quantmix.evaluation.llama_cpu import llama_cpu_activations

    return llama_cpu_activations(engine.model, qz.types_of(names), engine.targets)


def _head_numerics(engine: LayerEngine, qz: _Quantizer, act_quant: str):  # noqa: ANN202
    """The numerics of the output head's matmul (output.weight, or the tied token_embd)."""
    head_w = engine.model.get_output_embeddings().weight
    names = [n for n in qz.names(-1) if engine.parameter(engine.targets[n].param) is head_w]
    return _layer_numerics(engine, qz, names, act_quant)


@torch.no_grad()
def _quantized_pass(engine: LayerEngine, batches: Batches, qz: _Quantizer, act_quant: str,
                    progress: bool) -> list[torch.Tensor]:
    """The last layer's output of every batch with the quantization applied: outside tensors first (the
    embedding), then each layer's as it is loaded, each layer run under llama.cpp's activation numerics."""
    from tqdm import tqdm

    qz.apply(qz.names(-1))
    store = engine.store(on_device=engine.hidden_fits_device(batches))
    for j, h in enumerate(engine.embed(batches, recompute=True)):
        store[j] = h
    for i in tqdm(range(engine.n_layer), desc="eval", unit="layer", disable=not progress, file=sys.stderr):
        names = qz.names(i)
        with engine.layer(i):
            qz.apply(names)
            with _layer_numerics(engine, qz, names, act_quant) as mode:
                for j in range(len(batches)):
                    store[j] = engine.run(i, store[j], batches, j)
                    if mode is not None and j == 0 and mode.unseen():
                        raise RuntimeError(f"llama.cpp activation emulation never saw the matmul of "
                                           f"{mode.unseen()[0]} ({type(engine.model).__name__} multiplies it "
                                           f"without F.linear); use act_quant='none'")
            if engine.is_resident(i):  # the resident copy holds quantized weights now: read it again next time
                engine.evict(i)
    out = [store[j] for j in range(len(batches))]
    store.clear()
    return out


@dataclass
class _NextNReference:
    """The float NextN head's inputs at every chunk's scored positions, and the float head to read them."""

    hidden: list[torch.Tensor]  # per chunk [n_scored - 1, hidden]
    head: HeadReplay


def _nextn_reference(engine: LayerEngine, nextn: NextNHead, et: EvalText, final: list[torch.Tensor],
                     rows: list[tuple[int, int]]) -> _NextNReference:
    """The float NextN layer over every chunk, from the float model's last-layer outputs ``final``."""
    dev = engine.device
    out = []
    for c, (j, r) in enumerate(rows):
        ids = et.chunks[c:c + 1].to(dev)
        out.append(nextn.hidden(engine.final_norm(final[j][r:r + 1]), ids)[0, et.first:-1].float().cpu())
    w = nextn.head_weight()
    return _NextNReference(out, HeadReplay(w.detach().clone(), None))
