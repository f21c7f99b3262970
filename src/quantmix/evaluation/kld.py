"""How far a quantized model's next-token distributions are from the reference's, per token and in summary.

Every statistic follows the tool that made it known, so numbers are comparable with published ones:

- llama-perplexity ``--kl-divergence`` (tools/perplexity/perplexity.cpp, ``kl_divergence``): per token
  KLD = sum_v p(v) (log p(v) - log q(v)) with p the reference (base) and q the quantized model; mean +- standard
  error sqrt((E[x^2] - E[x]^2) / (n - 1)); percentiles by linear interpolation at f * (n - 1); PPL(Q), PPL(base)
  and Cor(ln PPL(Q), ln PPL(base)) (the correlation of the per-token NLLs); mean ln(PPL(Q)/PPL(base)) with the
  covariance in its error; delta-p = q(token) - p(token), its RMS with error 0.5 / rms * se(delta-p^2);
  "same top p" = share of tokens whose argmax agrees, error sqrt(f (1 - f) / (n - 1)).
- ExLlamaV3 ``eval/model_diff.py``: KL in both directions, "KL-div (quant, FP16)" = KL(P_FP16 || P_quant) (the
  direction above) and "KL-div (FP16, quant)" = KL(P_quant || P_FP16); top-K agreement for K = 1..5 = share of
  tokens whose ordered top-K token lists are identical. It averages per-row means; every chunk here scores the
  same number of tokens, so that equals the pooled mean.

Unlike llama-perplexity (which reads the base as uint16 log-probs floored 16 nats below the max and skips
tokens under e^-16), both distributions are exact here: float64 log-softmax of float32 logits, every token.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["TOPK", "TokenMetrics", "token_metrics", "KLDStats", "MetricsAccumulator", "mean_and_stderr",
           "percentile", "LlamaKLD", "parse_llama_kld", "run_llama_kld"]

TOPK = 5
_ROW_BLOCK = 64  # rows of [vocab] float64 worked on at once (bounded memory)


@dataclass(frozen=True)
class TokenMetrics:
    """Per scored token: KL both ways, both NLLs, and whether the ordered top-k lists agree (k = 1..TOPK)."""

    kld: Tensor  # KL(ref || quant) [n] float64
    kld_rev: Tensor  # KL(quant || ref) [n] float64
    nll_q: Tensor  # [n] float64
    nll_ref: Tensor  # [n] float64
    topk_agree: Tensor  # [n, TOPK] bool; column k-1: top-k lists identical


def token_metrics(ref_logits: Tensor, q_logits: Tensor, targets: Tensor) -> TokenMetrics:
    """Compare two models' logits ([n, vocab], float32) at the same positions predicting ``targets`` [n]."""
    if ref_logits.shape != q_logits.shape or ref_logits.dim() != 2 or targets.shape != ref_logits.shape[:1]:
        raise ValueError(f"logits {tuple(ref_logits.shape)} vs {tuple(q_logits.shape)} with targets "
                         f"{tuple(targets.shape)}: expected [n, vocab] twice and [n]")
    for name, x in (("reference", ref_logits), ("quantized", q_logits)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} logits contain NaN or infinite values")
    outs: dict[str, list[Tensor]] = {k: [] for k in ("kld", "kld_rev", "nll_q", "nll_ref", "topk_agree")}
    tgt = targets.long().to(ref_logits.device)
    for r0 in range(0, ref_logits.shape[0], _ROW_BLOCK):
        a = ref_logits[r0:r0 + _ROW_BLOCK]
        b = q_logits[r0:r0 + _ROW_BLOCK]
        t = tgt[r0:r0 + _ROW_BLOCK, None]
        lp = torch.log_softmax(a.double(), dim=-1)
        lq = torch.log_softmax(b.double(), dim=-1)
        d = lp - lq
        outs["kld"].append((lp.exp() * d).sum(-1).clamp_min(0.0))
        outs["kld_rev"].append((lq.exp() * -d).sum(-1).clamp_min(0.0))
        outs["nll_ref"].append(-lp.gather(-1, t).squeeze(-1))
        outs["nll_q"].append(-lq.gather(-1, t).squeeze(-1))
        ta = torch.topk(a, TOPK, dim=-1).indices
        tb = torch.topk(b, TOPK, dim=-1).indices
        ta[:, 0] = a.argmax(-1)  # first maximum, as llama-perplexity's "same top p" picks it
        tb[:, 0] = b.argmax(-1)
        outs["topk_agree"].append(torch.cumprod((ta == tb).int(), dim=-1).bool())
    return TokenMetrics(*(torch.cat(outs[k]).cpu() for k in ("kld", "kld_rev", "nll_q", "nll_ref", "topk_agree")))


