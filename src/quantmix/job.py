"""The whole job, step by step: calibrate -> measure -> sensitivity -> optimize (+ refine) -> write GGUF ->
evaluate -> report. ``quantmix optimize`` and ``quantmix run`` are thin wrappers over these functions.

Each step caches what is slow (imatrix, error table entries, sensitivity probes, reference distributions) keyed
by its inputs, so a rerun after an interrupt redoes only what had not finished.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from quantmix.formats.ggml_backend import SLOW_ON_CPU
from quantmix.model.catalog import Catalog, catalog_from_gguf
from quantmix.paths import cache_dir, file_lock

if TYPE_CHECKING:
    import torch

    from quantmix.evaluation.evaluate import TextSource

__all__ = ["ModelInputs", "PlanOutcome", "resolve_model", "ensure_imatrix", "plan_recipe", "run_job",
           "CPU_CANDIDATES", "CALIB_TEXT", "check_text", "calib_chunks", "check_plan"]

# Candidate types when no GPU is present and none are asked for: the codebook IQ types need ggml's C quantizer
# (the llama.cpp build, ~6 minutes once) to be measured at a usable speed on a CPU, so they join only when asked
# (``candidates=("all",)``, ``--types all``); with CUDA every supported type is used. The 32-block types are
# there for rows that 256-blocks do not divide (llama.cpp's fallbacks).
CPU_CANDIDATES = ("Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
CALIB_TEXT = "wiki-calib"  # the built-in calibration text, unless the user gives files (--calib)


def _log(msg: str) -> None:
    print(f"quantmix: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelInputs:
    """The two forms of one model the job needs: the Hugging Face directory (runs for calibration,
    sensitivity and evaluation) and the float GGUF (the source the quantized GGUF is written from)."""

    name: str
    gguf: Path
    hf_dir: Path | None
    source: Path | None = None  # where tensors are read (error table, writer): the GGUF, or the HF directory

    @property
    def tensors(self) -> Path:
        return self.source if self.source is not None else self.gguf


def _f32_copy_fits(model_dir: Path) -> bool:
    """Whether the converter's F32 GGUF of ``model_dir`` takes under half the cache's free disk."""
    import shutil

    from quantmix.model.catalog import catalog_from_config

    need = 4 * catalog_from_config(model_dir).n_elements
    return need < shutil.disk_usage(cache_dir()).free // 2


def resolve_model(model: str | Path, hf: str | Path | None = None, f32_copy: bool | None = None) -> ModelInputs:
    """A fixture name, a float GGUF (with ``hf`` its Hugging Face directory) or a Hugging Face directory
    (converted once with llama.cpp's convert_hf_to_gguf.py, cached).

    ``f32_copy``: for a directory, whether the F32 conversion is written (True), or only its header, every
    tensor then read straight from the safetensors (False: ``gguf`` is the header, ``source`` the directory;
    the same bytes, no 4-bytes-per-weight copy on disk); default: the copy when it takes under half the free
    disk."""
    from quantmix.fixtures.store import get_fixture, registered_fixtures
    from quantmix.fixtures.tiny import TINY_CONFIGS, get_tiny

    p = Path(model)
    if not p.exists() and str(model) in registered_fixtures():
        fx = get_fixture(str(model))
        return ModelInputs(str(model), fx.gguf_f32, fx.hf_dir)
    if not p.exists() and str(model) in TINY_CONFIGS:  # a tiny model with its tokenizer: every step runs on it
        p = get_tiny(str(model), vocab=True)
    if p.is_file() and p.suffix == ".gguf":
        hd = Path(hf) if hf else None
        if hd is not None and not (hd / "config.json").is_file():
            raise FileNotFoundError(f"{hd}: not a Hugging Face model directory (no config.json)")
        return ModelInputs(p.name.removesuffix(".gguf"), p, hd)
    if p.is_dir() and (p / "config.json").is_file():
        from quantmix.evaluation.reference import model_fingerprint
        from quantmix.tools.llamacpp import llamacpp_source

        from quantmix.model.checkpoint import Checkpoint

        Checkpoint(p)  # shards present and whole (headers only), before any conversion or long work
        if f32_copy is None:
            f32_copy = _f32_copy_fits(p)
        if not f32_copy:
            from quantmix.model.hf_tensors import converted_metadata

            _log(f"reading {p} straight from its safetensors (no F32 GGUF copy; the converter writes the header "
                 f"only)")
            return ModelInputs(p.name, converted_metadata(p), p, p)

        fp = model_fingerprint(p)[:16]
        out = cache_dir() / "converted" / f"{p.name}-{fp}-f32.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)  # a fresh cache has no converted/ yet
        with file_lock(f"convert-{fp}"):
            if not out.exists():
                _log(f"converting {p} to a float GGUF with convert_hf_to_gguf.py (once)")
                tmp = out.with_suffix(".tmp.gguf")
                llamacpp_source().convert(p, tmp, "f32")
                tmp.replace(out)
        return ModelInputs(p.name, out, p)
    raise FileNotFoundError(f"{model}: not a built-in fixture, a float GGUF or a Hugging Face model directory")


def check_text(hf_dir: Path, text: TextSource, n_tokens: int) -> None:
    """Fail at once, naming the text, when it gives fewer than ``n_tokens`` tokens: otherwise a job would stop
    only when it reaches the step that reads it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    content = text.content
    n = len(tok(content[: max(4096, 8 * n_tokens)], add_special_tokens=False)["input_ids"])
    if n < n_tokens and len(content) > max(4096, 8 * n_tokens):
        n = len(tok(content, add_special_tokens=False)["input_ids"])
    if n < n_tokens:
        from quantmix.evaluation.evaluate import TextSourceError

        raise TextSourceError(f"{text.label}: the text gives {n} tokens, fewer than the {n_tokens} needed")


def calib_chunks(hf_dir: Path, text: TextSource, n_chunks: int, n_ctx: int = 512) -> torch.Tensor:
    """At most ``n_chunks`` calibration chunks of ``text`` (its files joined in order, as llama-imatrix reads
    them); a text too short for one chunk is named in the error."""
    from transformers import AutoTokenizer

    from quantmix.calibration.imatrix import calibration_tokens

    tok = AutoTokenizer.from_pretrained(hf_dir)
    try:
        return calibration_tokens(tok, list(text.parts), n_ctx, n_chunks)
    except ValueError as e:
        from quantmix.evaluation.evaluate import TextSourceError

        raise TextSourceError(f"{text.label}: {e}") from None


def ensure_imatrix(inputs: ModelInputs, chunks: int = 64, n_ctx: int = 512, progress: bool = True,
                   text: TextSource | None = None) -> Path:
    """quantmix's imatrix of the model on the calibration text (default wiki-calib), computed once per text."""
    from quantmix.calibration.imatrix import compute_imatrix_tokens
    from quantmix.calibration.imatrix_io import write_imatrix
    from quantmix.evaluation.evaluate import load_texts
    from quantmix.evaluation.reference import model_fingerprint

    if inputs.hf_dir is None:
        raise ValueError(f"{inputs.gguf}: computing an imatrix needs the Hugging Face model (--hf DIR), or give "
                         f"an existing one with --imatrix")
    text = load_texts(text, CALIB_TEXT)
    # text.key is the file's sha256 for a single file: wiki-calib keeps the key (and cache) it always had
    key = hashlib.sha256(json.dumps([model_fingerprint(inputs.hf_dir), text.key, chunks, n_ctx, 1]).encode()
                         ).hexdigest()[:20]
    out = cache_dir() / "imatrix" / f"{inputs.name}-{key}.imatrix.gguf"
    with file_lock(f"imatrix-{key}"):
        if not out.exists():
            _log(f"imatrix: {chunks} chunks of {n_ctx} tokens of {text.label}")
            ids = calib_chunks(inputs.hf_dir, text, chunks, n_ctx)
            im = compute_imatrix_tokens(inputs.hf_dir, ids, datasets=list(text.names), progress=progress,
                                        resume_dir=out.with_suffix(".state"))
            write_imatrix(im, out)
    return out


@dataclass
class PlanOutcome:
    plan: object  # quantmix.planning.solver.Plan
    costs: dict[str, dict[str, float]]  # what the solver minimized (predicted KLD, or proxy without sensitivity)
    sensitivity: object | None = None  # quantmix.measurement.sensitivity.Sensitivity
    refinement: object | None = None  # quantmix.planning.refine.RefineResult
    proxy_only: bool = False
    notes: list[str] = field(default_factory=list)  # what the user should know about how the plan was made
    calib_text: list[dict] | None = None  # the text sensitivity / refinement measured on (None: no text used)

    def plan_json(self, catalog: Catalog) -> dict:
        plan = self.plan
        return {
            "bytes": plan.n_bytes, "bpw": plan.bpw, "status": plan.status, "gap": plan.gap, "method": plan.method,
            "pools": [{"name": p.name, "capacity": p.capacity, "used": p.used, "left": p.left} for p in plan.pools],
            "predicted": ("proxy: importance-weighted relative error (no sensitivity fit)" if self.proxy_only
                          else "mean KLD on calibration tokens: sum of per-tensor coefficient x error"),
            "predicted_total": plan.objective,
            "refinement": self.refinement.summary() if self.refinement is not None else None,
            "notes": list(self.notes),
            "calibration_text": self.calib_text,
            "tensors": [{"name": t.name, "type": t.qtype, "bytes": t.n_bytes,
                         "predicted": None if t.fixed else self.costs.get(t.name, {}).get(t.qtype)}
                        for t in plan.tensors],
        }


@dataclass
class Measured:
    """Everything measured once per model and reused for every target."""

    inputs: ModelInputs
    catalog: Catalog
    imatrix: Path | None
    table: object  # ErrorTable
    sensitivity: object | None
    probe: object | None = None
    check_probe: object | None = None
    notes: list[str] = field(default_factory=list)
    calib: TextSource | None = None  # the calibration text of the probes (sensitivity and refinement)
    dtype: str = "float32"  # the probes' compute dtype


def _on_cpu(device: str | None) -> bool:
    import torch

    return str(device) == "cpu" or (device is None and not torch.cuda.is_available())


def _candidates(candidates: Sequence[str] | None, device: str | None) -> tuple[str, ...] | None:
    """The error table's candidate types: ``all`` -> None (every type with numerics); none given -> the CPU set
    on a CPU, every type on CUDA."""
    if candidates is not None and [c.lower() for c in candidates] == ["all"]:
        return None
    if candidates is None and _on_cpu(device):
        return CPU_CANDIDATES
    return tuple(candidates) if candidates is not None else None


def check_plan(catalog: Catalog, budget: object, constraints: object, candidates: Sequence[str] | None,
               device: str | None) -> None:
    """:func:`quantmix.planning.solver.check_before_measuring` with the candidates :func:`measure` would use."""
    from quantmix.measurement.error_table import FLOAT_TYPES, supported_types
    from quantmix.planning.solver import check_before_measuring

    cands = _candidates(candidates, device)
    if cands is None:
        cands = tuple(q for q in supported_types() if q not in FLOAT_TYPES)
    check_before_measuring(catalog, budget, constraints, cands)


def measure(inputs: ModelInputs, imatrix: Path | None, candidates: tuple[str, ...] | None, *,
            profile: str | None = "full", device: str | None = None, progress: bool = True,
            calib: TextSource | None = None, sensitivity_chunks: int | None = None,
            dtype: str = "float32") -> Measured:
    """Error table, then (with the Hugging Face model and a profile) the sensitivity fit on ``calib``
    (default wiki-calib), which refinement's probes then use too. ``sensitivity_chunks``: calibration chunks of
    512 tokens the probes run on (default: the profile's)."""
    from quantmix.evaluation.evaluate import load_texts
    from quantmix.measurement.distributed import in_group, leave_group, sharded_error_table
    from quantmix.measurement.sensitivity import fit_sensitivity

    cat = catalog_from_gguf(inputs.gguf)
    on_cpu = _on_cpu(device)
    candidates = _candidates(candidates, device)
    if on_cpu:
        from quantmix.formats.ggml_backend import built

        if built():  # libggml-base, built once (~12 s) when missing
            _log("on a CPU the k-quants, Q4_0-Q8_0 and the codebook IQ types are measured with ggml's own "
                 "quantizer (same bytes, 4-10x faster than the torch numerics)")
        elif candidates is None or SLOW_ON_CPU.intersection(c.upper() for c in candidates):
            _log("warning: without ggml's quantizer the codebook IQ types take hours on a CPU (torch numerics)")
    t0 = time.time()
    table = sharded_error_table(inputs.tensors, imatrix, candidates=list(candidates) if candidates else None,
                                device=device, progress=progress)  # one process: error_table itself
    _log(f"error table: {len(table.rows)} (tensor, type) errors ({len(table.rows) - table.computed} from the cache, "
         f"{table.computed} measured) in {time.time() - t0:.0f} s")
    m = Measured(inputs, cat, imatrix, table, None, dtype=dtype)
    if in_group() and not leave_group():  # torchrun: the other ranks' part ends with the table
        return m
    if not table.bias:
        m.notes.append(table.bias_note)
    if profile and inputs.hf_dir is not None:
        m.calib = load_texts(calib, CALIB_TEXT)  # only read (built, for wiki-calib) when a probe uses it
        classes = {t.name: t.tensor_class for t in cat}
        sens = fit_sensitivity(inputs.hf_dir, table.to_costs(), classes, imatrix, profile=profile, device=device,
                               progress=progress, text=m.calib, chunks=sensitivity_chunks,
                               dtype=_dtype(dtype))
        _log(f"sensitivity ({profile}): {len(sens.probe_kld)} probes on {sens.n_tokens} calibration tokens, "
             f"{sens.forward_tokens:,} forward-pass tokens, {sens.seconds:.0f} s; {sens.check_summary()}")
        m.sensitivity = sens
    elif profile:
        m.notes.append("no Hugging Face model: the plan minimizes the proxy error (no sensitivity fit)")
    return m


def _probe(m: Measured, ids: torch.Tensor, device: str | None, cache_bytes: int) -> object:
    from quantmix.measurement.kld_probe import KLDProbe

    return KLDProbe(m.inputs.hf_dir, ids, m.imatrix, device, image_cache_bytes=cache_bytes,
                    dtype=_dtype(m.dtype))


def _dtype(name: str) -> object:
    from quantmix.model.engine import compute_dtype

    return compute_dtype(name)


def plan_recipe(m: Measured, budget: object, constraints: object = None, *, refine_time: float = 0.0,
                method: str = "ilp", time_limit: float = 60.0, device: str | None = None, seed: int = 0,
                progress: bool = True, refine_moves: int | None = None) -> PlanOutcome:
    """The exact knapsack plan on predicted KLD (proxy error without a sensitivity fit), then refinement
    against measured KLD (needs the Hugging Face model): ``refine_moves`` moves (None: no move budget), within
    ``refine_time`` seconds as an outer bound (0: no refinement)."""
    from quantmix.planning.constraints import Constraints
    from quantmix.planning.refine import refine
    from quantmix.planning.solver import optimize

    if constraints is None:
        constraints = Constraints(imatrix=m.imatrix is not None)
    proxy = m.table.to_costs()
    costs = m.sensitivity.scaled_costs(proxy) if m.sensitivity is not None else proxy
    plan = optimize(m.catalog, costs, budget, constraints, method=method, time_limit=time_limit)
    out = PlanOutcome(plan, costs, m.sensitivity, None, m.sensitivity is None)
    if m.sensitivity is not None:
        out.calib_text = m.sensitivity.text or (m.calib.records() if m.calib is not None else None)
    if refine_time > 0 and (refine_moves is None or refine_moves > 0) and m.sensitivity is not None \
            and m.sensitivity.profile != "large":
        if m.probe is None:
            if m.calib is None:
                from quantmix.evaluation.evaluate import load_texts

                m.calib = load_texts(None, CALIB_TEXT)
            ids = calib_chunks(m.inputs.hf_dir, m.calib, 12)
            m.probe = _probe(m, ids[:4], device, 4 << 30)  # the sensitivity fit's own tokens
            # winners are confirmed on other, more tokens, when the calibration text has them
            m.check_probe = _probe(m, ids[4:], device, 1 << 30) if len(ids) > 4 else None
        if m.check_probe is None:
            out.notes.append(f"calibration text {m.calib.label} gives {len(m.probe.chunks)} chunks of 512 tokens: "
                             f"none left to confirm refinement's winner on other tokens")
        from quantmix.paths import cache_dir

        out.refinement = refine(plan, costs, m.probe, constraints, time_limit=refine_time, seed=seed,
                                max_moves=refine_moves, check_probe=m.check_probe, progress=progress,
                                state_dir=cache_dir() / "refine")
        out.plan = out.refinement.plan
    return out


def write_plan(outcome: PlanOutcome, catalog: Catalog, recipe_path: Path) -> dict[str, Path]:
    """Recipe (llama-quantize tensor-type file), its ik_llama.cpp --custom-q form, and the JSON plan."""
    from quantmix.planning.recipe import atomic_write_text, custom_q_text

    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    outcome.plan.write_recipe(recipe_path)
    ik = recipe_path.with_suffix(recipe_path.suffix + ".ik")
    atomic_write_text(ik, custom_q_text(outcome.plan.resolution()) + "\n")
    pj = recipe_path.with_suffix(".plan.json")
    atomic_write_text(pj, json.dumps(outcome.plan_json(catalog), indent=1) + "\n")
    return {"recipe": recipe_path, "ik": ik, "plan": pj}


def write_sensitivity_report(sens: object, out_dir: Path, model_name: str) -> dict[str, Path]:
    """sensitivity.png (layer x tensor class heatmap), sensitivity.md (per class, per layer, top cells) and
    sensitivity.json (the coefficients) in ``out_dir``: what ExLlamaV3's measure -l2/-l3 tells quant makers."""
    from quantmix.planning.recipe import atomic_write_text
    from quantmix.reports.heatmap import render_sensitivity_table, write_sensitivity_heatmap

    out_dir.mkdir(parents=True, exist_ok=True)
    cells = sens.by_layer_class(sens.probe_kld)
    png = write_sensitivity_heatmap(cells, out_dir / "sensitivity.png",
                                    f"{model_name}: KLD caused by each tensor alone at {sens.probe_type}")
    md = out_dir / "sensitivity.md"
    atomic_write_text(md, (
        f"# Sensitivity of {model_name}\n\nMean KLD on calibration tokens when one tensor alone is quantized to "
        f"{sens.probe_type} ({sens.profile} profile, {sens.n_tokens} tokens, {sens.forward_tokens:,} forward-pass "
        f"tokens, {sens.seconds:.0f} s; tensors whose rows {sens.probe_type}'s block does not divide are probed at "
        f"the median-cost type that fits).\n\n" + render_sensitivity_table(cells) + f"\n\n{sens.check_summary()}\n"))
    js = sens.save(out_dir / "sensitivity.json")
    return {"png": png, "md": md, "json": js}


def run_job(model: str | Path, targets: list[float], out_dir: str | Path, *, hf: str | Path | None = None,
            imatrix: str | Path | None = None, profile: str = "full", refine_time: float = 300.0,
            refine_moves: int | None = 16,
            candidates: tuple[str, ...] | None = None, stock: tuple[str, ...] | None = None,
            eval_chunks: int = 8, device: str | None = None, seed: int = 0, progress: bool = True,
            calib: TextSource | Sequence[str | Path] | None = None,
            eval_text: TextSource | Sequence[str | Path] | None = None, f32_copy: bool | None = None,
            dtype: str = "float32") -> Path:
    """Calibrate, measure, optimize each BPW target, write each GGUF, evaluate each (and llama.cpp's stock mixes
    for comparison) on held-out text, and write the report folder; returns its README.md. ``calib``: the text
    of the imatrix, sensitivity and refinement (default wiki-calib); ``eval_text``: the held-out text (default
    wiki-eval); files joined in order, or built-in text names."""
    from quantmix.evaluation.evaluate import DEFAULT_TEXT, evaluate, gguf_source, load_texts
    from quantmix.evaluation.runs import append_run, load_runs
    from quantmix.export.gguf_writer import quantize_gguf
    from quantmix.planning.baselines import stock_resolution
    from quantmix.planning.budget import Budget
    from quantmix.planning.constraints import Constraints
    from quantmix.planning.recipe import atomic_write_text, write_recipe
    from quantmix.reports.eval_table import render_eval_table
    from quantmix.reports.model_card import render_model_card
    from quantmix.reports.pareto import write_pareto_plot

    t_start = time.time()
    out = Path(out_dir)
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    (out / "gguf").mkdir(parents=True, exist_ok=True)
    inputs = resolve_model(model, hf, f32_copy)
    if inputs.hf_dir is None:
        raise ValueError(f"{model}: quantmix run evaluates against the Hugging Face model; give it with --hf DIR")
    calib, eval_text = load_texts(calib, CALIB_TEXT), load_texts(eval_text, DEFAULT_TEXT)
    check_text(inputs.hf_dir, calib, 512)  # one calibration chunk
    check_text(inputs.hf_dir, eval_text, 1024)  # llama-perplexity's two chunks of 512
    cat0 = catalog_from_gguf(inputs.gguf)  # stock mixes checked before the long work starts
    pool = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
    stock_res = {f: stock_resolution(cat0, f, imatrix_present=True) for f in (stock or pool)}
    if stock is None:  # the stock mix nearest each target in size
        bpw_of = {f: 8.0 * r.n_bytes / cat0.n_elements for f, r in stock_res.items()}
        stock = tuple(dict.fromkeys(min(pool, key=lambda f: abs(bpw_of[f] - t)) for t in targets))
    im = Path(imatrix) if imatrix else ensure_imatrix(inputs, progress=progress, text=calib)
    m = measure(inputs, im, candidates, profile=profile, device=device, progress=progress, calib=calib,
                dtype=dtype)
    runs = out / "runs.jsonl"
    recipes: dict[str, str] = {}
    summaries = []
    for bpw in targets:
        label = f"quantmix-{bpw:g}bpw"
        budget = Budget.of_bpw(m.catalog, bpw)
        oc = plan_recipe(m, budget, Constraints(imatrix=True), refine_time=refine_time, refine_moves=refine_moves,
                         device=device, seed=seed,
                         progress=progress)
        files = write_plan(oc, m.catalog, out / "recipes" / f"{label}.txt")
        recipes[label] = f"recipes/{label}.txt"
        summaries.append(f"{label}: {oc.plan.summary().splitlines()[0]}"
                         + (f"\n  {oc.refinement.summary()}" if oc.refinement else ""))
        _log(summaries[-1])
        g = out / "gguf" / f"{inputs.name}-{label}.gguf"
        quantize_gguf(inputs.tensors, oc.plan.resolution(), g, imatrix=im, device=device, progress=progress)
        res = evaluate(inputs.hf_dir, gguf_source(g, label=label), eval_text, max_chunks=eval_chunks,
                       device=device, progress=False)
        append_run(runs, res.row() | {"family": "quantmix", "predicted_kld": oc.plan.objective,
                                      "recipe": files["recipe"].name})
        _log(f"{label}: KLD {res.stats.kld:.5f} (predicted {oc.plan.objective:.5f}), PPL {res.stats.ppl_q:.3f}")
    for ftype in stock:
        res_stock = stock_res[ftype]
        write_recipe(res_stock, out / "recipes" / f"stock-{ftype}.txt", "llama")
        g = out / "gguf" / f"{inputs.name}-{ftype}.gguf"
        quantize_gguf(inputs.tensors, res_stock, g, imatrix=im, device=device, progress=progress)
        res = evaluate(inputs.hf_dir, gguf_source(g, label=ftype), eval_text, max_chunks=eval_chunks,
                       device=device, progress=False)
        append_run(runs, res.row() | {"family": "stock"})
        _log(f"stock {ftype}: {res.meta['bpw']:.3f} BPW, KLD {res.stats.kld:.5f}, PPL {res.stats.ppl_q:.3f}")
    rows = load_runs(runs)
    write_pareto_plot(rows, out / "pareto.png", f"{inputs.name}: quantmix vs llama.cpp stock mixes")
    plots = ["pareto.png"]
    if m.sensitivity is not None:
        write_sensitivity_report(m.sensitivity, out, inputs.name)
        plots.append("sensitivity.png")
    notes = "\n".join([f"- {s}" for s in summaries] + [f"- {n}" for n in m.notes]
                      + [f"- total time {time.time() - t_start:.0f} s"])
    reproduce = (f"quantmix run {model} --targets {','.join(f'{t:g}' for t in targets)} --profile {profile} "
                 f"--refine-moves {refine_moves or 0} --refine-time {refine_time:g} --eval-chunks {eval_chunks}"
                 + (f" --calib {' '.join(calib.names)}" if calib.names != (CALIB_TEXT,) else "")
                 + (f" --eval-text {' '.join(eval_text.names)}" if eval_text.names != (DEFAULT_TEXT,) else ""))
    refines = refine_time > 0 and (refine_moves is None or refine_moves > 0) and profile != "large"
    uses = ([] if imatrix else ["imatrix"]) + ["sensitivity"] + (["refinement"] if refines else [])
    texts = {f"calibration ({', '.join(uses)})": calib.records(), "evaluation (held out)": eval_text.records()}
    card = render_model_card(inputs.name, rows, recipes, plots, reproduce, notes, imatrix=str(im.name),
                             source_gguf=inputs.gguf.name, texts=texts)
    readme = out / "README.md"
    atomic_write_text(readme, card)
    atomic_write_text(out / "results.md", render_eval_table(rows) + "\n")
    return readme
