"""Time and memory of quantmix's streamed phases at the real widths of the models its users quantize.

A synthetic checkpoint with the real shapes (random BF16 weights at a trained model's scale, the names and
per-expert layout of the release) is written for 1, 2 and 4 decoder layers; each phase runs in its own process
on it and reports wall time, the time it waited for layer reads, peak host RSS and peak GPU memory. Memory
that stays flat as layers are added, and time linear in them, is what lets the figures extrapolate to the
whole model (``--extrapolate``: the release's layer count, 2k calibration and 30k evaluation tokens).

    python bench/scale.py --preset glm46 --layers 1 2 4 --work /tmp/scale --out bench/results/scale-glm46.jsonl

Phases (all on :class:`quantmix.model.engine.LayerEngine`): ``imatrix`` (2,048 tokens), ``probes`` (the full
per-tensor sensitivity profile: every quantizable tensor alone at Q3_K on 2,048 calibration tokens, all advancing
together), ``refine`` (a refinement step: a whole recipe set as the base, then one move measured), ``eval``
(a Q4_K recipe against the float model on 4,096 tokens, llama.cpp's activation numerics, reference included).
Not covered yet: the error table and the writer, which still read an F32 GGUF (issue 16, item 3).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

PRESETS = {
    # GLM-4.6 (zai-org/GLM-4.6 config.json), every layer an MoE layer (the release: 3 dense + 89 MoE + NextN)
    "glm46": {"full_layers": 92, "config": {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
        "first_k_dense_replace": 0, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "intermediate_size": 12288, "max_position_embeddings": 202752, "moe_intermediate_size": 1536,
        "n_group": 1, "n_routed_experts": 160, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 96, "num_experts_per_tok": 8, "num_key_value_heads": 8,
        "num_nextn_predict_layers": 0, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000, "routed_scaling_factor": 2.5, "tie_word_embeddings": False, "topk_group": 1,
        "use_qk_norm": False, "vocab_size": 151552, "torch_dtype": "bfloat16"}},
}
# the same layout at toy widths, to try the script on a CPU in seconds
PRESETS["glm46-toy"] = {"full_layers": 92, "config": dict(
    PRESETS["glm46"]["config"], hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=32,
    n_routed_experts=8, num_attention_heads=8, num_key_value_heads=2, vocab_size=2048)}


def _skeleton_params(cfg_dict: dict) -> tuple[object, list[tuple[str, tuple[int, ...]]]]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**cfg_dict)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    bufs = [(n, tuple(b.shape)) for n, b in model.named_buffers() if "e_score_correction_bias" in n]
    return cfg, params + bufs


def _random(name: str, shape: tuple[int, ...], gen, dev):  # noqa: ANN001, ANN202
    import torch

    if name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias") or "e_score_correction_bias" in name:
        return torch.zeros(shape, dtype=torch.float32 if "e_score" in name else torch.bfloat16)
    return (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()


def build(preset: str, max_layers: int, work: Path) -> dict[int, Path]:
    """Write the shards once (one per layer, one for what is outside the layers) and a model folder per layer
    count whose index names the shards it uses (symbolic links)."""
    import torch
    from safetensors.torch import save_file

    from quantmix.model.catalog import checkpoint_tensors

    base = dict(PRESETS[preset]["config"], num_hidden_layers=max_layers)
    cfg, params = _skeleton_params(base)
    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in params:
        for _, part_shape, sources in checkpoint_tensors(cfg, [(name, shape)]):
            sub = part_shape[1:] if len(sources) > 1 else part_shape
            key = f"layer{name.split('.')[2]}" if name.startswith("model.layers.") else "outside"
            for s in sources:
                groups.setdefault(key, {})[s] = sub
    where: dict[str, str] = {}
    for key, tensors in groups.items():
        f = shards / f"{key}.safetensors"
        if not f.exists():
            t0 = time.time()
            save_file({n: _random(n, s, gen, dev) for n, s in tensors.items()}, str(f.with_suffix(".tmp")))
            f.with_suffix(".tmp").replace(f)
            print(f"wrote {f.name}: {f.stat().st_size / 2**30:.1f} GiB in {time.time() - t0:.0f} s", flush=True)
        for n in tensors:
            where[n] = f.name
    out = {}
    for n_layer in sorted({1, 2, 4, max_layers} & set(range(1, max_layers + 1))):
        d = work / f"{preset}-{n_layer}"
        d.mkdir(exist_ok=True)
        cfgd = dict(base, num_hidden_layers=n_layer)
        (d / "config.json").write_text(json.dumps(cfgd, indent=1))
        keep = {"outside"} | {f"layer{i}" for i in range(n_layer)}
        wmap = {n: f for n, f in where.items() if f.removesuffix(".safetensors") in keep}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        for f in set(wmap.values()):
            if not (d / f).exists():
                (d / f).symlink_to(shards / f)
        out[n_layer] = d
    return out


# ------------------------------------------------------------------------------------------------ phases


def _chunks(model_dir: Path, n: int):  # noqa: ANN202
    import torch

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (n, 512), generator=torch.Generator().manual_seed(1))


def _probe_names(probe) -> list[str]:  # noqa: ANN001
    skip = ("norm", "gate_inp", ".bias", "exp_probs_b")
    return [n for n in probe.tensor_names if not any(s in n for s in skip)]


def phase(name: str, model_dir: Path, dtype_name: str) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {}
    t0 = time.time()
    if name == "imatrix":
        from quantmix.calibration.imatrix import compute_imatrix_tokens

        im = compute_imatrix_tokens(model_dir, _chunks(model_dir, 4), device=dev, dtype=dtype, progress=False)
        out["entries"] = len(im.entries)
    elif name in ("probes", "refine"):
        from quantmix.measurement.kld_probe import KLDProbe

        probe = KLDProbe(model_dir, _chunks(model_dir, 4), device=dev, dtype=dtype)
        out["capture_s"] = time.time() - t0
        names = _probe_names(probe)
        if name == "probes":
            changes = [{n: "Q3_K"} for n in names]
            out["cost"] = probe.cost(changes)
            t1 = time.time()
            kl = probe.kld_many(changes)
            out["probes_s"] = time.time() - t1
            out["n_probes"] = len(changes)
            out["mean_kld"] = float(sum(float(k.mean()) for k in kl) / len(kl))
        else:
            t1 = time.time()
            probe.set_base({n: "Q4_K" for n in names})
            out["set_base_s"] = time.time() - t1
            t2 = time.time()
            out["kld"] = probe.kld_of_types({names[len(names) // 2]: "Q3_K"})
            out["move_s"] = time.time() - t2
        out["layer_reads"] = probe.engine.layer_reads
        out["read_wait_s"] = probe.engine.read_wait_s
        probe.close()
    elif name == "eval":
        from quantmix.evaluation.evaluate import evaluate_tokens, recipe_source
        from quantmix.evaluation.reference import EvalText
        from quantmix.planning.recipe import RecipeSpec, Rule

        spec = RecipeSpec(ftype=None, rules=[Rule(r"norm|gate_inp|bias", "F32"), Rule(".*", "Q4_K")], label="Q4_K")
        et = EvalText(_chunks(model_dir, 8), 256, False, "random tokens", "")
        res = evaluate_tokens(model_dir, recipe_source(spec), et, device=dev,
                              reference_cache=Path(os.environ.get("SCALE_WORK", "/tmp")) / "ref")
        out["kld"] = res.stats.kld
    else:
        raise SystemExit(f"unknown phase {name}")
    out["seconds"] = time.time() - t0
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm46", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--phases", nargs="+", default=["imatrix", "probes", "refine", "eval"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantmix-scale"))
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per (layers, phase) here")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a phase may take")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        print("RESULT " + json.dumps(phase(a.phase, a.model, a.dtype)), flush=True)
        return
    t0 = time.time()
    dirs = build(a.preset, max(a.layers), a.work)
    print(f"checkpoint ready in {time.time() - t0:.0f} s", flush=True)
    env = dict(os.environ, SCALE_WORK=str(a.work), PYTHONUNBUFFERED="1")
    for n_layer in a.layers:
        for ph in a.phases:
            cmd = [sys.executable, __file__, "--phase", ph, "--model", str(dirs[n_layer]), "--dtype", a.dtype]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                rec = json.loads(lines[-1][7:]) if lines else {"error": p.stderr[-1500:]}
            except subprocess.TimeoutExpired:
                rec = {"error": f"over {a.timeout} s"}
            rec = {"preset": a.preset, "layers": n_layer, "phase": ph, "dtype": a.dtype, **rec}
            print(json.dumps(rec), flush=True)
            if a.out is not None:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                with open(a.out, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
