"""quantmix quantize beside llama-quantize on the same damaged inputs (issue 18): exit status, the first line of
the message, and whether anything was left at or beside the output path.

The inputs are :func:`quantmix.fixtures.damaged.build_damaged`'s copies of the tiny llama's F32 GGUF (truncated,
wrong magic / version, NaN / Inf / 1e7 written into weights, a NaN in a copied norm, a garbage imatrix, bad
recipe files, outputs that cannot be written). Each case runs ``quantmix quantize SRC -o OUT ...`` and the
same request to ``llama-quantize [--imatrix I] [--tensor-type-file R] SRC OUT FTYPE``.

    .venv/bin/python bench/reliability.py --out bench/results/reliability.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# (case, source input, ftype, extra: imatrix / recipe input names, output kind)
CASES = [
    ("truncated GGUF", "truncated.gguf", "Q4_K_M", {}, "file"),
    ("header only", "header-only.gguf", "Q4_K_M", {}, "file"),
    ("empty file", "empty.gguf", "Q4_K_M", {}, "file"),
    ("not a GGUF", "garbage.gguf", "Q4_K_M", {}, "file"),
    ("wrong magic", "magic.gguf", "Q4_K_M", {}, "file"),
    ("GGUF version 99", "version.gguf", "Q4_K_M", {}, "file"),
    ("NaN in a quantized weight", "nan-weight.gguf", "Q4_K_M", {}, "file"),
    ("Inf in a quantized weight", "inf-weight.gguf", "Q4_K_M", {}, "file"),
    ("NaN in a copied F32 norm", "nan-norm.gguf", "Q4_K_M", {}, "file"),
    ("1e7 weight, Q8_0 (f16 scale overflows)", "huge-weight.gguf", "Q8_0", {}, "file"),
    ("garbage imatrix", "gguf", "Q4_K_M", {"imatrix": "garbage.imatrix"}, "file"),
    ("missing imatrix", "gguf", "Q4_K_M", {"imatrix": "MISSING"}, "file"),
    ("IQ2_XS without an imatrix", "gguf", "IQ2_XS", {}, "file"),
    ("recipe: bad regex on line 2", "gguf", "Q8_0", {"recipe": "recipe-bad-regex.txt"}, "file"),
    ("recipe: unknown type", "gguf", "Q8_0", {"recipe": "recipe-bad-type.txt"}, "file"),
    ("recipe: no '='", "gguf", "Q8_0", {"recipe": "recipe-no-eq.txt"}, "file"),
    ("output is a directory", "gguf", "Q4_K_M", {}, "dir"),
    ("output under a file", "gguf", "Q4_K_M", {}, "under-file"),
    ("output = its own source", "gguf", "Q4_K_M", {}, "source"),
]


def _first_line(text: str, tmp: str) -> str:
    """The most specific line of a tool's output: the first naming an error, else invalid / failed."""
    keep = [ln.strip().replace(tmp + "/", "") for ln in text.splitlines() if ln.strip()]
    line = next((ln for word in ("error", "invalid", "failed") for ln in keep if word in ln.lower()),
                keep[0] if keep else "(nothing)")
    return (line[:160] + "...") if len(line) > 160 else line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability.md")
    a = ap.parse_args()
    from quantmix.fixtures.damaged import build_damaged
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.job import resolve_model
    from quantmix.tools.llamacpp import ensure_llamacpp

    lc = ensure_llamacpp()
    hf = get_tiny("tiny-llama", vocab=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f = build_damaged(resolve_model(hf).gguf, hf, Path(tmp) / "in")
        for case, src_name, ftype, extra, kind in CASES:
            res = {}
            for tool in ("quantmix", "llama-quantize"):
                work = Path(tmp) / f"{tool}-{len(rows)}"
                work.mkdir()
                out = {"file": work / "out.gguf", "dir": work, "under-file": f["a-file"] / "out.gguf",
                       "source": f[src_name]}[kind]
                src = f[src_name]
                im = extra.get("imatrix")
                im_path = (work / "missing.imatrix") if im == "MISSING" else (f[im] if im else None)
                recipe = f[extra["recipe"]] if "recipe" in extra else None
                if tool == "quantmix":
                    cmd = [sys.executable, "-m", "quantmix.cli", "quantize", str(src), "-o", str(out), "--quiet",
                           "--device", "cpu"]
                    cmd += ["--imatrix", str(im_path)] if im_path else []
                    cmd += ["--recipe", str(recipe)] if recipe else ["--ftype", ftype]
                else:
                    cmd = [str(lc.tool("llama-quantize"))]
                    cmd += ["--imatrix", str(im_path)] if im_path else []
                    cmd += ["--tensor-type-file", str(recipe)] if recipe else []
                    cmd += [str(src), str(out), ftype]
                before = set(os.listdir(work))
                p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
                left = sorted(set(os.listdir(work)) - before)
                wrote = kind == "file" and out.exists()
                res[tool] = (p.returncode, _first_line(p.stderr + "\n" + p.stdout, tmp), wrote, left)
            rows.append((case, res))
            print(case, {k: v[0] for k, v in res.items()}, flush=True)
    lines = ["| case | quantmix exit | quantmix says | llama-quantize exit | llama-quantize says |",
             "|---|---|---|---|---|"]
    for case, res in rows:
        cells = []
        for tool in ("quantmix", "llama-quantize"):
            rc, msg, wrote, left = res[tool]
            note = " (output written)" if wrote and rc == 0 else (" (left: " + ", ".join(left) + ")" if left else "")
            cells += [f"{rc}{note}", msg.replace("|", "\\|")]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print(a.out)


if __name__ == "__main__":
    main()