def mean_and_stderr(x: np.ndarray) -> tuple[float, float]:
    """Mean and llama-perplexity's standard error sqrt((E[x^2] - E[x]^2) / (n - 1)) (0 when n <= 10)."""
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    m = float(x.mean())
    var = float((x * x).mean()) - m * m
    return m, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def percentile(sorted_x: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation at fraction * (n - 1) of the sorted values."""
    if fraction <= 0:
        return float(sorted_x[0])
    if fraction >= 1:
        return float(sorted_x[-1])
    p = fraction * (sorted_x.size - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_x[i] + p * sorted_x[min(i + 1, sorted_x.size - 1)])


@dataclass(frozen=True)
class KLDStats:
    """Summary of a comparison, one flat record (becomes one row of runs.jsonl / runs.csv)."""

    n_tokens: int
    ppl_q: float
    ppl_q_se: float
    ppl_base: float
    ppl_base_se: float
    cor_ln_ppl: float  # Cor(ln PPL(Q), ln PPL(base))
    ln_ppl_ratio: float  # mean ln(PPL(Q)/PPL(base))
    ln_ppl_ratio_se: float
    kld: float  # KL(ref || quant): llama-perplexity's KLD, ExLlamaV3's "KL-div (quant, FP16)"
    kld_se: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    kld_min: float
    kld_rev: float  # KL(quant || ref): ExLlamaV3's "KL-div (FP16, quant)"
    kld_rev_se: float
    kld_rev_median: float
    kld_rev_p99: float
    kld_rev_max: float
    same_top_p: float  # argmax agrees (= top-1 agreement)
    same_top_p_se: float
    top1: float
    top2: float
    top3: float
    top4: float
    top5: float
    dp_mean: float  # mean of q(token) - p(token)
    dp_mean_se: float
    dp_rms: float
    dp_rms_se: float
    dp_max_abs: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class MetricsAccumulator:
    """Collects per-token metrics chunk by chunk; :meth:`summary` computes every statistic at the end."""

    parts: list[TokenMetrics] = field(default_factory=list)

    def add(self, m: TokenMetrics) -> None:
        self.parts.append(m)

    @property
    def n_tokens(self) -> int:
        return sum(p.kld.numel() for p in self.parts)

    def cat(self) -> TokenMetrics:
        if not self.parts:
            raise ValueError("no tokens were scored")
        return TokenMetrics(*(torch.cat([getattr(p, k) for p in self.parts])
                              for k in ("kld", "kld_rev", "nll_q", "nll_ref", "topk_agree")))

    def summary(self) -> KLDStats:
        m = self.cat()
        kld = m.kld.numpy()
        rev = m.kld_rev.numpy()
        a = m.nll_q.numpy()
        b = m.nll_ref.numpy()
        n = kld.size
        la, sa = mean_and_stderr(a)
        lb, sb = mean_and_stderr(b)
        cov = (float((a * b).mean()) - la * lb) / (n - 1) if n >= 10 else 0.0
        cor = cov / (sa * sb) if sa > 0 and sb > 0 else float("nan")
        ratio_se = math.sqrt(max(sa * sa + sb * sb - 2.0 * cov, 0.0))
        ks = np.sort(kld)
        rs = np.sort(rev)
        dp = np.exp(-a) - np.exp(-b)
        dpm, dpse = mean_and_stderr(dp)
        msq, msq_se = mean_and_stderr(dp * dp)
        rms = math.sqrt(msq)
        agree = m.topk_agree.double().mean(0).tolist()
        same = agree[0]
        k, kse = mean_and_stderr(kld)
        r, rse = mean_and_stderr(rev)
        return KLDStats(
            n_tokens=n, ppl_q=math.exp(la), ppl_q_se=math.exp(la) * sa, ppl_base=math.exp(lb),
            ppl_base_se=math.exp(lb) * sb, cor_ln_ppl=cor, ln_ppl_ratio=la - lb, ln_ppl_ratio_se=ratio_se,
            kld=k, kld_se=kse, kld_median=percentile(ks, 0.5), kld_p90=percentile(ks, 0.9),
            kld_p95=percentile(ks, 0.95), kld_p99=percentile(ks, 0.99), kld_p999=percentile(ks, 0.999),
            kld_max=float(ks[-1]), kld_min=float(ks[0]),
            kld_rev=r, kld_rev_se=rse, kld_rev_median=percentile(rs, 0.5), kld_rev_p99=percentile(rs, 0.99),
            kld_rev_max=float(rs[-1]),
            same_top_p=same, same_top_p_se=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            top1=agree[0], top2=agree[1], top3=agree[2], top4=agree[3], top5=agree[4],
            dp_mean=dpm, dp_mean_se=dpse, dp_rms=rms, dp_rms_se=0.5 / rms * msq_se if rms > 0 else 0.0,
            dp_max_abs=float(np.abs(dp).max()),
        )


# ------------------------------------------------------------------------------------------------ llama.cpp


@dataclass(frozen=True)
class LlamaKLD:
    """The final statistics llama-perplexity --kl-divergence prints."""

    ppl_q: float
    ppl_base: float
    cor_ln_ppl: float
    kld: float
    kld_se: float
    kld_median: float
    kld_p99: float
    kld_max: float
    dp_rms: float
    same_top_p: float
    n_chunks: int
    n_ctx: int


_NUM = r"(-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)"
_LLAMA_FIELDS = {
    "ppl_q": rf"Mean PPL\(Q\)\s*:\s*{_NUM}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUM}",
    "cor_ln_ppl": rf"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s*{_NUM}%",
    "kld": rf"Mean\s+KLD:\s*{_NUM}",
    "kld_se": rf"Mean\s+KLD:\s*[-0-9.e+]+\s*±\s*{_NUM}",
    "kld_median": rf"Median\s+KLD:\s*{_NUM}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "kld_max": rf"Maximum KLD:\s*{_NUM}",
    "dp_rms": rf"RMS Δp\s*:\s*{_NUM}\s*±",
    "same_top_p": rf"Same top p:\s*{_NUM}\s*±",
}
_PERCENT = {"cor_ln_ppl", "dp_rms", "same_top_p"}


def parse_llama_kld(log: str) -> LlamaKLD:
    """Read llama-perplexity's KL-divergence summary from its output."""
    vals: dict[str, float] = {}
    for k, rx in _LLAMA_FIELDS.items():
        m = re.search(rx, log)
        if m is None:
            raise ValueError(f"llama-perplexity output has no {k!r} line:\n{log[-2000:]}")
        vals[k] = float(m.group(1)) / (100.0 if k in _PERCENT else 1.0)
    c = re.search(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+)", log)
    if c is None:
        raise ValueError(f"llama-perplexity output does not say how many chunks it scored:\n{log[-2000:]}")
    return LlamaKLD(**vals, n_chunks=int(c.group(1)), n_ctx=int(c.group(2)))  # type: ignore[arg-type]


def run_llama_kld(base_gguf: Path, quant_ggufs: Sequence[Path], text_file: Path, n_ctx: int = 512,
                  max_chunks: int | None = None, threads: int = 2, extra_args: Sequence[str] = ()) -> list[LlamaKLD]:
    """llama-perplexity's own KL-divergence of each quantized GGUF against ``base_gguf``: the base logits
    file (uint16 log-probs, ~96 KiB per scored token at a 49k vocabulary) is written to a temporary directory
    once and deleted afterwards. ``extra_args`` go to every run (e.g. ``("-fa", "off")``)."""
    from quantmix.tools.llamacpp import LlamaCppError, ensure_llamacpp

    lc = ensure_llamacpp()
    common = ["-f", str(text_file), "-c", str(n_ctx), "-t", str(threads), "--no-repack", "--no-warmup", *extra_args]
    if max_chunks is not None:
        common += ["--chunks", str(max_chunks)]
    out = []
    with tempfile.TemporaryDirectory(prefix="quantmix-kld-") as d:
        base = Path(d) / "base.kld"
        proc = lc.run("llama-perplexity", "-m", base_gguf, *common, "--kl-divergence-base", base, check=False,
                      stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not base.exists():
            raise LlamaCppError(f"llama-perplexity could not write base logits for {base_gguf}:\n"
                                f"{(proc.stdout + proc.stderr)[-3000:]}")
        for q in quant_ggufs:
            proc = lc.run_until("llama-perplexity", "-m", q, *common, "--kl-divergence-base", base,
                                "--kl-divergence", done="Same top p:",  # the summary's last line parsed
                                stdin=subprocess.DEVNULL)
            log = proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise LlamaCppError(f"llama-perplexity --kl-divergence on {q} failed ({proc.returncode}):\n"
                                    f"{log[-3000:]}")
            out.append(parse_llama_kld(log))
    return out
