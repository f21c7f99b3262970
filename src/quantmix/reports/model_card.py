"""The README.md of a quant release, laid out as quant makers publish them on Hugging Face.

Front matter (tags, ``quantized_by``), what the files are, the results tables (the ExLlamaV3 and
llama-perplexity layouts of :mod:`quantmix.reports.eval_table`), the plots, one section per quant with its size,
BPW, recipe file and the llama-quantize / ik_llama.cpp commands that rebuild it, the baselines it was compared
with, how KLD was measured, and the command that reproduces the whole report. Plain text, deterministic.

``recipes`` maps a quant's name (its row's ``quant``) to its recipe: a llama-quantize ``--tensor-type-file``,
path relative to the README; the ik_llama.cpp ``--custom-q`` list is beside it as ``<file>.ik``, as
``quantmix optimize`` writes them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from quantmix.planning.recipe import NOMINAL_FTYPE
from quantmix.reports.eval_table import format_bytes, render_eval_table, render_llama_table
from quantmix.reports.pareto import FAMILY_LABELS, check_rows, row_family

__all__ = ["render_model_card"]

_SETUP_KEYS = [("text", "text"), ("n_tokens", "tokens scored"), ("n_ctx", "context"), ("n_chunks", "chunks"),
               ("scoring", "scoring"), ("reference_precision", "reference precision"),
               ("act_quant", "activation emulation"), ("device", "device")]


def _base_name(model: str) -> str:
    name = PurePosixPath(str(model).rstrip("/").replace("\\", "/")).name
    return re.sub(r"\.gguf$", "", name, flags=re.I) or str(model)


def _safe(quant: str) -> str:
    """A quant name as a file-name fragment."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", quant).strip("_") or "quant"


