"""Reading FP8 (block-scaled), compressed-tensors and MXFP4 checkpoints as the float weights they stand for.

A tiny DeepSeek-V3 is built in code and cast to BF16; quantized copies are made from it as the releases are
made (DeepSeek-V3 / GLM-4.6-FP8 / Qwen3-FP8: float8_e4m3fn weights, float32 ``weight_scale_inv`` = amax/448
per 128x128 block, norms / embeddings / router / lm_head left in BF16, two shards and an index;
compressed-tensors: ``weight`` + ``weight_scale``; gpt-oss: MXFP4 experts as ``*_blocks`` + ``*_scales``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantmix.calibration.imatrix import compute_imatrix_tokens
from quantmix.calibration.imatrix_io import ImatrixError
from quantmix.fixtures.tiny import build_tiny
from quantmix.model.checkpoint import Checkpoint, CheckpointError, load_float_model, mxfp4_to_float

FP8_MAX = 448.0
B = 128  # weight_block_size

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [B, B]}

# relative Frobenius error of one tensor after FP8 e4m3 rounding (3 mantissa bits); measured on the 48 FP8
# tensors of the tiny DeepSeek-V3: 0.0263-0.0268 with 128x128 block scales, 0.0259-0.0264 per channel
FP8_REL = 0.04


def _ct_config(strategy: str) -> dict:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "group_size": None, "block_structure": [B, B] if strategy == "block" else None}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                                "dynamic": True, "symmetric": True}}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


# ------------------------------------------------------------------------------------------------ builders


def _quantized(name: str, t: torch.Tensor) -> bool:
    """What the FP8 releases quantize: the linear layers' weights, not embeddings, norms, router or lm_head."""
    return (t.dim() == 2 and name.endswith(".weight") and "norm" not in name and "embed_tokens" not in name
            and not name.startswith("lm_head") and not name.endswith("mlp.gate.weight"))


