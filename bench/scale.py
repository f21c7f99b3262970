"""Time and memory of quantmix's streamed phases at the real widths of the models its users quantize.

A synthetic checkpoint with the real shapes (random BF16 weights at a trained model's scale, the names and
per-expert layout of the release) is written for 1, 2 and 4 decoder layers; each phase runs in its own process
on it and reports wall time, the time it waited for layer reads, peak host RSS and peak GPU memory. Memory
that stays flat as layers are added, and time linear in them, is what lets the figures extrapolate to the
whole model (``--extrapolate``: the release's layer count, 2k calibration and 30k evaluation tokens).

    python bench/scale.py --preset glm46 --layers 1 2 4 --work /tmp/scale --out bench/results/scale-glm46.jsonl

Phases: ``imatrix`` (2,048 tokens), ``errortable`` (every quantizable tensor read from the safetensors, FP8
scaled, against the types of TABLE_TYPES, no cache), ``probes`` (the full per-tensor sensitivity profile: every
quantizable tensor alone at Q3_K on 2,048 calibration tokens, all advancing together), ``refine`` (a refinement
round: a whole Q4_K recipe as the base, its pass, then 8 moves measured breadth first), ``eval`` (a Q4_K recipe
against the float model on 4,096 tokens, llama.cpp's activation numerics, reference included). imatrix, probes,
refine and eval run on :class:`quantmix.model.engine.LayerEngine`. Not covered: the writer (its GGUF header comes
from llama.cpp's converter, which needs the release's tokenizer; a synthetic checkpoint has none).

``--preset dsv3`` writes DeepSeek-V3's float8 checkpoint (a layer is 11 GB of float8; run it with ``--dtype
bfloat16``: its 45 GB float32 layer leaves no room on an 80 GB GPU).
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
# DeepSeek-V3 (deepseek-ai/DeepSeek-V3 config.json), every layer an MoE layer (the release: 3 dense + 58 MoE +
# MTP), stored as the release stores it: float8_e4m3fn linear weights with a float32 scale_inv per 128x128 block
PRESETS["dsv3"] = {"full_layers": 61, "fp8_block": 128, "config": {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "first_k_dense_replace": 0, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_key_value_heads": 128, "num_nextn_predict_layers": 0, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "routed_scaling_factor": 2.5, "tie_word_embeddings": False, "topk_group": 4, "v_head_dim": 128,
    "vocab_size": 129280, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}}}
# the same layouts at toy widths, to try the script on a CPU in seconds
PRESETS["glm46-toy"] = {"full_layers": 92, "config": dict(
    PRESETS["glm46"]["config"], hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=32,
    n_routed_experts=8, num_attention_heads=8, num_key_value_heads=2, vocab_size=2048)}
PRESETS["dsv3-toy"] = {"full_layers": 61, "fp8_block": 128, "config": dict(
    PRESETS["dsv3"]["config"], hidden_size=256, intermediate_size=512, moe_intermediate_size=256, kv_lora_rank=128,
    q_lora_rank=128, n_routed_experts=8, n_group=2, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
    qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, vocab_size=2048)}
# candidate types of the error-table phase: the k-quants, Q8_0 and one codebook type (the GPU kernels' set)
ROUND = 8  # moves per refinement round in the refine phase
TABLE_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS"]


def _skeleton_params(cfg_dict: dict) -> tuple[object, list[tuple[str, tuple[int, ...]]]]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**cfg_dict)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    bufs = [(n, tuple(b.shape)) for n, b in model.named_buffers() if "e_score_correction_bias" in n]
    return cfg, params + bufs


def _fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """What the FP8 releases store in float8: the linear layers' weights (not embeddings, norms, router, head)."""
    return len(shape) == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight"))


