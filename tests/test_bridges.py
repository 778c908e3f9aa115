"""lnfree.bridges: any lnfree model or export in TransformerLens and NNsight, logits equal to the source's."""

import pytest
import torch

from lnfree.bridges import BridgeError, require, stock_gpt2, to_nnsight, to_transformer_lens
from lnfree.export import HF_TOL
from lnfree.io import load, logits

pytest.importorskip("transformer_lens")
pytest.importorskip("nnsight")


def rel(ref, out):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def sources(run):
    """(reference, model lnfree.io.load gives for it): exports, the run, its checkpoint, a built-in GPT-2."""
    refs = [run, run / "export" / "hf", run / "checkpoints" / "last.ckpt", "builtin:w48"]
    return [(str(r), load(str(r))[0]) for r in refs]


@pytest.mark.slow
def test_transformer_lens_bridge_reproduces_every_source(tiny_run):
    _, run = tiny_run
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    for ref, model in sources(run):
        bridge = to_transformer_lens(ref)
        with torch.no_grad():
            out = bridge(ids)
        assert rel(logits(model, ids), out) < HF_TOL, ref
        _, cache = bridge.run_with_cache(ids)  # hooks work: the residual stream is there
        assert cache["blocks.0.hook_resid_pre"].shape == (2, 24, model.config.n_embd)
    # the folded export goes through its run's export/hf, checked against the folded logits
    folded = load(str(run / "export" / "folded"))[0]
    with torch.no_grad():
        out = to_transformer_lens(str(run / "export" / "folded"))(ids)
    assert rel(logits(folded, ids), out) < HF_TOL  # export/hf vs folded: the eps approximation


def test_the_bridge_keeps_the_lnfree_eps(tiny_run):
    """What the bridge guards against: the same weights with a default eps give different logits."""
    _, run = tiny_run
    model, _ = stock_gpt2(str(run))
    assert model.config.layer_norm_epsilon == 1e12
    ids = torch.randint(0, 4096, (1, 16))
    ref = logits(model, ids)
    model.config.layer_norm_epsilon = 1e-5
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-5
    assert rel(ref, logits(model, ids)) > 1.0


def test_in_memory_models_and_nnsight(tiny_run):
    _, run = tiny_run
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    removable = load(str(run / "checkpoints" / "last.ckpt"))[0]
    ref = logits(removable, ids)
    bridge = to_transformer_lens(removable, load(str(run))[1])
    with torch.no_grad():
        assert rel(ref, bridge(ids)) < HF_TOL
    for src in (str(run), removable):
        lm = to_nnsight(src, tokenizer=load(str(run))[1])
        with lm.trace(ids):
            out = lm.lm_head.output.save()
        assert rel(ref, out.detach()) < HF_TOL
    folded_lm = to_nnsight(str(run / "export" / "folded"))
    with folded_lm.trace(ids):
        out = folded_lm.output.save()
    assert rel(ref, out.detach()) < HF_TOL


def test_half_removed_models_and_missing_tools_are_refused(tiny_run, monkeypatch):
    from lnfree.export import ExportError

    half, _ = load("builtin:w48", removable=True)
    half.calibrate(torch.randint(0, 4096, (2, 32)))
    half.remove("ln2", 0)
    with pytest.raises((BridgeError, ExportError), match="remov"):
        stock_gpt2(half)
    import lnfree.bridges as b

    monkeypatch.setitem(b.SUPPORTED, "nnsight", ((9, 0), (9, 1)))
    with pytest.raises(BridgeError, match="not supported"):
        require("nnsight")
