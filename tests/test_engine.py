"""The layer-streaming forward engine: the same logits as the whole model loaded at once, one layer resident,
hidden states spilled to disk when told to, and the breadth-first probes equal to one-at-a-time probes, whether
the layers stay resident or are read again on every pass."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from quantmix.model.engine import EngineError, LayerEngine

pytestmark = pytest.mark.slow

# MLA + q_lora + dense first layer + score bias; soft-capping + sliding window + scaled embedding + tied head;
# gpt-oss's attention sinks and MXFP4-shaped experts; GLM's shared expert; a plain dense model
ARCHS = ["tiny-deepseek-v3", "tiny-gemma2", "tiny-gpt-oss", "tiny-glm4-moe", "tiny-llama"]


def _ids(model_dir, n: int = 3, t: int = 96) -> torch.Tensor:
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = cfg.get("text_config", cfg)["vocab_size"]
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ARCHS)
def test_streamed_logits_equal_the_whole_model(name: str) -> None:
    from quantmix.fixtures.tiny import get_tiny
    from quantmix.model.checkpoint import load_float_model

    d = get_tiny(name)
    ids = _ids(d)
    with torch.no_grad():
        whole = load_float_model(d)(input_ids=ids, use_cache=False).logits.float()
    with LayerEngine(d, "cpu", resident_bytes=0, hidden_bytes=0) as eng:  # nothing kept, every state on disk
        batches = eng.batches(ids, batch_tokens=2 * ids.shape[1])  # 2 batches: rows 0-1, row 2
        assert len(batches) == 2
        streamed = torch.cat([eng.logits(h) for h in eng.forward_hidden(batches)])
        assert eng.max_loaded == 1 and eng.layer_reads == eng.n_layer
        assert eng.hidden_pool.used == 0 and eng.hidden_pool.spills > 0
    lw, ls = F.log_softmax(whole, -1), F.log_softmax(streamed, -1)
    kld = float((lw.exp() * (lw - ls)).sum(-1).mean())
    assert kld < 1e-6, kld
    assert torch.allclose(whole, streamed, atol=1e-4, rtol=1e-4)


def test_resident_layers_are_read_once() -> None:
    from quantmix.fixtures.tiny import get_tiny

    d = get_tiny("tiny-qwen3-moe")
    with LayerEngine(d, "cpu") as eng:
        b = eng.batches(_ids(d))
        first = eng.forward_hidden(b)
        b = eng.batches(_ids(d))
        again = eng.forward_hidden(b)
        assert eng.layer_reads == eng.n_layer  # the second pass read nothing
        assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_bad_model_directories_are_named(tmp_path) -> None:
    from quantmix.fixtures.tiny import get_tiny

    with pytest.raises(EngineError, match="no config.json"):
        LayerEngine(tmp_path, "cpu")
    d = get_tiny("tiny-llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    st = next(bad.glob("*.safetensors"))
    w = load_file(st)
    victim = next(k for k in w if ".layers.1." in k and k.endswith("up_proj.weight"))
    del w[victim]
    save_file(w, st)
    eng = LayerEngine(bad, "cpu", resident_bytes=0)
    try:
        b = eng.batches(_ids(bad))
        with pytest.raises(EngineError, match="layer 1") as e:
            eng.forward_hidden(b)
        assert victim.split(".")[-2] in str(e.value)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def probes():  # noqa: ANN201
    """The MoE fixture's probe with layers resident and one streaming every pass with states on disk."""
    from transformers import AutoTokenizer

    from quantmix.calibration.imatrix import calibration_tokens
    from quantmix.fixtures.store import get_fixture
    from quantmix.fixtures.text import read_text
    from quantmix.measurement.kld_probe import KLDProbe

    fx = get_fixture("smollm2-moe")
    chunks = calibration_tokens(AutoTokenizer.from_pretrained(fx.hf_dir), [read_text("wiki-calib")], 64, 2)
    resident = KLDProbe(fx.hf_dir, chunks, device="cpu", batch_tokens=64)
    streamed = KLDProbe(fx.hf_dir, chunks, device="cpu", batch_tokens=64, resident_bytes=0, state_bytes=1,
                        hidden_bytes=0)
    yield resident, streamed
    resident.close()
    streamed.close()


