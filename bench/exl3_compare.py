"""quantmix's EXL3 mix against exllamav3's own measure + optimize and its uniform quants, on the lent GPU.

  bench/exl3_device.sh --compare [--uniform 2,3,4] [--bpw 3,2.5]          the tiny random Llama
  bench/exl3_device.sh --compare --gguf .exl3build/stash/smollm2.gguf       SmolLM2-135M (real weights)
The real model travels in parts (bench/pack_device.sh --exl3 writes .whl/parts; at most 64 MiB go with a call): for
each part, move it (the first with smollm2.gguf.sha256) into .whl/stash and run `bench/exl3_device.sh --stash` with
carry [".whl/exl3", ".whl/qmcache", ".whl/gguf-*.whl", ".whl/stash"] (the first) or [".whl/stash"]; the last part
can go with the --compare call itself. The machine must stay warm between the calls (30 s).

Model: a Hugging Face directory built there, from a GGUF of real weights (bench/smollm2_truncate.py) or the tiny
random Llama. Then:
  1. quantmix imatrix (wiki-calib), quantmix measure-exl3 --sensitivity (exllamav3's quantizer at every rate, KLD per
     unit of cost measured at rate 3 through quantmix's streaming engine);
  2. exllamav3 convert_model at the uniform --bits of --uniform (these are also the inputs of its optimizer), then
     exllamav3 measure_model over them and optimize_model at each --bpw;
  3. quantmix's plan at each --bpw (with the measured coefficients; --ablation: proxy-only too), and quantmix's exact
     plan over exllamav3's own measurement, each built by exllamav3's convert_model --recipe;
  4. every model through `quantmix eval --exl3` (evaluation.evaluate with exllamav3's logits against the streaming
     engine's float reference): KLD both ways, PPL, top-K agreement on wiki-eval tokens.
Writes $OUT/exl3-compare.json and prints one line per model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from exl3_tiny import convert  # noqa: E402


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], flush=True)
        raise SystemExit(f"failed: rc {r.returncode}: {' '.join(cmd[:4])}")
    return time.perf_counter() - t0


def build_from_gguf(gguf_path: Path, hf: Path) -> None:
    from safetensors.numpy import save_file

    from quantmix.fixtures.smollm2 import _base_config, _save_tokenizer, noisy_weights
    hf.mkdir(parents=True, exist_ok=True)
    weights, hp = noisy_weights(path=gguf_path)
    cfg = _base_config(gguf_path)
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", dtype="float32",
               tie_word_embeddings="lm_head.weight" not in weights,
               rms_norm_eps=float(hp["attention.layer_norm_rms_epsilon"]))
    (hf / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: weights[k] for k in sorted(weights)}, str(hf / "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(hf, gguf_path)


def model_bpw(d: Path) -> float:
    """Bits per weight over the decoder linears as stored (exllamav3's measure; the head not counted)."""
    from quantmix.formats.exl3 import read_exl3_dir
    _qc, linears = read_exl3_dir(d)
    body = [s for s in linears if s.key != "lm_head"]
    return sum(s.rate * s.numel for s in body) / sum(s.numel for s in body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--gguf", type=Path, help="real weights (bench/smollm2_truncate.py); default: the tiny Llama")
    ap.add_argument("--bpw", default="2.5,3,4")
    ap.add_argument("--rates", default="2,2.5,3,3.5,4,5,6", help="EXL3 rates quantmix measures and plans over")
    ap.add_argument("--ablation", action="store_true", help="also build the plan from the proxy costs alone")
    ap.add_argument("--uniform", default="2,3,4,5,6")
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--work", default=".exl3build/compare", help="kept between calls on a warm machine")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from quantmix.formats.exl3 import exl3_model
    from quantmix.measurement.exl3_measure import Measurement, measure_exl3
    from quantmix.planning.exl3_plan import plan_exl3, plan_from_exllamav3, write_exl3_recipe
    hf = work / "hf"
    if not (hf / "config.json").exists():
        if args.gguf:
            build_from_gguf(args.gguf, hf)
        else:
            from quantmix.fixtures.tiny import build_tiny
            build_tiny("tiny-llama", hf, seed=0, vocab=True)
    res: dict = {"model": str(args.gguf or "tiny-llama"), "seconds": {}}
    py = sys.executable
    im = work / "imatrix.gguf"
    if not im.exists():
        res["seconds"]["imatrix"] = round(run([py, "-m", "quantmix.cli", "imatrix", str(hf), "-o", str(im),
                                               "--chunks", "32"]), 1)
    t0 = time.perf_counter()
    from quantmix.formats.exl3 import parse_rate
    rates = tuple(parse_rate(r) for r in args.rates.split(","))
    meas = measure_exl3(hf, work / "meas.json", imatrix=im, rates=rates, sensitivity=True, progress=False)
    res["seconds"]["measure_exl3"] = round(time.perf_counter() - t0, 1)
    model = exl3_model(hf)
    proxy = Measurement(meas.costs, meas.source)
    from quantmix.evaluation.evaluate import evaluate, exl3_source
    res["models"] = {}
    keep = ("bpw", "size_bytes", "types", "kld", "kld_se", "kld_rev", "kld_p99", "ppl_q", "ppl_base", "top1", "top5",
            "n_tokens")

    def score(name: str, d: Path) -> None:
        """quantmix eval --exl3: exllamav3's logits against the streaming engine's float reference (cached)."""
        try:
            row = evaluate(hf, exl3_source(d, label=name), "wiki-eval", n_ctx=512, max_chunks=args.eval_chunks,
                           device="cuda").row()
            entry = {k: row[k] for k in keep if k in row}
        except Exception as e:  # the figures of the other models still count
            entry = {"bpw": round(model_bpw(d), 4), "error": f"{type(e).__name__}: {e}"}
        res["models"][name] = entry
        print(f"{name:28s} " + json.dumps(entry), flush=True)
        (out / "exl3-compare.json").write_text(json.dumps(res, indent=1))

    def build_and_score(name: str, plan: object, bpw: float) -> None:
        """exllamav3's convert_model --recipe from a quantmix plan, then the score."""
        tag = f"{name.replace(' ', '-')}-{bpw:g}"
        d = work / tag
        if not (d / "config.json").exists():
            recipe = write_exl3_recipe(plan, work / f"{tag}.yaml", bpw)
            res["seconds"][f"convert {name} {bpw:g}"] = round(convert(hf, d, work / f"w-{tag}",
                                                                      ["--recipe", str(recipe)]), 1)
        res.setdefault("plans", {})[f"{name} {bpw:g}"] = plan.summary()
        score(f"{name} {bpw:g}", d)

    uniform = [float(b) for b in args.uniform.split(",")]
    dirs: dict[str, Path] = {}
    for b in uniform:
        d = work / f"uniform-{b:g}"
        if not (d / "config.json").exists():
            res["seconds"][f"convert uniform {b:g}"] = round(convert(hf, d, work / f"w-u{b:g}", ["--bits", str(b)]), 1)
        dirs[f"exllamav3 uniform {b:g}"] = d
    for bpw in (float(b) for b in args.bpw.split(",")):  # quantmix first: the figure this bench is for
        for name, m in (("quantmix", meas), ("quantmix proxy-only", proxy))[:2 if args.ablation else 1]:
            build_and_score(name, plan_exl3(model, m, target_bpw=bpw, rates=rates), bpw)
        if bpw in uniform:
            score(f"exllamav3 uniform {bpw:g}", dirs[f"exllamav3 uniform {bpw:g}"])
    xmeas = work / "exllamav3-measurement.json"
    if not xmeas.exists():
        res["seconds"]["exllamav3 measure"] = round(run(
            [py, "-m", "exllamav3.conversion.measure_model", "-i", *[str(dirs[f"exllamav3 uniform {b:g}"])
                                                                    for b in uniform],
             "-r", str(hf), "-o", str(xmeas), "-cr", "16", "-cc", "256"]), 1)  # as convert's calibration
    for bpw in (float(b) for b in args.bpw.split(",")):
        d = work / f"exllamav3-opt-{bpw:g}"
        if not (d / "config.json").exists():
            res["seconds"][f"exllamav3 optimize {bpw:g}"] = round(run(
                [py, "-m", "exllamav3.conversion.optimize_model", "-m", str(xmeas), "-b", str(bpw), "-o", str(d)]), 1)
        score(f"exllamav3 optimize {bpw:g}", d)
        # the same measurement, solved exactly (exllamav3's optimizer is greedy and only upgrades)
        build_and_score("quantmix on exllamav3 measurement", plan_from_exllamav3(model, xmeas, bpw), bpw)
    for b in uniform:
        if f"exllamav3 uniform {b:g}" not in res["models"]:
            score(f"exllamav3 uniform {b:g}", dirs[f"exllamav3 uniform {b:g}"])
    (work / "meas.json").is_file() and (out / "exl3-measurement.json").write_text((work / "meas.json").read_text())
    (out / "exl3-compare.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
