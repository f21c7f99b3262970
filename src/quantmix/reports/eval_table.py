"""Evaluation rows as the markdown tables quant makers publish.

Two layouts:

- ExLlamaV3-style (``render_eval_table``): Quant | Size | KL-div (quant, FP16) | KL-div (FP16, quant) |
  Perplexity | Top-1 .. Top-5, the reference last. As there, "KL-div (quant, FP16)" is KL(P_FP16 || P_quant),
  the direction llama-perplexity reports as KLD; "KL-div (FP16, quant)" is the other one. Top-K = share of
  tokens whose ordered top-K lists agree.
- llama-perplexity-style (``render_llama_table``): Quant | BPW | Size | PPL | rho-PPL (Cor(ln PPL(Q),
  ln PPL(base))) | mean KLD +- error | 99% KLD | RMS delta-p | Same top p.

Rows are the flat records of :mod:`quantmix.evaluation.runs`; sizes are tensor data (quantmix's size unit).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["render_eval_table", "render_llama_table", "format_bytes"]


def format_bytes(n: float) -> str:
    """``138.5 MiB`` / ``12.34 GiB``."""
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100.0 * x:.1f}%"


def _f(x: float | None, nd: int = 4) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def _table(head: list[str], body: list[list[str]]) -> str:
    align = ["---"] + ["--:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _ordered(rows: Sequence[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: -(r.get("size_bytes") or 0))


def _reference(rows: Sequence[dict]) -> dict | None:
    return next((r for r in rows if r.get("ppl_base") is not None), None)


def render_eval_table(rows: Sequence[dict], reference_label: str = "FP32 (reference)") -> str:
    """ExLlamaV3-style table, largest quant first, the reference model last."""
    body = []
    for r in _ordered(rows):
        body.append([str(r.get("quant", "")), f"{format_bytes(r['size_bytes'])} ({r['bpw']:.2f} bpw)",
                     _f(r.get("kld")), _f(r.get("kld_rev")), _f(r.get("ppl_q"), 3)]
                    + [_pct(r.get(f"top{k}")) for k in range(1, 6)])
    ref = _reference(rows)
    if ref is not None:
        size = ref.get("ref_size_bytes")
        body.append([reference_label, f"{format_bytes(size)} (32.00 bpw)" if size else "", "", "",
                     _f(ref["ppl_base"], 3)] + [""] * 5)
    head = ["Quant", "Size", "KL-div (quant, FP16)", "KL-div (FP16, quant)", "Perplexity"] + \
        [f"Top-{k}" for k in range(1, 6)]
    return _table(head, body)


def render_llama_table(rows: Sequence[dict]) -> str:
    """llama-perplexity-style table (its KL-divergence summary, one row per quant)."""
    body = []
    for r in _ordered(rows):
        body.append([str(r.get("quant", "")), f"{r['bpw']:.3f}", format_bytes(r["size_bytes"]), _f(r.get("ppl_q"), 3),
                     _pct(r.get("cor_ln_ppl")), f"{_f(r.get('kld'), 5)} ± {_f(r.get('kld_se'), 5)}",
                     _f(r.get("kld_p99")), _pct(r.get("dp_rms")), _pct(r.get("same_top_p"))])
    head = ["Quant", "BPW", "Size", "PPL", "ρ-PPL", "mean KLD", "99% KLD", "RMS Δp", "Same top p"]
    out = _table(head, body)
    ref = _reference(rows)
    if ref is not None:
        out += f"\n\nReference PPL: {ref['ppl_base']:.3f} ({ref.get('text', '')}, {ref.get('n_tokens', '')} tokens" \
               f" scored, n_ctx {ref.get('n_ctx', '')}, {ref.get('scoring', '')})."
    return out
