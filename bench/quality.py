"""Benchmark: quantmix's recipes against llama.cpp's stock mixes at the same file size, judged by llama.cpp.

Issue 5, item 8. For each fixture (``smollm2-768``, ``smollm2-moe``) and each stock mix (Q2_K ... Q5_K_M):

1. the real ``llama-quantize --imatrix IM SRC OUT FTYPE`` writes the stock GGUF (same imatrix as quantmix);
   its tensor-data size is read from the file and checked against quantmix's resolver
   (:func:`quantmix.planning.baselines.stock_resolution`);
2. quantmix plans to exactly that size (:func:`quantmix.job.plan_recipe`: knapsack on predicted KLD, then
   refinement against measured KLD on calibration tokens) and writes its GGUF; the proxy-only Lagrangian
   allocator of llama.cpp's target-bpw proposal (:func:`quantmix.planning.baselines.lagrangian_allocation`)
   gets the same budget;
3. ``llama-perplexity --kl-divergence`` on held-out text (``wiki-eval``; the calibration text is ``wiki-calib``)
   judges every file against the float GGUF.

``--random-recipes N`` also writes N seeded random recipes (every tensor a random admissible type, sizes spread
from about 3 to 8 BPW) and compares the sensitivity model's predicted KLD with llama-perplexity's measured KLD
(Spearman rank correlation).

GGUFs, plans and KLD results live under ``--work`` (default ``~/.cache/quantmix/bench-quality``), named by a
short hash of their inputs (source GGUF, imatrix, recipe types), so an interrupted run resumes: files already
written and KLDs already measured are reused. The tables go to ``--out`` (default ``bench/results``):
``quality-<model>.md`` and ``quality-<model>.json``. Progress goes to stderr.

    .venv/bin/python bench/quality.py --quick                  # smoke: smollm2-768, 3 mixes, 8 chunks, 5 random
    .venv/bin/python bench/quality.py                          # both fixtures, 6 mixes, 32 chunks, 20 random
    .venv/bin/python bench/quality.py --model smollm2-moe --ftypes Q3_K_M,Q4_K_M

llama-perplexity runs with flash attention off by default (``--fa on`` to change): on the CPU its flash-attention
path accumulates V in F16, a quantization-independent error that adds to every KLD (see tests/test_eval.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantmix.job import Measured, ensure_imatrix, measure, plan_recipe, resolve_model
from quantmix.model.catalog import Catalog
from quantmix.paths import cache_dir
from quantmix.planning.baselines import BENCH_FTYPES, lagrangian_allocation, stock_resolution
from quantmix.planning.budget import Budget
from quantmix.planning.constraints import Constraints, tensor_candidates
from quantmix.planning.recipe import RecipeSpec, Resolution, Rule, atomic_write_text, resolve

FIXTURES = ("smollm2-768", "smollm2-moe")
QUICK_FTYPES = ("Q2_K", "Q3_K_M", "Q4_K_M")
KEY_VERSION = 1  # bump when what a cached GGUF / plan / KLD depends on changes
_T0 = time.time()


def log(msg: str) -> None:
    print(f"[quality {time.time() - _T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ hashing


def file_sha(path: Path) -> str:
    from quantmix.model.fingerprint import file_sha256

    return file_sha256(path)  # remembered per file version: a rerun does not read the GGUFs again


def short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps([KEY_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:12]


def types_hash(types: dict[str, str]) -> str:
    return short_hash(sorted(types.items()))


# ------------------------------------------------------------------------------------------------ recipes


def resolution_of(catalog: Catalog, types: dict[str, str], label: str) -> Resolution:
    """An explicit recipe (one anchored rule per quantizable tensor) through the one resolver; the result must
    keep every type (no shape fallback), or the recipe is not what was asked for."""
    rules = [Rule("^" + re.escape(n) + "$", q, label) for n, q in types.items()]
    res = resolve(catalog, RecipeSpec(ftype=None, rules=rules, label=label), imatrix_present=True)
    got = res.types()
    bad = [f"{n}: {q} -> {got.get(n)}" for n, q in types.items() if got.get(n) != q]
    if bad:
        raise RuntimeError(f"{label}: the resolver changed {len(bad)} tensor types (first: {bad[0]})")
    return res


def quantized_types(res: Resolution) -> dict[str, str]:
    """Types of the tensors a recipe quantizes (norms and other untouched tensors left out)."""
    return {a.tensor.name: a.qtype for a in res.assignments if a.tensor.quantizable}


def random_recipes(catalog: Catalog, costs: dict[str, dict[str, float]], n: int, seed: int
                   ) -> list[dict[str, str]]:
    """``n`` recipes, every tensor a random admissible type; recipe i leans toward position (i + U)/n of each
    tensor's candidates ordered by size (+- 0.35 per tensor), so total sizes spread over the whole range."""
    cands = tensor_candidates(catalog, costs, Constraints(imatrix=True))
    by_name = catalog.by_name()
    from quantmix.formats.registry import get_type

    ordered = {name: sorted((c.qtype for c in cs), key=lambda q: (get_type(q).tensor_bytes(by_name[name].shape), q))
               for name, cs in cands.items()}
    rng = random.Random(seed)
    out = []
    for i in range(n):
        center = (i + rng.random()) / max(n, 1)
        types = {}
        for name in sorted(ordered):
            opts = ordered[name]
            u = min(1.0, max(0.0, center + rng.uniform(-0.35, 0.35)))
            types[name] = opts[min(len(opts) - 1, int(u * len(opts)))]
        out.append(types)
    return out