def _fp8(w, block: int):  # noqa: ANN001, ANN202
    """float8_e4m3fn values and float32 scale_inv (amax / 448) per block x block tile (edge tiles partial)."""
    import torch
    import torch.nn.functional as F

    r, c = w.shape
    gr, gc = -(-r // block), -(-c // block)
    x = F.pad(w.float(), (0, gc * block - c, 0, gr * block - r))
    tiles = x.reshape(gr, block, gc, block)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.reshape(gr * block, gc * block)[:r, :c].contiguous().cpu(), scale.float().cpu()


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
    block = PRESETS[preset].get("fp8_block")

    def tensors_of(tensors: dict[str, tuple[int, ...]]) -> dict:
        out = {}
        for n, shp in tensors.items():
            if block and _fp8_weight(n, shp):
                w = (torch.randn(shp, generator=gen, device=dev, dtype=torch.float32) * 0.02)
                out[n], out[n + "_scale_inv"] = _fp8(w, block)
            else:
                out[n] = _random(n, shp, gen, dev)
        return out

    for key, tensors in groups.items():
        f = shards / f"{key}.safetensors"
        if not f.exists():
            t0 = time.time()
            save_file(tensors_of(tensors), str(f.with_suffix(".tmp")))
            f.with_suffix(".tmp").replace(f)
            print(f"wrote {f.name}: {f.stat().st_size / 2**30:.1f} GiB in {time.time() - t0:.0f} s", flush=True)
        for n, shp in tensors.items():
            where[n] = f.name
            if block and _fp8_weight(n, shp):
                where[n + "_scale_inv"] = f.name
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


def _fit(probe, name: str, qtype: str) -> str:  # noqa: ANN001
    """``qtype``, or Q8_0 where its 256-wide blocks do not divide the rows (MLA's attn_k_b / attn_v_b: 128),
    as llama.cpp falls back."""
    return qtype if probe._targets[name].info.shape[0] % 256 == 0 else "Q8_0"


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
            changes = [{n: _fit(probe, n, "Q3_K")} for n in names]
            out["cost"] = probe.cost(changes)
            t1 = time.time()
            kl = probe.kld_many(changes)
            out["probes_s"] = time.time() - t1
            out["n_probes"] = len(changes)
            out["mean_kld"] = float(sum(float(k.mean()) for k in kl) / len(kl))
        else:  # a refinement round: a whole recipe as the base, then a batch of moves measured together
            t1 = time.time()
            probe.set_base({n: _fit(probe, n, "Q4_K") for n in names})
            out["base_kld"] = probe.kld({})  # the base's own pass (records its layer inputs)
            out["set_base_s"] = time.time() - t1
            big = [n for n in names if "exps" in n] or names
            small = [n for n in names if n not in big] or names
            moves = [probe.changes_over_base({big[k % len(big)]: _fit(probe, big[k % len(big)], "Q3_K"),
                                              small[k % len(small)]: _fit(probe, small[k % len(small)], "Q5_K")})
                     for k in range(ROUND)]
            out["round_cost"] = probe.cost(moves)
            t2 = time.time()
            out["round_klds"] = [float(k.mean()) for k in probe.kld_many(moves)]
            out["round_s"] = time.time() - t2
            out["round_moves"] = len(moves)
        out["layer_reads"] = probe.engine.layer_reads
        out["read_wait_s"] = probe.engine.read_wait_s
        probe.close()
    elif name == "errortable":
        from quantmix.measurement.error_table import error_table

        table = error_table(model_dir, None, candidates=TABLE_TYPES, device=dev, cache=False, progress=False)
        out["entries"] = len(table.rows)
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


class RssSampler:
    """Peak anonymous and file-backed resident memory (/proc/self/status RssAnon, RssFile), sampled every 50 ms:
    ru_maxrss counts the checkpoint's memory-mapped pages too, which the kernel drops under pressure; the
    anonymous part is what a run really holds."""

    def __init__(self) -> None:
        import threading

        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _read(self) -> None:
        try:
            with open("/proc/self/status") as fh:
                for ln in fh:
                    if ln.startswith("RssAnon:"):
                        self.anon = max(self.anon, int(ln.split()[1]) / 2**20)
                    elif ln.startswith("RssFile:"):
                        self.file = max(self.file, int(ln.split()[1]) / 2**20)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._read()

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._t.join()
        self._read()
        return self.anon, self.file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm46", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--phases", nargs="+", default=["imatrix", "errortable", "probes", "refine", "eval"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantmix-scale"))
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per (layers, phase) here")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a phase may take")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        rss = RssSampler()
        rec = phase(a.phase, a.model, a.dtype)
        rec["peak_rss_anon_gib"], rec["peak_rss_file_gib"] = rss.stop()
        print("RESULT " + json.dumps(rec), flush=True)
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
