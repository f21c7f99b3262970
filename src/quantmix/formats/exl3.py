"""EXL3 (ExLlamaV3's trellis format) as stored: the bitrates, the bytes of a quantized linear, and a reader of the
model directories exllamav3 writes.

The numerics stay exllamav3's own (``quantize_exl3`` on a GPU); this module knows only the layout, so planning
and checking run on any machine. A linear of ``in`` x ``out`` features quantized at K bits per weight is stored
(exllamav3 1.6, ``modules/quant/exl3.py``) as
  ``trellis`` int16 [in/16, out/16, 16*K]  (one 16x16 tile of 256 weights in 16*K words),
  ``suh`` fp16 [in], ``svh`` fp16 [out]      (the random Hadamard sign vectors, with their scales),
  ``mul1`` / ``mcg`` int32 scalar           (the codebook marker; none for 3INST), ``bias`` fp16 [out] if any.
K is 1..8, or 1.5 / 2.5 / 3.5 with the mul1 codebook; 16 means the linear is kept unquantized in fp16.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RATES", "HALF_RATES", "Exl3Error", "parse_rate", "linear_bytes", "StoredLinear", "read_exl3_dir",
           "check_rate", "Exl3Linear", "Exl3Model", "exl3_model"]

HALF_RATES: tuple[float, ...] = (1.5, 2.5, 3.5)
RATES: tuple[float, ...] = tuple(sorted((1, 2, 3, 4, 5, 6, 7, 8) + HALF_RATES))
UNQUANTIZED = 16
TILE = 16


class Exl3Error(ValueError):
    """An EXL3 file, rate or recipe that exllamav3 would not accept; the message names the file and tensor."""


def parse_rate(text: str | float | int) -> float:
    """A bitrate as exllamav3 takes it (``--bits 4``, a recipe's ``2.5``), as a number; 16 = unquantized."""
    try:
        r = float(text)
    except (TypeError, ValueError):
        raise Exl3Error(f"EXL3 bitrate {text!r} is not a number") from None
    if r != UNQUANTIZED and r not in RATES:
        raise Exl3Error(f"EXL3 bitrate {text!r}: exllamav3 takes 1-8, 1.5/2.5/3.5 (mul1 codebook) or 16")
    return int(r) if r.is_integer() else r


def check_rate(rate: float, codebook: str = "mul1") -> None:
    """Half-integer rates exist only with the mul1 codebook (exllamav3's kernels have no others)."""
    if rate in HALF_RATES and codebook != "mul1":
        raise Exl3Error(f"EXL3 bitrate {rate} needs the mul1 codebook (this job uses {codebook})")


def linear_bytes(in_features: int, out_features: int, rate: float, *, bias: bool = False,
                 codebook: str = "mul1") -> int:
    """Bytes of one linear stored at ``rate`` as exllamav3 writes it (trellis, sign vectors, marker, bias);
    rate 16 is the fp16 weight. The trellis needs both dimensions in whole 16-wide tiles."""
    rate = parse_rate(rate)
    b = 2 * out_features if bias else 0
    if rate == UNQUANTIZED:
        return 2 * in_features * out_features + b
    if in_features % TILE or out_features % TILE:
        raise Exl3Error(f"a {in_features}x{out_features} linear does not tile into 16x16 EXL3 tiles")
    check_rate(rate, codebook)
    words = round(TILE * rate)  # int16 words per 256-weight tile
    trellis = (in_features // TILE) * (out_features // TILE) * words * 2
    marker = 4 if codebook in ("mul1", "mcg") else 0
    return trellis + 2 * in_features + 2 * out_features + marker + b


@dataclass(frozen=True)
class StoredLinear:
    """One module of an EXL3 directory as stored: its key, features, bitrate and bytes on disk."""

    key: str
    in_features: int
    out_features: int
    rate: float
    n_bytes: int
    codebook: str
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


def _headers(model_dir: Path) -> dict[str, tuple[str, dict]]:
    """name -> (file, {"shape", "dtype"}) over every shard of ``model_dir``, from the safetensors headers (through
    the safetensors library's lazy slices: no tensor data is read)."""
    from safetensors import safe_open
    out: dict[str, tuple[str, dict]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise Exl3Error(f"{model_dir}: no .safetensors files")
    for f in files:
        try:
            with safe_open(str(f), "np") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    out[name] = (f.name, {"shape": list(sl.get_shape()), "dtype": sl.get_dtype()})
        except Exception as e:  # safetensors raises its own SafetensorError (or OSError) on a damaged file
            raise Exl3Error(f"{f}: not a readable safetensors file ({e})") from None
    return out


_DTYPE_BYTES = {"I16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I8": 1, "U8": 1}


def _nbytes(entry: dict) -> int:
    return math.prod(entry["shape"]) * _DTYPE_BYTES.get(entry["dtype"], 0)


def read_exl3_dir(model_dir: str | Path) -> tuple[dict, list[StoredLinear]]:
    """The ``quantization_config`` and every quantized linear of an EXL3 model directory, each checked against the
    layout (trellis rank and tile width, sign vectors' lengths and dtypes). Raises Exl3Error naming the tensor."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Exl3Error(f"{cfg_path}: {e}") from None
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "exl3":
        raise Exl3Error(f"{cfg_path}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'exl3'")
    heads = _headers(d)
    out = []
    for name in sorted(n for n in heads if n.endswith(".trellis")):
        key = name[: -len(".trellis")]
        fname, tr = heads[name]
        where = f"{d / fname}: {name}"
        if tr["dtype"] != "I16" or len(tr["shape"]) != 3:
            raise Exl3Error(f"{where}: trellis must be int16 of rank 3, is {tr['dtype']} {tr['shape']}")
        tk, tn, words = tr["shape"]
        rate = words / TILE
        rate = int(rate) if rate.is_integer() else rate
        if rate not in RATES:
            raise Exl3Error(f"{where}: {words} words per tile is no EXL3 bitrate")
        parts = {}
        for sub, length in (("suh", TILE * tk), ("svh", TILE * tn)):
            if f"{key}.{sub}" in heads:
                e = heads[f"{key}.{sub}"][1]
                if e["dtype"] != "F16" or e["shape"] != [length]:
                    raise Exl3Error(f"{d / heads[f'{key}.{sub}'][0]}: {key}.{sub} must be fp16 [{length}], "
                                    f"is {e['dtype']} {e['shape']}")
                parts[sub] = e
            elif f"{key}.{sub[:2]}" in heads:  # packed int16 sign bits
                parts[sub] = heads[f"{key}.{sub[:2]}"][1]
            else:
                raise Exl3Error(f"{where}: {key}.{sub} (or packed {key}.{sub[:2]}) is missing")
        codebook = "mul1" if f"{key}.mul1" in heads else "mcg" if f"{key}.mcg" in heads else "3inst"
        if rate in HALF_RATES and codebook != "mul1":
            raise Exl3Error(f"{where}: half-integer rate {rate} without the mul1 marker")
        extras = [heads[f"{key}.{s}"][1] for s in ("bias", "mul1", "mcg") if f"{key}.{s}" in heads]
        n_bytes = _nbytes(tr) + sum(_nbytes(e) for e in parts.values()) + sum(_nbytes(e) for e in extras)
        out.append(StoredLinear(key, TILE * tk, TILE * tn, rate, n_bytes, codebook, f"{key}.bias" in heads))
    if not out:
        raise Exl3Error(f"{d}: no EXL3 tensors (*.trellis) in the safetensors files")
    return qc, out


# ------------------------------------------------------------------------------------------ a checkpoint's linears

_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings)\.weight$")
_ROUTER = re.compile(r"\.(mlp\.gate|router|block_sparse_moe\.gate|shared_expert_gate)$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Exl3Linear:
    """A linear exllamav3 quantizes: its module key (the checkpoint's name without ``.weight``), features and
    role: ``bits`` (budgeted), ``head_bits`` (the output head), ``mtp_bits`` (NextN/MTP layers) or ``fp16``
    (MoE routers and linears that do not tile into 16x16, kept unquantized)."""

    key: str
    in_features: int
    out_features: int
    role: str
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def n_bytes(self, rate: float, codebook: str = "mul1") -> int:
        return linear_bytes(self.in_features, self.out_features, rate, bias=self.bias, codebook=codebook)


@dataclass
class Exl3Model:
    """The linears of a checkpoint and what else exllamav3 keeps: fp16 norms (VRAM), the embedding (system RAM)."""

    model_dir: Path
    linears: list[Exl3Linear]
    other_vram_bytes: int
    embedding_bytes: int
    config: dict = field(default_factory=dict)

    def budgeted(self) -> list[Exl3Linear]:
        return [m for m in self.linears if m.role == "bits"]


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def exl3_model(model_dir: str | Path) -> Exl3Model:
    """The EXL3 view of a Hugging Face directory, from its safetensors headers alone (no weight is read): every 2-D
    ``*.weight`` that is not an embedding is a linear [out, in]; FP8 scale tensors are skipped."""
    d = Path(model_dir)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Exl3Error(f"{d / 'config.json'}: {e}") from None
    tc = _text_config(cfg)
    n_layers = int(tc.get("num_hidden_layers", 0))
    heads = _headers(d)
    linears, other, embed = [], 0, 0
    for name, (_f, e) in sorted(heads.items()):
        shape = e["shape"]
        if not name.endswith(".weight") or _EMBED.search(name):
            if _EMBED.search(name):
                embed += 2 * math.prod(shape)
            elif not re.search(r"(scale_inv|_scale|scales)$", name) and not name.endswith(".bias"):
                other += 2 * math.prod(shape)
            continue
        if len(shape) != 2:
            other += 2 * math.prod(shape)  # norms, stored fp16 by exllamav3
            continue
        key = name[: -len(".weight")]
        m = _LAYER.search(name)
        if _ROUTER.search(key) or shape[0] % 16 or shape[1] % 16:
            role = "fp16"  # MoE routers and linears that do not tile stay unquantized, as exllamav3 keeps them
        elif key.endswith("lm_head"):
            role = "head_bits"
        else:
            role = "mtp_bits" if m and int(m.group(1)) >= n_layers > 0 else "bits"
        linears.append(Exl3Linear(key, shape[1], shape[0], role, f"{key}.bias" in heads))
    if not any(m.role == "head_bits" for m in linears):
        emb = next(((n, e) for n, (_f, e) in heads.items() if _EMBED.search(n)), None)
        if emb is not None:  # tied: exllamav3 writes a separate lm_head from the embedding
            linears.append(Exl3Linear("lm_head", emb[1]["shape"][1], emb[1]["shape"][0], "head_bits"))
    if not any(m.role == "bits" for m in linears):
        raise Exl3Error(f"{d}: no linear weights found in the safetensors files")
    return Exl3Model(d, linears, other, embed, cfg)