# ------------------------------------------------------------------------------------------------ files


@dataclass
class Entry:
    """One GGUF of the benchmark: what made it, its size, its predicted and measured KLD."""

    label: str  # "stock Q4_K_M", "quantmix Q4_K_M", "proxy Q4_K_M", "random 3"
    family: str  # stock | quantmix | proxy | random
    ftype: str | None
    path: Path
    n_bytes: int
    predicted: float | None
    info: dict = field(default_factory=dict)
    kld: dict | None = None
    types: dict[str, str] = field(default_factory=dict)


class Bench:
    """Everything for one model: inputs, measurements, the work folder."""

    JUDGE_BATCH = 12

    def __init__(self, args: argparse.Namespace, model: str) -> None:
        import torch

        torch.set_num_threads(args.threads)
        self.args = args
        self.inputs = resolve_model(model)
        self.name = self.inputs.name
        log(f"{self.name}: imatrix")
        self.imatrix = Path(args.imatrix) if args.imatrix else ensure_imatrix(self.inputs)
        log(f"{self.name}: hashing the source GGUF and the imatrix")
        self.src_sha = file_sha(self.inputs.gguf)
        self.im_sha = file_sha(self.imatrix)
        log(f"{self.name}: error table (cached after the first run)")
        self.cands = tuple(c.strip().upper() for c in args.candidates.split(",")) if args.candidates else None
        self.m: Measured = measure(self.inputs, self.imatrix, self.cands, profile=None, device=args.device)
        self.catalog = self.m.catalog
        self.costs = self.m.table.to_costs()
        self.sens = None
        self.work = Path(args.work) / self.name
        for d in ("gguf", "plans", "kld", "recipes"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        from quantmix.tools.llamacpp import ensure_llamacpp

        self.lc = ensure_llamacpp()

    def fit(self) -> None:
        """The sensitivity fit (slow the first time, cached per probe): only the quantmix plans and the
        predictions need it, so the stock, proxy and random files are written and judged before it."""
        if self.sens is not None:
            return
        a = self.args
        log(f"{self.name}: sensitivity fit ({a.profile} profile; cached after the first run)")
        self.m = measure(self.inputs, self.imatrix, self.cands, profile=a.profile, device=a.device)
        if self.m.sensitivity is None:
            raise RuntimeError(f"{self.name}: no sensitivity fit (the benchmark needs the Hugging Face model)")
        self.sens = self.m.sensitivity
        self.measure_key = short_hash(self.src_sha, self.im_sha, a.profile, sorted(self.sens.coefficients.items()),
                                      sorted((n, sorted(r.items())) for n, r in self.costs.items()))

    def predict(self, types: dict[str, str]) -> float | None:
        return self.sens.predict(types, self.costs) if self.sens is not None else None

    def gguf_path(self, family: str, ftype: str | None, key: str) -> Path:
        tag = f"{family}-{ftype}" if ftype else family
        return self.work / "gguf" / f"{self.name}-{tag}-{key}.gguf"

    # ---- writers

    def stock(self, ftype: str) -> Entry:
        from quantmix.model.gguf_header import read_gguf_header

        out = self.gguf_path("stock", ftype, short_hash(self.src_sha, self.im_sha, ftype, "llama-quantize"))
        if not out.exists():
            log(f"{self.name} {ftype}: llama-quantize --imatrix")
            tmp = out.with_name(f".{out.name}.tmp")
            self.lc.run("llama-quantize", "--imatrix", self.imatrix, self.inputs.gguf, tmp, ftype,
                        str(self.args.threads))
            tmp.replace(out)
        head = read_gguf_header(out)
        res = stock_resolution(self.catalog, ftype, True)
        file_types = {t.name: t.type_name for t in head.tensors}
        differ = [f"{n}: resolver {q}, file {file_types.get(n)}" for n, q in res.types().items()
                  if file_types.get(n) != q]
        agree = head.tensor_bytes == res.n_bytes and not differ
        if not agree:
            log(f"WARNING {self.name} {ftype}: llama-quantize wrote {head.tensor_bytes:,} bytes of tensor data, "
                f"the resolver predicts {res.n_bytes:,}; {len(differ)} types differ"
                + (f" (first: {differ[0]})" if differ else ""))
        types = {n: q for n, q in file_types.items() if n in self.costs}
        return Entry(f"stock {ftype}", "stock", ftype, out, head.tensor_bytes, None,
                     {"resolver_bytes": res.n_bytes, "resolver_agrees": agree, "types_differ": len(differ)},
                     types=types)

    def write(self, res: Resolution, family: str, ftype: str | None) -> Path:
        """The GGUF of a resolved recipe, written by quantmix (``quantize_gguf``) or by llama-quantize with the
        recipe as ``--tensor-type-file`` (same quantizers, byte-identical tensor data; minutes faster per file
        on a CPU). Either way the file's types and size are checked against the recipe."""
        from quantmix.model.gguf_header import read_gguf_header
        from quantmix.planning.recipe import write_recipe

        types = quantized_types(res)
        w = self.args.writer
        out = self.gguf_path(family, ftype, short_hash(self.src_sha, self.im_sha, types_hash(types), w))
        if not out.exists():
            log(f"{self.name}: writing {out.name} ({8 * res.n_bytes / self.catalog.n_elements:.3f} BPW, {w})")
            tmp = out.with_name(f".{out.name}.tmp")
            if w == "quantmix":
                from quantmix.export.gguf_writer import quantize_gguf

                quantize_gguf(self.inputs.gguf, res, tmp, imatrix=self.imatrix, device=self.args.device,
                              progress=False)
            else:
                rec = write_recipe(res, self.work / "recipes" / f"{out.stem}.txt", "llama")
                self.lc.run("llama-quantize", "--tensor-type-file", rec, "--imatrix", self.imatrix, self.inputs.gguf,
                            tmp, "Q8_0", str(self.args.threads))
            head = read_gguf_header(tmp)
            got = {t.name: t.type_name for t in head.tensors}
            bad = [f"{n}: {q} in the recipe, {got.get(n)} in the file" for n, q in res.types().items()
                   if got.get(n) != q]
            if bad or head.tensor_bytes != res.n_bytes:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"{out.name}: the {w} file does not follow its recipe ({len(bad)} types differ"
                                   f"{', first: ' + bad[0] if bad else ''}; {head.tensor_bytes:,} bytes of tensor "
                                   f"data, recipe {res.n_bytes:,})")
            tmp.replace(out)
        return out

    def quantmix(self, ftype: str, n_bytes: int) -> Entry:
        self.fit()
        a = self.args
        pfile = self.work / "plans" / (f"quantmix-{ftype}-"
                                       f"{short_hash(self.measure_key, n_bytes, a.refine_time, a.seed, 'ilp')}.json")
        if pfile.exists():
            saved = json.loads(pfile.read_text())
            res = resolution_of(self.catalog, saved["types"], f"quantmix {ftype}")
        else:
            log(f"{self.name} {ftype}: planning to {n_bytes:,} bytes (refine {a.refine_time:g} s)")
            oc = plan_recipe(self.m, Budget.of_size(n_bytes), Constraints(imatrix=True), refine_time=a.refine_time,
                             device=a.device, seed=a.seed, progress=False)
            res = oc.plan.resolution()
            saved = {"types": quantized_types(res), "objective": oc.plan.objective, "status": oc.plan.status,
                     "gap": oc.plan.gap, "bytes": oc.plan.n_bytes,
                     "refinement": oc.refinement.summary() if oc.refinement else None}
            atomic_write_text(pfile, json.dumps(saved, indent=1, sort_keys=True) + "\n")
            log(f"{self.name} {ftype}: {oc.plan.summary().splitlines()[0]}"
                + (f"\n  {saved['refinement']}" if saved["refinement"] else ""))
        if res.n_bytes > n_bytes:
            raise RuntimeError(f"quantmix {ftype}: plan of {res.n_bytes:,} bytes exceeds the budget {n_bytes:,}")
        out = self.write(res, "quantmix", ftype)
        return Entry(f"quantmix {ftype}", "quantmix", ftype, out, res.n_bytes, None,
                     {"objective": saved["objective"], "status": saved["status"], "gap": saved["gap"],
                      "refinement": saved["refinement"]}, types=saved["types"])

    def proxy(self, ftype: str, n_bytes: int) -> Entry:
        plan = lagrangian_allocation(self.catalog, self.costs, Budget.of_size(n_bytes), Constraints(imatrix=True))
        res = plan.resolution()
        if res.n_bytes > n_bytes:
            raise RuntimeError(f"proxy {ftype}: plan of {res.n_bytes:,} bytes exceeds the budget {n_bytes:,}")
        types = quantized_types(res)
        return Entry(f"proxy {ftype}", "proxy", ftype, self.write(res, "proxy", ftype), res.n_bytes, None,
                     {"proxy_objective": plan.objective}, types=types)

    def random(self, i: int, types: dict[str, str]) -> Entry:
        res = resolution_of(self.catalog, types, f"random {i}")
        return Entry(f"random {i}", "random", None, self.write(res, "random", None), res.n_bytes, None,
                     types=types)

    # ---- judging

    def judge(self, entries: list[Entry]) -> None:
        """llama-perplexity --kl-divergence on wiki-eval for every entry (cached per file and settings)."""
        from quantmix.evaluation.kld import run_llama_kld
        from quantmix.fixtures.text import text_path

        a = self.args
        text = text_path("wiki-eval")
        extra = ("-fa", a.fa)
        ekey = short_hash(self.src_sha, file_sha(text), a.ctx, a.chunks, extra, a.threads)
        todo = []
        for e in entries:
            f = self.work / "kld" / f"{e.path.stem}-{ekey}.json"
            if f.exists():
                e.kld = json.loads(f.read_text())
            else:
                todo.append((e, f))
        if not todo:
            return
        log(f"{self.name}: llama-perplexity --kl-divergence on {len(todo)} GGUFs ({a.chunks} chunks of {a.ctx})")
        t0 = time.time()
        for i in range(0, len(todo), self.JUDGE_BATCH):  # one base-logits run per batch; results kept per batch
            part = todo[i:i + self.JUDGE_BATCH]
            res = run_llama_kld(self.inputs.gguf, [e.path for e, _ in part], text, a.ctx, a.chunks, a.threads, extra)
            for (e, f), r in zip(part, res):
                e.kld = dict(r.__dict__)
                atomic_write_text(f, json.dumps(e.kld, sort_keys=True) + "\n")
                log(f"{self.name}: {e.label}: KLD {r.kld:.5f} +- {r.kld_se:.5f}, PPL {r.ppl_q:.3f}")
        log(f"{self.name}: judged in {time.time() - t0:.0f} s")