def _num(x: object, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _check_plot(p: str) -> str:
    if not isinstance(p, str) or not p:
        raise ValueError(f"plot path {p!r} is not a file name")
    if p.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", p) or ".." in PurePosixPath(p).parts:
        raise ValueError(f"plot {p!r} must be a path relative to the README (inside its folder)")
    return p


def _setup_lines(rows: Sequence[dict]) -> list[str]:
    lines = []
    for key, label in _SETUP_KEYS:
        vals = []
        for r in rows:
            v = r.get(key)
            if v is not None and v not in vals:
                vals.append(v)
        if vals:
            lines.append(f"- {label}: " + ", ".join(f"`{v}`" for v in vals))
    return lines


def _text_lines(texts: Mapping[str, Sequence[dict]]) -> list[str]:
    """One line per role (calibration, evaluation): each file's name, bytes and full sha256, so a reader can
    check with sha256sum that they hold the same text."""
    return [f"- {role}: " + " + ".join(f"`{t['name']}` ({t['bytes']:,} bytes, sha256 `{t['sha256']}`)" for t in recs)
            for role, recs in texts.items() if recs]


def render_model_card(model: str, rows: Sequence[dict], recipes: Mapping[str, str], plots: Sequence[str],
                      reproduce: str, notes: str = "", *, source_gguf: str | None = None,
                      imatrix: str = "imatrix.gguf", base_model: str | None = None,
                      texts: Mapping[str, Sequence[dict]] | None = None) -> str:
    """The README.md text. ``rows``: evaluation rows (each needs ``quant``, ``size_bytes``, ``bpw``; ``family``
    as in :mod:`quantmix.reports.pareto`); ``recipes``: quant -> recipe file (every key must name a row);
    ``plots``: PNG paths relative to the README; ``reproduce``: the shell command that rebuilds the report;
    ``source_gguf`` / ``imatrix``: file names used in the commands (default ``<model>-BF16.gguf``);
    ``base_model``: a Hugging Face id for the front matter, when there is one; ``texts``: role -> the texts used
    (each {name, bytes, sha256}, e.g. :meth:`quantmix.evaluation.evaluate.TextSource.records`)."""
    rows = check_rows(rows, required=("size_bytes", "bpw"))
    if not rows:
        raise ValueError(f"no evaluation rows for the model card of {model}")
    for i, r in enumerate(rows):
        if not isinstance(r.get("quant"), str) or not r["quant"]:
            raise ValueError(f"evaluation row #{i} ({format_bytes(r['size_bytes'])}) has no quant name")
    by_quant: dict[str, dict] = {}
    for r in rows:
        if r["quant"] in by_quant:
            raise ValueError(f"two evaluation rows for quant {r['quant']!r}: the card needs one per quant")
        by_quant[r["quant"]] = r
    for q, f in recipes.items():
        if q not in by_quant:
            raise ValueError(f"recipe {f!r} is for quant {q!r}, which has no evaluation row")
        if not isinstance(f, str) or not f:
            raise ValueError(f"recipe for quant {q!r} is {f!r}, not a file name")
    plots = [_check_plot(p) for p in plots]
    if not reproduce.strip():
        raise ValueError("the model card needs the command that reproduces it")

    name = _base_name(model)
    src = source_gguf or f"{name}-BF16.gguf"
    ordered = sorted(rows, key=lambda r: (-r["size_bytes"], r["quant"]))
    ours = [r for r in ordered if r["quant"] in recipes]
    baselines = [r for r in ordered if r["quant"] not in recipes]

    compared = ", ".join(sorted({FAMILY_LABELS.get(row_family(r), row_family(r)) for r in baselines}))

    out: list[str] = ["---"]
    if base_model:
        out.append(f"base_model: {base_model}")
    out += ["quantized_by: quantmix", "pipeline_tag: text-generation", "tags:", "- gguf", "- imatrix",
            "- quantmix", "- mixed-precision", "- llama.cpp", "- ik_llama.cpp", "---", "",
            f"# {name}: mixed-precision GGUF quants by quantmix", "",
            f"Quantizations of `{model}` whose per-tensor types were chosen by quantmix to give the lowest KL "
            "divergence to the reference model at an exact file size. Each quant is an ordinary GGUF made by "
            "llama.cpp's `llama-quantize` from a recipe (one type per tensor), so it runs anywhere llama.cpp "
            "does; the same recipes are given in ik_llama.cpp's `--custom-q` form. "
            f"They are compared below with {compared or 'no baselines'}, measured the same way.", ""]

    out += ["## Results", "", "KL divergence, perplexity and top-K agreement against the reference (sizes are "
            "tensor data):", "", render_eval_table(rows), "", "The same measurements in llama-perplexity's "
            "`--kl-divergence` layout:", "", render_llama_table(rows), ""]

    if plots:
        out += ["## Plots", ""]
        for p in plots:
            out += [f"![{PurePosixPath(p).stem}]({p})", ""]

    out += ["## Quants", ""]
    if not ours:
        out += ["No quantmix recipes in this release.", ""]
    for r in ours:
        q, f = r["quant"], recipes[r["quant"]]
        gguf = f"{name}-{_safe(q)}.gguf"
        out += [f"### {q}", "",
                f"- Size: {format_bytes(r['size_bytes'])} of tensor data, {r['bpw']:.3f} BPW",
                f"- Mean KLD: {_num(r.get('kld'), '.5f')}"
                + (f" ± {r['kld_se']:.5f}" if r.get("kld_se") is not None else "")
                + f", PPL: {_num(r.get('ppl_q'), '.3f')}"
                + (f", same top p: {100 * r['same_top_p']:.1f}%" if r.get("same_top_p") is not None else ""),
                f"- Recipe: [`{f}`]({f}) (llama-quantize), [`{f}.ik`]({f}.ik) (ik_llama.cpp)", "",
                "<details>", "<summary>Commands to rebuild this file</summary>", "", "```bash",
                "# llama.cpp (the recipe names every tensor's type; the file type only labels the GGUF)",
                f"llama-quantize --imatrix {imatrix} --tensor-type-file {f} \\",
                f"    {src} {gguf} {NOMINAL_FTYPE}", "",
                "# ik_llama.cpp",
                f"llama-quantize --imatrix {imatrix} --custom-q \"$(cat {f}.ik)\" \\",
                f"    {src} {gguf} {NOMINAL_FTYPE}", "```", "", "</details>", ""]

    if baselines:
        out += ["## Baselines", "", "Compared with, not published here:", ""]
        for r in baselines:
            fam = row_family(r)
            line = f"- `{r['quant']}` ({FAMILY_LABELS.get(fam, fam)}): {format_bytes(r['size_bytes'])}, " \
                   f"{r['bpw']:.3f} BPW, mean KLD {_num(r.get('kld'), '.5f')}"
            if fam == "stock":
                line += f"; `llama-quantize --imatrix {imatrix} {src} OUT.gguf {r['quant']}`"
            elif fam == "uniform":
                line += f"; `llama-quantize --pure --imatrix {imatrix} {src} OUT.gguf {r['quant']}`"
            out.append(line)
        out.append("")

    out += ["## How KLD was measured", "",
            "Both models score the same held-out text, which was not used for calibration. Per token, "
            "KLD = sum over the vocabulary of p_ref(v) (log p_ref(v) - log p_quant(v)): the direction "
            "llama-perplexity reports and ExLlamaV3 calls \"KL-div (quant, FP16)\". The tables give its mean "
            "over the scored tokens with the standard error, perplexity of both models, the share of tokens "
            "whose top token (and ordered top-K list) agrees, and the RMS change in the probability of the "
            "correct token. Setup:", ""]
    out += _setup_lines(rows) or ["- not recorded in the rows"]
    out += ["", "To check a file with llama.cpp's own tool:", "", "```bash",
            f"llama-perplexity -m {src} -f TEXT.txt --kl-divergence-base base.kld",
            "llama-perplexity -m QUANT.gguf -f TEXT.txt --kl-divergence-base base.kld --kl-divergence",
            "```", ""]

    text_lines = _text_lines(texts or {})
    if text_lines:
        out += ["## Texts", ""] + text_lines + [""]
    out += ["## Reproduce", "", "```bash", reproduce.strip(), "```", ""]
    if notes.strip():
        out += ["## Notes", "", notes.strip(), ""]
    return "\n".join(out)
