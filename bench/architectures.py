"""Architecture x step: which steps pass on each tiny model, their wall time, and KLD parity with llama.cpp.

Runs tests/test_architectures.py (every step from an empty cache: conversion by llama.cpp's converter, catalog,
imatrix, optimize with sensitivity, quantize, llama-quantize byte identity, eval, llama-perplexity) with
``QUANTMIX_ARCH_REPORT`` set, then prints the markdown table BENCHMARKS.md holds.

    .venv/bin/python bench/architectures.py [-k EXPR] [--out bench/results/architectures.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

STEPS = ("build", "convert", "catalog", "imatrix", "llama-imatrix", "optimize", "quantize", "llama-quantize", "eval",
         "llama-perplexity", "kld-parity")


def render(rows: list[dict]) -> str:
    head = ("| architecture | " + " | ".join(STEPS) + " | imatrix corr. (lowest) | KLD quantmix | KLD llama-perplexity"
            " | ratio |")
    lines = [head, "|" + "---|" * (len(STEPS) + 5)]
    for r in rows:
        cells = []
        for s in STEPS:
            if s not in r["steps"]:
                cells.append("not run")
            elif r["failed"] == s:
                cells.append(f"FAIL {r['steps'][s]:.0f} s")
            else:
                cells.append(f"{r['steps'][s]:.0f} s")
        k, kl, c = r.get("kld"), r.get("kld_llama"), r.get("imatrix_corr")
        corr = f" | {c:.5f}" if c is not None else " | "
        tail = corr + (f" | {k:.4f} | {kl:.4f} | {k / kl:.3f} |" if k is not None and kl else " | | | |")
        lines.append(f"| {r['arch']} | " + " | ".join(cells) + tail)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="pytest -k expression (e.g. 'gemma2 or llama')")
    ap.add_argument("--out", type=Path, default=Path("bench/results/architectures.jsonl"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_architectures.py"]
    if args.k:
        cmd += ["-k", args.k]
    rc = subprocess.run(cmd, env=dict(os.environ, QUANTMIX_ARCH_REPORT=str(args.out))).returncode
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    print(render(rows))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