# ------------------------------------------------------------------------------------------------ report


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def render(model: str, n_elements: int, rows: list[dict], random_rows: list[dict], rho: float | None,
           rho_all: float | None, settings: str) -> str:
    mib = 1024 * 1024
    lines = [f"### {model}", "", settings, "",
             "| model | stock mix | size MiB | BPW | KLD stock | KLD quantmix | ratio | KLD proxy-only | PPL stock | "
             "PPL quantmix | same-top-p stock/quantmix |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {model} | {r['ftype']} | {r['bytes'] / mib:.2f} | {r['bpw']:.3f} | {r['kld_stock']:.5f} | "
                     f"{r['kld_quantmix']:.5f} | {r['ratio']:.3f} | {r['kld_proxy']:.5f} | {r['ppl_stock']:.3f} | "
                     f"{r['ppl_quantmix']:.3f} | {100 * r['top_stock']:.2f}% / {100 * r['top_quantmix']:.2f}% |")
    gm = geomean([r["ratio"] for r in rows])
    gmp = geomean([r["kld_proxy"] / r["kld_stock"] for r in rows])
    lines += ["", f"Geometric mean of the KLD ratios (quantmix / stock): **{gm:.3f}** over {len(rows)} sizes "
              f"(worst {max((r['ratio'] for r in rows), default=float('nan')):.3f}); proxy-only / stock: {gmp:.3f}."]
    if random_rows:
        lines += ["", f"Random recipes: {len(random_rows)}, predicted vs measured KLD, Spearman "
                  f"**{rho:.3f}**" + (f" (all {len(random_rows) + 3 * len(rows)} files: {rho_all:.3f})"
                                      if rho_all is not None else "") + ".", "",
                  "| recipe | size MiB | BPW | predicted KLD | measured KLD | measured / predicted |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(random_rows, key=lambda r: r["bytes"]):
            lines.append(f"| {r['label']} | {r['bytes'] / mib:.2f} | {r['bpw']:.3f} | {r['predicted']:.5f} | "
                         f"{r['kld']:.5f} | {r['kld'] / r['predicted']:.2f} |")
    return "\n".join(lines) + "\n"


def run_model(args: argparse.Namespace, model: str) -> dict:
    from quantmix.measurement.sensitivity import spearman

    t_model = time.time()
    b = Bench(args, model)
    n_el = b.catalog.n_elements
    # phase 1 (error table only): llama.cpp's mixes, the proxy-only plans at their sizes, the random recipes
    stock, proxy = {}, {}
    for ft in args.ftypes:
        stock[ft] = b.stock(ft)
        proxy[ft] = b.proxy(ft, stock[ft].n_bytes)
    rnd = [b.random(i, t) for i, t in enumerate(random_recipes(b.catalog, b.costs, args.random_recipes, args.seed))]
    b.judge([e for ft in args.ftypes for e in (stock[ft], proxy[ft])] + rnd)
    # phase 2 (sensitivity fit): quantmix's plans at the same sizes
    quant = {ft: b.quantmix(ft, stock[ft].n_bytes) for ft in args.ftypes}
    b.judge(list(quant.values()))
    groups = [(stock[ft], quant[ft], proxy[ft]) for ft in args.ftypes]
    for s, q, p in groups:
        log(f"{b.name} {s.ftype}: KLD stock {s.kld['kld']:.5f}, quantmix {q.kld['kld']:.5f} "
            f"(ratio {q.kld['kld'] / s.kld['kld']:.3f}), proxy-only {p.kld['kld']:.5f}")
    b.fit()
    for e in [e for g in groups for e in g] + rnd:
        e.predicted = b.predict(e.types)
    rows = []
    for s, q, p in groups:
        rows.append({"model": b.name, "ftype": s.ftype, "bytes": s.n_bytes, "bpw": 8 * s.n_bytes / n_el,
                     "bytes_quantmix": q.n_bytes, "bytes_proxy": p.n_bytes,
                     "kld_stock": s.kld["kld"], "kld_quantmix": q.kld["kld"], "kld_proxy": p.kld["kld"],
                     "ratio": q.kld["kld"] / s.kld["kld"], "ratio_proxy": p.kld["kld"] / s.kld["kld"],
                     "kld_se_stock": s.kld["kld_se"], "kld_se_quantmix": q.kld["kld_se"],
                     "kld_se_proxy": p.kld["kld_se"],
                     "ppl_stock": s.kld["ppl_q"], "ppl_quantmix": q.kld["ppl_q"], "ppl_proxy": p.kld["ppl_q"],
                     "ppl_base": s.kld["ppl_base"],
                     "top_stock": s.kld["same_top_p"], "top_quantmix": q.kld["same_top_p"],
                     "top_proxy": p.kld["same_top_p"],
                     "predicted_stock": s.predicted, "predicted_quantmix": q.predicted, "predicted_proxy": p.predicted,
                     "stock_check": s.info, "quantmix_plan": q.info,
                     "files": {"stock": s.path.name, "quantmix": q.path.name, "proxy": p.path.name}})
    random_rows = [{"label": e.label, "bytes": e.n_bytes, "bpw": 8 * e.n_bytes / n_el, "predicted": e.predicted,
                    "kld": e.kld["kld"], "kld_se": e.kld["kld_se"], "ppl": e.kld["ppl_q"], "file": e.path.name}
                   for e in rnd]
    rho = spearman([r["predicted"] for r in random_rows], [r["kld"] for r in random_rows]) \
        if len(random_rows) >= 2 else None
    every = [e for g in groups for e in g] + rnd
    rho_all = spearman([e.predicted for e in every], [e.kld["kld"] for e in every]) if rnd and groups else None
    sens = b.sens
    settings = (f"llama-perplexity --kl-divergence, wiki-eval, {args.chunks} chunks of {args.ctx} tokens, "
                f"-fa {args.fa}; imatrix {b.imatrix.name}; sensitivity profile {args.profile} "
                f"({sens.check_summary()}); refine {args.refine_time:g} s; candidates "
                f"{', '.join(sorted({q for r in b.costs.values() for q in r}))}; model time "
                f"{time.time() - t_model:.0f} s.")
    md = render(b.name, n_el, rows, random_rows, rho, rho_all, settings) if rows or random_rows else ""
    return {"model": b.name, "settings": settings, "rows": rows, "random": random_rows, "spearman": rho,
            "spearman_all": rho_all, "geomean_ratio": geomean([r["ratio"] for r in rows]) if rows else None,
            "markdown": md, "args": {k: v for k, v in vars(args).items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help=f"fixture name (repeatable; default: {', '.join(FIXTURES)})")
    p.add_argument("--ftypes", default=None, help=f"stock mixes, comma-separated (default {','.join(BENCH_FTYPES)})")
    p.add_argument("--profile", default="full", choices=("full", "quick"), help="sensitivity profile")
    p.add_argument("--refine-time", type=float, default=60.0, help="seconds of refinement per plan")
    p.add_argument("--chunks", type=int, default=None, help="evaluation chunks (default 32; 8 with --quick)")
    p.add_argument("--ctx", type=int, default=512, help="evaluation chunk length (tokens)")
    p.add_argument("--random-recipes", type=int, default=None, help="random recipes (default 20; 5 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke: one model, 3 mixes, 8 chunks, 5 random recipes")
    p.add_argument("--device", default=None, help="torch device for quantmix (default: CUDA when present)")
    p.add_argument("--imatrix", default=None, help="imatrix GGUF to use instead of quantmix's own (wiki-calib)")
    p.add_argument("--candidates", default=None,
                   help="candidate types for quantmix, comma-separated (default: quantmix's own; on a CPU "
                        "quantmix.job.CPU_CANDIDATES)")
    p.add_argument("--writer", default=None, choices=("quantmix", "llama-quantize"),
                   help="what writes quantmix's, the proxy's and the random recipes' GGUFs: quantmix's own writer "
                        "(default with CUDA) or llama-quantize --tensor-type-file (default on a CPU: same bytes, "
                        "about 20 s instead of about 10 min per file for smollm2-768 on 2 cores)")
    p.add_argument("--fa", default="off", choices=("on", "off"), help="llama-perplexity flash attention")
    p.add_argument("--threads", type=int, default=2, help="threads for llama.cpp tools and torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="tables folder")
    p.add_argument("--work", default=str(cache_dir() / "bench-quality"), help="GGUFs, plans and KLD results")
    args = p.parse_args(argv)
    models = args.model or (list(FIXTURES[:1]) if args.quick else list(FIXTURES))
    if args.quick and len(models) > 1:
        models = models[:1]
    args.ftypes = [f.strip().upper() for f in args.ftypes.split(",")] if args.ftypes else \
        list(QUICK_FTYPES if args.quick else BENCH_FTYPES)
    if args.writer is None:
        import torch

        on_gpu = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
        args.writer = "quantmix" if on_gpu else "llama-quantize"
    args.chunks = args.chunks or (8 if args.quick else 32)
    args.random_recipes = args.random_recipes if args.random_recipes is not None else (5 if args.quick else 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in models:
        r = run_model(args, model)
        stem = f"quality-{r['model']}" + ("-quick" if args.quick else "")
        atomic_write_text(out / f"{stem}.md", r["markdown"])
        atomic_write_text(out / f"{stem}.json", json.dumps({k: v for k, v in r.items() if k != "markdown"},
                                                           indent=1, default=str) + "\n")
        print(r["markdown"], flush=True)
        log(f"{r['model']}: wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
