"""The catalog from a config alone equals, name for name and shape for shape, what llama.cpp's converter writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantmix.fixtures.tiny import TINY_CONFIGS, get_tiny
from quantmix.model.catalog import CatalogError, catalog_from_config, catalog_from_gguf, load_catalog
from quantmix.model.gguf_header import GGUFHeaderError
from quantmix.paths import cache_dir

SUPPORT = Path(__file__).parent / "support" / "convert_no_vocab.py"


def _converted_tiny(llamacpp, name: str) -> Path:
    """llama.cpp's converter run on a tiny model (vocabulary skipped: the models have none). Cached."""
    out = cache_dir() / "fixtures" / "tiny" / f"{name}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(SUPPORT), str(llamacpp.root), str(get_tiny(name)), str(tmp)],
                       check=True, capture_output=True)
        tmp.replace(out)
    return out


def _config_only(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    return d / "config.json"


def _shapes(cat) -> dict[str, tuple[int, ...]]:
    return {t.name: t.shape for t in cat}


# Gemma 3's converter reads tokenizer.json even with the vocabulary step skipped: its structure is compared,
# with a real vocabulary, in tests/test_architectures.py (as every architecture's is)
@pytest.mark.parametrize("name", sorted(set(TINY_CONFIGS) - {"tiny-gemma3"}))
def test_tiny_catalog_equals_converter(llamacpp, tmp_path: Path, name: str) -> None:
    cat = catalog_from_config(_config_only(get_tiny(name), tmp_path))
    gguf_cat = catalog_from_gguf(_converted_tiny(llamacpp, name))
    assert _shapes(cat) == _shapes(gguf_cat)
    assert cat.hparams.arch == gguf_cat.hparams.arch
    assert cat.hparams.n_layer == gguf_cat.hparams.n_layer
    assert [t.quantizable for t in cat] == [gguf_cat.by_name()[t.name].quantizable for t in cat]


def test_catalog_classes_and_sources() -> None:
    cat = catalog_from_config(get_tiny("tiny-glm4-moe"))
    t = cat.by_name()
    assert cat.hparams.n_nextn == 1 and cat.hparams.n_layer == 4
    down = t["blk.1.ffn_down_exps.weight"]
    assert down.tensor_class == "ffn_down_exps" and down.group == "routed_experts" and down.layer == 1
    assert down.shape == (256, 256, 4) and down.n_elements == 256 * 256 * 4
    assert down.hf_sources == tuple(f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(4))
    assert t["blk.3.nextn.eh_proj.weight"].tensor_class == "nextn"
    assert t["blk.1.ffn_gate_inp.weight"].tensor_class == "router" and not t["blk.1.ffn_gate_inp.weight"].quantizable
    assert t["blk.1.exp_probs_b.bias"].tensor_class == "router"
    assert t["blk.1.ffn_down_shexp.weight"].group == "shared_experts"
    assert t["blk.0.attn_norm.weight"].tensor_class == "norm" and not t["blk.0.attn_norm.weight"].quantizable
    assert t["token_embd.weight"].quantizable and t["output.weight"].tensor_class == "output"
    mla = catalog_from_config(get_tiny("tiny-deepseek-v3")).by_name()
    assert mla["blk.0.attn_k_b.weight"].hf_sources == ("model.layers.0.self_attn.kv_b_proj.weight",)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2-135m", "smollm2-768", "smollm2-moe"])
def test_fixture_catalog_equals_converter(tmp_path: Path, fixture: str) -> None:
    from quantmix.fixtures.store import get_fixture

    fx = get_fixture(fixture)
    cat = catalog_from_config(_config_only(fx.hf_dir, tmp_path))
    assert _shapes(cat) == _shapes(catalog_from_gguf(fx.gguf_f32))


@pytest.mark.slow
def test_split_gguf_reads_every_shard(llamacpp, tmp_path: Path) -> None:
    from quantmix.fixtures.store import get_fixture

    src = get_fixture("smollm2-135m").gguf_f32
    llamacpp.run("llama-gguf-split", "--split", "--split-max-size", "150M", src, tmp_path / "m")
    shards = sorted(tmp_path.glob("m-*.gguf"))
    assert len(shards) > 1
    whole, split = catalog_from_gguf(src), catalog_from_gguf(shards[-1])
    assert _shapes(whole) == _shapes(split)
    shards[0].unlink()
    with pytest.raises(GGUFHeaderError, match="missing shard"):
        catalog_from_gguf(shards[1])


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no such file"):
        load_catalog(tmp_path / "nope.gguf")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="config.json: not valid JSON"):
        load_catalog(bad)
    bad.write_text('{"hidden_size": 3}')
    with pytest.raises(CatalogError, match="no 'model_type'"):
        load_catalog(bad)
    bad.write_text('{"model_type": "gpt2"}')
    with pytest.raises(CatalogError, match="'gpt2' is not supported; supported: llama, mistral"):
        load_catalog(bad)
    g = tmp_path / "trunc.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(GGUFHeaderError, match="trunc.gguf"):
        load_catalog(g)


@pytest.mark.parametrize("config,n_params,n_tensors", [
    ("deepseek-v3.json", 671_026_419_200, 1086),  # "671B" (MTP layer skipped, as llama.cpp's converter does)
    ("qwen3-235b-a22b.json", 235_093_634_560, 1131),  # "235B"
    ("glm-4.6.json", 358_337_791_296, 1761),  # "355B" + the NextN layer llama.cpp keeps, with its own
    # embed_tokens and shared_head.head (151552 x 5120 each: 1.45 GiB at 8 bits, what recipes sized without it lack)
])
def test_public_large_moe_configs(tmp_path: Path, config: str, n_params: int, n_tensors: int) -> None:
    """Real published configs of large MoE models, catalogued on the meta device without any weights."""
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "configs" / config, d / "config.json")
    cat = catalog_from_config(d / "config.json")
    assert cat.n_elements == n_params
    assert len(cat) == n_tensors
    exps = [t for t in cat if t.tensor_class == "ffn_down_exps"]
    assert exps and all(t.shape[2] == cat.hparams.n_expert for t in exps)


def test_header_that_disagrees_with_the_data_layout_is_refused(llamacpp, tmp_path: Path) -> None:
    """A tensor's shape edited in the header (its data size changes, the next offsets no longer line up) is refused
    as gguf.cpp refuses it, naming the tensor whose offset is off."""
    import struct

    src = _converted_tiny(llamacpp, "tiny-llama")
    data = bytearray(src.read_bytes())
    name = b"blk.0.attn_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims, ne0 = struct.unpack_from("<IQ", data, at)
    assert n_dims == 1
    struct.pack_into("<Q", data, at + 4, ne0 * 2)  # twice as long: the tensors after it start too early
    bad = tmp_path / "edited.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFHeaderError, match=r"edited.gguf: tensor \S+ has offset \d+, expected \d+"):
        load_catalog(bad)
