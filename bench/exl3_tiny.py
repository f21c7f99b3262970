"""EXL3 end to end on the lent GPU with a tiny Llama built in code: quantmix measure-exl3 (exllamav3's quantizer at
every rate), the exact plan at a bpw, exllamav3's own convert from quantmix's recipe and at the same --bits, and
KL-divergence of each against the float model through exllamav3's inference.

  bench/exl3_device.sh --tiny [--bpw 3.0]     (QUANTMIX_CACHE must hold fixtures/tokenizers/smollm2-v1)
Writes $OUT/exl3-tiny.json (per model: bpw, KLD, top-1 agreement) and the converted model's config.json,
quantization_config.json and safetensors header (exl3-tiny-*.json) for tests/test_exl3.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def convert(hf: Path, out: Path, work: Path, extra: list[str]) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "exllamav3.conversion.convert_model", "-i", str(hf), "-o", str(out), "-w",
           str(work), "-cr", "16", "-cc", "256", *extra]
    print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout[-3000:], r.stderr[-3000:], flush=True)
    if r.returncode != 0 or not (out / "config.json").exists():
        raise SystemExit(f"convert failed: rc {r.returncode}")
    return time.perf_counter() - t0


def exl3_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from exllamav3 import Config, Model
    cfg = Config.from_directory(str(model_dir))
    model = Model.from_config(cfg)
    model.load("cuda:0")
    with torch.inference_mode():
        y = model.forward(ids, {"attn_mode": "flash_attn_nc"}).float()
    model.unload()
    return y


def kld(ref: torch.Tensor, q: torch.Tensor) -> dict:
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(q.double(), -1)
    k = (lp.exp() * (lp - lq)).sum(-1)
    kr = (lq.exp() * (lq - lp)).sum(-1)
    return {"kld": float(k.mean()), "kld_reverse": float(kr.mean()),
            "top1": float((ref.argmax(-1) == q.argmax(-1)).double().mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--work", default="/tmp/exl3-tiny")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmix.fixtures.tiny import build_tiny
    from quantmix.formats.exl3 import exl3_model, read_exl3_dir
    from quantmix.measurement.exl3_measure import measure_exl3
    from quantmix.planning.exl3_plan import plan_exl3, write_exl3_recipe
    hf = work / "hf"
    if not (hf / "config.json").exists():
        build_tiny("tiny-llama", hf, seed=0, vocab=True)
    t0 = time.perf_counter()
    meas = measure_exl3(hf, work / "meas.json", progress=False)
    t_meas = time.perf_counter() - t0
    plan = plan_exl3(exl3_model(hf), meas, target_bpw=args.bpw)
    print(plan.summary(), flush=True)
    recipe = write_exl3_recipe(plan, work / "recipe.yaml", args.bpw)
    results: dict = {"bpw_target": args.bpw, "measure_seconds": round(t_meas, 2), "plan": plan.summary()}
    dirs = {"quantmix": (work / "q-quantmix", ["--recipe", str(recipe)]),
            "exllamav3": (work / "q-exllamav3", ["--bits", str(args.bpw)])}
    for name, (d, extra) in dirs.items():
        if not (d / "config.json").exists():
            results[f"{name}_convert_seconds"] = round(convert(hf, d, work / f"w-{name}", extra), 1)
    tok = AutoTokenizer.from_pretrained(str(hf))
    text = Path("README.md").read_text() + Path("BENCHMARKS.md").read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :512 * 8].reshape(-1, 512)[:, :512]
    ref_model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).cuda().eval()
    with torch.inference_mode():
        ref = ref_model(ids.cuda()).logits.float()
    for name, (d, _e) in dirs.items():
        qc, linears = read_exl3_dir(d)
        got = {s.key: s.rate for s in linears}
        entry = {"bits": qc.get("bits"), "head_bits": qc.get("head_bits"),
                 "rates": {str(r): sum(1 for v in got.values() if v == r) for r in sorted(set(got.values()))}}
        if name == "quantmix":
            entry["recipe_matches"] = all(got.get(k) == v for k, v in plan.rates.items() if k != "lm_head")
        try:
            q = exl3_logits(d, ids)
            entry.update(kld(ref.reshape(q.shape), q))
        except Exception as e:  # the figures of the other model still count
            entry["error"] = f"{type(e).__name__}: {e}"
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
        for f in ("config.json", "quantization_config.json"):
            if name == "quantmix" and (d / f).exists():
                (out / f"exl3-tiny-{name}-{f}").write_text((d / f).read_text())
        st = sorted(d.glob("*.safetensors"))[0]
        with open(st, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            (out / f"exl3-tiny-{name}-header.json").write_bytes(fh.read(n))
    (out / "exl3-tiny.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