CHANGES = [{"blk.1.ffn_gate_exps.weight": "Q2_K"}, {"token_embd.weight": "Q3_K"}, {"output.weight": "Q2_K"},
           {"blk.0.attn_q.weight": "Q2_K", "blk.3.ffn_down_exps.weight": "Q3_K"}, {},
           {"blk.2.attn_output.weight": "Q2_K"}]


def test_breadth_first_probes_equal_one_at_a_time(probes) -> None:  # noqa: ANN001
    resident, streamed = probes
    assert torch.equal(resident.ref_logp, streamed.ref_logp)
    one_by_one = [resident.kld(c) for c in CHANGES]
    together = [float(k.mean()) for k in resident.kld_many(CHANGES)]
    assert together == one_by_one
    assert one_by_one[4] < 1e-12 and all(k > 1e-5 for i, k in enumerate(one_by_one) if i != 4)
    reads = streamed.engine.layer_reads
    plan = streamed.cost(CHANGES)
    assert plan["groups"] == len(CHANGES)  # state_bytes=1: one probe per group
    stream = [float(k.mean()) for k in streamed.kld_many(CHANGES)]
    assert stream == pytest.approx(one_by_one, rel=1e-6, abs=1e-12)
    assert streamed.engine.layer_reads - reads == plan["layer_reads"]
    assert streamed.engine.max_loaded <= 2  # the layer computing and the one read ahead


def test_streamed_base_state(probes) -> None:  # noqa: ANN001
    resident, streamed = probes
    base = {"blk.0.ffn_up_exps.weight": "Q3_K", "blk.2.attn_v.weight": "Q2_K"}
    on_top = {"blk.1.attn_k.weight": "Q2_K"}
    want = resident.kld({**base, **on_top})
    for p in (resident, streamed):
        p.set_base(base)
        try:
            assert p.kld(on_top) == pytest.approx(want, rel=1e-5)
        finally:
            p.set_base({})
        assert p.kld({}) < 1e-12


def test_base_without_kept_float_copies(probes) -> None:  # noqa: ANN001
    """With no memory for the float copies of image-holding tensors, they are read again from the checkpoint:
    the same KLDs (a move over a base tensor, a probe of another), and the float weights come back exactly."""
    resident, _ = probes
    base = {"blk.0.ffn_up_exps.weight": "Q3_K", "blk.2.attn_v.weight": "Q2_K", "blk.1.ffn_gate_exps.weight": "Q4_K"}
    probes_ = [{"blk.0.ffn_up_exps.weight": "Q2_K"}, {"blk.1.attn_k.weight": "Q2_K"}, {}]
    resident.set_base(base)
    try:
        want = [resident.kld(c) for c in probes_]
    finally:
        resident.set_base({})
    kept = resident.originals_bytes, resident.originals_host_bytes
    resident.originals_bytes = resident.originals_host_bytes = 0
    try:
        resident.set_base(base)
        try:
            got = [resident.kld(c) for c in probes_]
            assert resident._reread and not resident._originals  # nothing kept: all read again
        finally:
            resident.set_base({})
        assert got == want
        assert resident.kld({}) < 1e-12 and not resident._reread
    finally:
        resident.originals_bytes, resident.originals_host_bytes = kept


def test_fingerprint_is_remembered_per_file_version(tmp_path, monkeypatch) -> None:
    """A model's files are hashed once; an unchanged file is not read again, any change is seen."""
    import os

    import quantmix.model.fingerprint as fpm

    monkeypatch.setenv("QUANTMIX_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"a" * 300_000)
    reads: list[str] = []
    full = fpm._full_sha

    def counted(p):  # noqa: ANN001, ANN202
        reads.append(p.name)
        return full(p)

    monkeypatch.setattr(fpm, "_full_sha", counted)
    first = fpm.model_fingerprint(d)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert fpm.model_fingerprint(d) == first and len(reads) == 2  # nothing re-read
    st = os.stat(d / "model.safetensors")
    with open(d / "model.safetensors", "r+b") as fh:  # same size, same mtime: only ctime and content move
        fh.seek(200_000)
        fh.write(b"b")
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    second = fpm.model_fingerprint(d)
    assert second != first and reads[-1] == "model.safetensors"
    monkeypatch.setenv("QUANTMIX_REHASH", "1")
    assert fpm.model_fingerprint(d) == second and len(reads) == 5