def fp8_blocks(w: torch.Tensor, block: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and float32 scale (amax/448) per block x block tile; edge tiles partial."""
    rows, cols = w.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    pad = torch.zeros(nr * block, nc * block)
    pad[:rows, :cols] = w.float()
    tiles = pad.view(nr, block, nc, block)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nr * block, nc * block)[:rows, :cols].contiguous(), scale


def fp8_per_channel(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' channel strategy: one scale per output row, shape [rows, 1]."""
    amax = w.float().abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def blockwise_reference(q: torch.Tensor, scale: torch.Tensor, block: int = B) -> torch.Tensor:
    """fp8 value x the scale of its block, tile by tile (independent of the reader's broadcasting)."""
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[tile] = q[tile].float() * scale[i, j].float()
    return out


def _write_config(src: Path, dst: Path, qc: dict | None, dtype: str | None = None) -> None:
    cfg = json.loads((src / "config.json").read_text())
    if qc is not None:
        cfg["quantization_config"] = qc
    if dtype is not None:
        cfg["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, n_shard: int) -> None:
    """Shards and a model.safetensors.index.json, as releases ship them."""
    names = sorted(tensors)
    per = math.ceil(len(names) / n_shard)
    wmap = {}
    for s in range(n_shard):
        fname = f"model-{s + 1:05d}-of-{n_shard:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[s * per:(s + 1) * per]}
        save_file(part, out / fname, metadata={"format": "pt"})
        wmap.update(dict.fromkeys(part, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def _trained_like(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Weights at a trained model's scale (unit norms, 1/sqrt(fan_in) linears, the residual branches' output
    projections x0.2 as deep-init schemes do, logits of std ~4: entropy about 2 nats), so that outputs are
    peaked and weight errors show in the KLD (the tiny fixture's 0.02 everywhere, norms included, gives
    near-uniform outputs whatever the weights; without the residual scaling the random MoE is chaotic)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sorted(tensors.items()):
        r = torch.randn(v.shape, generator=gen)
        if "norm" in k:
            out[k] = 1 + 0.1 * r
        elif "embed_tokens" in k:
            out[k] = r
        elif k.startswith("lm_head"):
            out[k] = r * 4 / math.sqrt(v.shape[1])
        elif v.dim() == 2:
            out[k] = r / math.sqrt(v.shape[1]) * (0.2 if k.endswith(("o_proj.weight", "down_proj.weight")) else 1)
        else:
            out[k] = v  # router score bias: zeros
    return out


def make_bf16(name: str, out: Path) -> Path:
    """A tiny random model (quantmix.fixtures.tiny) at a trained model's scale, cast to BF16 as releases are."""
    build_tiny(name, out, seed=0)
    f = out / "model.safetensors"
    tensors = _trained_like(load_file(f), seed=0)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, f, metadata={"format": "pt"})
    _write_config(out, out, None, "bfloat16")
    return out


def make_fp8(src: Path, out: Path) -> Path:
    """DeepSeek-V3-style FP8 copy: weight float8_e4m3fn + weight_scale_inv float32 per 128x128 block."""
    out.mkdir(parents=True)
    tensors = {}
    for k, v in load_file(src / "model.safetensors").items():
        if _quantized(k, v):
            tensors[k], tensors[k + "_scale_inv"] = fp8_blocks(v)
        else:
            tensors[k] = v
    _save_sharded(tensors, out, 2)
    _write_config(src, out, FP8_CONFIG)
    return out


def make_compressed(src: Path, out: Path, strategy: str) -> Path:
    """compressed-tensors float-quantized copy: weight float8_e4m3fn + weight_scale (channel or block)."""
    out.mkdir(parents=True)
    tensors = {}
    for k, v in load_file(src / "model.safetensors").items():
        if _quantized(k, v):
            q, s = fp8_per_channel(v) if strategy == "channel" else fp8_blocks(v)
            tensors[k], tensors[k.removesuffix("weight") + "weight_scale"] = q, s
        else:
            tensors[k] = v
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _write_config(src, out, _ct_config(strategy))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    bf16 = make_bf16("tiny-deepseek-v3", root / "bf16")
    return {"bf16": bf16, "fp8": make_fp8(bf16, root / "fp8"),
            "ct-channel": make_compressed(bf16, root / "ct-channel", "channel"),
            "ct-block": make_compressed(bf16, root / "ct-block", "block")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _stored(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# ------------------------------------------------------------------------------------------------ (a) reader


def test_fp8_reader_is_value_times_block_scale(dirs: dict[str, Path]) -> None:
    ref = Checkpoint(dirs["bf16"])
    ck = Checkpoint(dirs["fp8"])
    stored = _stored(dirs["fp8"])
    assert ck.keys() == ref.keys()  # *_scale_inv hidden, every weight under its own name
    assert not any(k.endswith("_scale_inv") for k in ck.keys())
    n_fp8 = 0
    for k in ck.keys():
        got = ck.get(k)
        if k + "_scale_inv" in stored:
            n_fp8 += 1
            assert stored[k].dtype == torch.float8_e4m3fn
            assert got.dtype == torch.float32
            assert torch.equal(got, blockwise_reference(stored[k], stored[k + "_scale_inv"])), k
            assert _rel(got, ref.get(k).float()) < FP8_REL, k
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, ref.get(k)), k
    assert n_fp8 == 3 * 5 + 2 * (4 * 3 + 3) + 3  # attention x3 layers, experts + shared, dense MLP


def test_fp8_partial_edge_blocks(tmp_path: Path) -> None:
    """Scale grid ceil(rows/128) x ceil(cols/128): the right and bottom tiles are cropped, not stretched."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=gen) * 0.02
    q, s = fp8_blocks(w)
    assert tuple(s.shape) == (2, 3)
    save_file({"x.weight": q, "x.weight_scale_inv": s}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": FP8_CONFIG}))
    got = Checkpoint(tmp_path).get("x.weight")
    assert torch.equal(got, blockwise_reference(q, s))
    assert _rel(got, w) < FP8_REL
    # a scale grid that does not fit the weight is an error, not a broadcast
    save_file({"x.weight": q, "x.weight_scale_inv": s[:, :2].contiguous()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"x.weight_scale_inv.*does not fit weight \[200, 300\]"):
        Checkpoint(tmp_path).get("x.weight")


@pytest.mark.parametrize("strategy", ["channel", "block"])
def test_compressed_tensors_reader(dirs: dict[str, Path], strategy: str) -> None:
    ref = Checkpoint(dirs["bf16"])
    ck = Checkpoint(dirs[f"ct-{strategy}"])
    stored = _stored(dirs[f"ct-{strategy}"])
    assert ck.keys() == ref.keys()
    worst = 0.0
    for k in ck.keys():
        scale = k.removesuffix("weight") + "weight_scale"
        if scale not in stored:
            continue
        got = ck.get(k)
        if strategy == "channel":
            want = stored[k].float() * stored[scale].float()  # [rows, cols] x [rows, 1]
        else:
            want = blockwise_reference(stored[k], stored[scale])
        assert torch.equal(got, want), k
        worst = max(worst, _rel(got, ref.get(k).float()))
    assert 0 < worst < FP8_REL


def test_compressed_tensors_per_tensor(tmp_path: Path) -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    scale = (w.abs().max() / FP8_MAX).reshape(1)
    q = (w / scale).to(torch.float8_e4m3fn)
    save_file({"x.weight": q, "x.weight_scale": scale, "x.input_scale": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": _ct_config("tensor")}))
    ck = Checkpoint(tmp_path)
    assert ck.keys() == ["x.weight"]  # weight_scale and input_scale hidden
    assert torch.equal(ck.get("x.weight"), q.float() * scale)


# ------------------------------------------------------------------------------------------------ (b) imatrix


def test_imatrix_of_fp8_copy_matches_bf16(dirs: dict[str, Path]) -> None:
    chunks = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(3))
    ref = compute_imatrix_tokens(dirs["bf16"], chunks, device="cpu", progress=False)
    got = compute_imatrix_tokens(dirs["fp8"], chunks, device="cpu", progress=False)
    assert sorted(got.entries) == sorted(ref.entries)
    errs = {n: _rel(torch.from_numpy(got.entries[n].sums), torch.from_numpy(ref.entries[n].sums)) for n in ref.entries}
    dense = max(v for n, v in errs.items() if "_exps" not in n)
    experts = max(v for n, v in errs.items() if "_exps" in n)
    # measured at this seed: dense 0.021, experts 0.039 (seeds 3-17: at most 0.032 and 0.064); experts move
    # more because a few tokens change expert when the weights carry FP8 rounding
    assert dense < 0.05 and experts < 0.1, (dense, experts)
    # layer 0's first projections see the embeddings through a norm, both kept in BF16: identical statistics
    first = [n for n in errs if n.startswith(("blk.0.attn_q_a.", "blk.0.attn_kv_a_mqa."))]
    assert len(first) == 2 and all(errs[n] == 0 for n in first), {n: errs[n] for n in first}


# ------------------------------------------------------------------------------------------------ (c) model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean over tokens of KL(P_ref || P_got), llama-perplexity's direction."""
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


IDS = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(4))


def test_load_float_model_plain_equals_from_pretrained(dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(dirs["bf16"], dtype=torch.float32).eval()
    got = load_float_model(dirs["bf16"])
    rs, gs = ref.state_dict(), got.state_dict()
    assert sorted(rs) == sorted(gs)
    for k in rs:
        assert rs[k].dtype == gs[k].dtype and torch.equal(rs[k], gs[k]), k
    assert torch.equal(_logits(ref, IDS), _logits(got, IDS))


@pytest.mark.parametrize("kind", ["fp8", "ct-channel"])
def test_load_float_model_quantized(dirs: dict[str, Path], kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = load_float_model(dirs[kind])
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    # oracle: transformers' own loader on a plain float32 checkpoint of the reader's tensors
    ck = Checkpoint(dirs[kind])
    plain = tmp_path / "dequantized"
    plain.mkdir()
    save_file({k: ck.get(k).float().contiguous() for k in ck.keys()}, plain / "model.safetensors")
    _write_config(dirs["bf16"], plain, None, "float32")
    oracle = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    os_, ms = oracle.state_dict(), model.state_dict()
    assert sorted(os_) == sorted(ms) and all(torch.equal(os_[k], ms[k]) for k in os_)
    got = _logits(model, IDS)
    assert torch.equal(got, _logits(oracle, IDS))
    # against the BF16 original: FP8 rounding alone separates them
    ref = _logits(AutoModelForCausalLM.from_pretrained(dirs["bf16"], dtype=torch.float32).eval(), IDS)
    kl = _kl(ref, got)
    # measured at this seed: fp8 2.0e-3, compressed-tensors channel 3.8e-3; 13 seeds: 2e-3 to 1.5e-2 (a few
    # tokens whose experts change dominate); outputs have entropy about 2 nats
    assert 0 < kl < 0.02, kl
    assert float((ref.argmax(-1) == got.argmax(-1)).double().mean()) > 0.9


# ------------------------------------------------------------------------------------------------ (d) dtypes


@pytest.mark.parametrize("dtype,qc,why", [
    (torch.float8_e5m2, None, "float8_e5m2 \\[8, 32\\]: float8 without a scale tensor"),
    (torch.float8_e4m3fn, FP8_CONFIG, "float8_e4m3fn \\[8, 32\\]: float8 without a scale tensor"),
    (torch.int32, None, "int32 \\[8, 32\\]: not a float weight"),
])
def test_unreadable_dtype_is_a_clear_error(tmp_path: Path, dtype: torch.dtype, qc: dict | None, why: str) -> None:
    w = (torch.randn(8, 32) * 10).to(dtype)
    save_file({"x.weight": w, "y.weight": torch.zeros(4, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc} if qc else {}))
    ck = Checkpoint(tmp_path)
    assert ck.get("y.weight").dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor 'x.weight' is {why}"):
        ck.get("x.weight")


def test_unread_quant_method_and_imatrix_error_type(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "gptq"
    shutil.copytree(dirs["bf16"], d)
    _write_config(d, d, {"quant_method": "gptq", "bits": 4})
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not read"):
        Checkpoint(d)
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not read"):
        load_float_model(d)
    with pytest.raises(ImatrixError, match="quant_method 'gptq' is not read"):  # the imatrix API's own type
        compute_imatrix_tokens(d, torch.zeros(1, 8, dtype=torch.long), device="cpu", progress=False)


# ------------------------------------------------------------------------------------------------ (e) files


def test_truncated_or_missing_shard_names_the_file(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "fp8"
    shutil.copytree(dirs["fp8"], d)
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: not a readable safetensors "
                                              r"file, truncated or corrupt"):
        Checkpoint(d)
    with pytest.raises(ImatrixError, match="model-00002-of-00002.safetensors: not a readable"):
        compute_imatrix_tokens(d, torch.zeros(1, 8, dtype=torch.long), device="cpu", progress=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: safetensors shard missing"):
        Checkpoint(d)
    single = tmp_path / "single"
    shutil.copytree(dirs["bf16"], single)
    f = single / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="single/model.safetensors: not a readable"):
        Checkpoint(single)


# ------------------------------------------------------------------------------------------------ MXFP4


_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., cols] float -> (blocks uint8 [..., cols/32, 16], scales uint8 e8m0 [..., cols/32]): per 32
    elements the smallest power of two that puts the block's amax within e2m1's 6, values rounded to nearest."""
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = x.abs().amax(-1).clamp(min=2.0 ** -126)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    y = x / torch.exp2(e).unsqueeze(-1)
    mag = (y.abs().unsqueeze(-1) - _FP4).abs().argmin(-1)
    code = (mag + 8 * (y < 0)).to(torch.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (e + 127).to(torch.uint8).contiguous()


def _gpt_oss_config():  # noqa: ANN202 - transformers config
    from transformers import GptOssConfig

    cfg = GptOssConfig(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                       vocab_size=512, max_position_embeddings=512, sliding_window=128, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    cfg.architectures = ["GptOssForCausalLM"]
    return cfg


def test_mxfp4_gpt_oss_experts(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(_gpt_oss_config(), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    tensors = {}
    for k, v in sd.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            # the release's layout: [E, out, in/32, 16], the transpose of the in-memory [E, in, out]
            tensors[k + "_blocks"], tensors[k + "_scales"] = mxfp4_quantize(v.transpose(1, 2))
        else:
            tensors[k] = v
    d = tmp_path / "mxfp4"
    d.mkdir()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(d)
    _write_config(d, d, {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                            "model.layers.*.mlp.router",
                                                                            "model.embed_tokens", "lm_head"]})
    ck = Checkpoint(d)
    assert ck.keys() == sorted(sd)  # blocks/scales hidden, each expert tensor under its parameter's name
    for k in ck.keys():
        got = ck.get(k)
        if k + "_blocks" in tensors:
            want = convert_moe_packed_tensors(tensors[k + "_blocks"], tensors[k + "_scales"], dtype=torch.float32)
            assert got.shape == sd[k].shape and torch.equal(got, want), k  # transformers' own dequantization
            assert _rel(got, sd[k].float()) < 0.2, k  # e2m1: 1 mantissa bit
        else:
            assert torch.equal(got, sd[k]), k
    loaded = load_float_model(d)
    # oracle: transformers' own loader, told to dequantize (what it does on a CPU without triton)
    oracle = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                  quantization_config=Mxfp4Config(dequantize=True)).eval()
    os_, ls = oracle.state_dict(), loaded.state_dict()
    assert sorted(os_) == sorted(ls) and all(torch.equal(os_[k], ls[k]) for k in os_)
    ids = IDS[:, :32]
    assert torch.equal(_logits(oracle, ids), _logits(loaded, ids))
    # byte 0x21: even element code 1 (0.5) in the low nibble, odd element code 2 (1.0); e8m0 128 = x2
    one = mxfp4_to_float(torch.full((1, 16), 0x21, dtype=torch.uint8), torch.tensor([128], dtype=torch.uint8))
    assert torch.equal(one[:2], torch.tensor([1.0, 2.0])) and one.shape == (32,)


def test_kld_probe_reads_the_dequantized_weights(dirs: dict[str, Path]) -> None:
    """KLDProbe (and evaluate, through the same load_float_model) hold the FP8 checkpoint's real weights."""
    from quantmix.measurement.kld_probe import KLDProbe

    chunks = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(6))
    probe = KLDProbe(dirs["fp8"], chunks, device="cpu")
    ck = Checkpoint(dirs["fp8"])
    assert torch.equal(probe.original("blk.1.attn_kv_a_mqa.weight"),
                       ck.get("model.layers.1.self_attn.kv_a_proj_with_mqa.weight"))
    assert probe.kld({"blk.1.attn_kv_a_mqa.weight": "Q4_0"}) > 0


def test_compressed_tensors_int8_channel(tmp_path: Path) -> None:
    """int-quantized (symmetric int8 per channel) is read the same way: weight x scale."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    scale = w.abs().amax(1, keepdim=True) / 127
    q = (w / scale).round().clamp(-127, 127).to(torch.int8)
    save_file({"x.weight": q, "x.weight_scale": scale}, tmp_path / "model.safetensors")
    qc = _ct_config("channel")
    qc["format"] = "int-quantized"
    qc["config_groups"]["group_0"]["weights"].update(type="int")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    got = Checkpoint(tmp_path).get("x.weight")
    assert torch.equal(got, q.float() * scale) and _rel(got, w) < 0.01


# ------------------------------------------------------------------------------------------------ error table

@pytest.mark.slow
def test_error_table_of_fp8_copy_matches_bf16(dirs: dict[str, Path], tmp_path: Path) -> None:
    """The error table reads the GGUF llama.cpp's converter writes, and the converter dequantizes FP8 itself
    (conversion/base.py dequant_model): its float weights equal this reader's exactly, and the errors of each
    type on the FP8 copy agree with the BF16 original's within what FP8 rounding moves them."""
    import subprocess
    import sys

    import numpy as np

    from quantmix.measurement.error_table import error_table
    from quantmix.model.gguf_header import read_gguf_header
    from quantmix.tools.llamacpp import ensure_llamacpp

    support = Path(__file__).parent / "support" / "convert_no_vocab.py"  # the tiny model has no tokenizer
    ggufs = {}
    for kind in ("bf16", "fp8"):
        ggufs[kind] = tmp_path / f"{kind}.gguf"
        subprocess.run([sys.executable, str(support), str(ensure_llamacpp().root), str(dirs[kind]), str(ggufs[kind])],
                       check=True, capture_output=True)
    header = read_gguf_header(ggufs["fp8"])
    data = np.memmap(ggufs["fp8"], dtype=np.uint8, mode="r")
    ck = Checkpoint(dirs["fp8"])
    t = next(t for t in header.tensors if t.name == "blk.1.attn_q_b.weight")
    raw = data[header.data_offsets[t.shard] + t.offset: header.data_offsets[t.shard] + t.offset + t.n_bytes]
    conv = torch.from_numpy(np.frombuffer(raw.tobytes(), dtype=np.float32).copy()).reshape(tuple(reversed(t.shape)))
    assert torch.equal(conv, ck.get("model.layers.1.self_attn.q_b_proj.weight").float())
    tabs = {k: error_table(g, None, ["Q4_K", "Q6_K"], device="cpu", cache=False, progress=False)
            for k, g in ggufs.items()}
    ref = {(r.tensor, r.type): r.rel_err for r in tabs["bf16"].rows}
    got = {(r.tensor, r.type): r.rel_err for r in tabs["fp8"].rows}
    assert got.keys() == ref.keys()
    moved = {k: abs(got[k] / ref[k] - 1) for k in ref if ref[k] > 0}
    # the FP8-rounded weights sit on a coarser grid: their Q4_K / Q6_K errors move by a few percent, no more
    # (measured: at most 6.4%, over 2 types x every quantizable tensor)
    assert max(moved.values()) < 0.15, max(moved.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_scales_float8_where_it_computes(dirs: dict[str, Path], dtype: torch.dtype) -> None:
    """The engine reads block-scaled float8 as stored (values + scales, a quarter of float32's bytes to pin and
    upload; the experts' per-expert tensors stacked as float8) and scales them when the layer is installed on
    the device: the same logits, bit for bit, as scaling on the host while reading."""
    from quantmix.model.checkpoint import ScaledTensor
    from quantmix.model.engine import LayerEngine
    from quantmix.model.weights import read_module

    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    out = {}
    for stored in (True, False):
        with LayerEngine(dirs["fp8"], "cpu", dtype, resident_bytes=0, stored_scales=stored) as eng:
            if stored:
                t = read_module(eng.layers[1], eng._prefix(1), eng.weights, dtype, stored=True)
                kept = {k for k, (v, _) in t.items() if isinstance(v, ScaledTensor)}
                assert any("experts" in k for k in kept) and len(kept) >= 5, sorted(kept)
                v = next(v for k, (v, _) in t.items() if "experts" in k and isinstance(v, ScaledTensor))
                assert v.values.dtype == torch.float8_e4m3fn and v.values.dim() == 3
                del t
            b = eng.batches(ids)
            out[stored] = torch.cat([eng.logits(h) for h in eng.forward_hidden(b)])
    assert torch.equal(out[True], out[False])
