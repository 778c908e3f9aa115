"""lnfree.bridges: any lnfree model or export in TransformerLens and NNsight, logits equal to the source's."""

import pytest
import torch

from lnfree.bridges import BridgeError, require, stock_gpt2, stock_model, to_nnsight, to_transformer_lens
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


# -- the other families (tests/test_families.py's tiny random models, every site removed at distinct sigmas) -------
FAMILY_CASES = ["llama", "qwen2", "neox"]  # Llama architecture (with q/k/v biases: Qwen2), GPT-NeoX


def family_model(case, tmp_path):
    from test_families import V, all_removed, ids, stock_model
    from test_reliability import small_tokenizer
    from transformers import AutoTokenizer

    small_tokenizer(tmp_path / "tok", n=V)  # a tokenizer of the models' 97 ids, loaded as a user's would be
    return all_removed(case), stock_model(case), AutoTokenizer.from_pretrained(tmp_path / "tok"), ids(2, 16, seed=4)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_transformer_lens_bridges_every_family_in_memory_and_from_its_export(case, tmp_path):
    from lnfree.export import HF_EPS, export_hf
    from lnfree.families import family

    model, original, tok, x = family_model(case, tmp_path)
    ref = logits(model, x)
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    for src in (model, str(tmp_path / "hf")):
        bridge = to_transformer_lens(src, tok)
        with torch.no_grad():
            assert rel(ref, bridge(x)) < HF_TOL, src
        # hooks give the residual stream: block 1's input is the model's hidden state after block 0
        _, cache = bridge.run_with_cache(x)
        with torch.no_grad():
            hidden = model(x, output_hidden_states=True).hidden_states
        assert rel(hidden[1], cache["blocks.1.hook_resid_pre"]) < HF_TOL
    stock, _ = stock_model(model, tok)  # what the bridge wraps: the family's stock class with the frozen norms
    assert type(stock) is type(original) and getattr(stock.config, family(stock.config).eps_field) == HF_EPS
    with torch.no_grad():  # an original model (no config.architectures: built in memory) bridges as it is
        assert original.config.architectures is None
        assert rel(logits(original, x), to_transformer_lens(original, tok)(x)) < HF_TOL


@pytest.mark.parametrize("case", ["llama", "neox"])
def test_nnsight_wraps_every_family_and_its_folded_form(case, tmp_path):
    from lnfree.export import export_folded

    model, _, tok, x = family_model(case, tmp_path)
    ref = logits(model, x)
    lm = to_nnsight(model, tokenizer=tok)
    with lm.trace(x):
        out = lm.lm_head.output.save()  # the unembedding, lm_head in both families (transformers 5)
    assert rel(ref, out.detach()) < HF_TOL
    export_folded(model, tmp_path / "folded", tokenizer=tok)
    for src in (str(tmp_path / "folded"), load(str(tmp_path / "folded"))[0]):  # a reference, an in-memory model
        folded_lm = to_nnsight(src)
        with folded_lm.trace(x):
            out = folded_lm.output.save()
        assert rel(ref, out.logits.detach()) < HF_TOL


def test_a_family_transformer_lens_has_no_adapter_for_is_refused_naming_those_it_has(tmp_path, monkeypatch):
    from transformer_lens.factories import architecture_adapter_factory as factory

    from lnfree.export import ExportError

    model, _, tok, _ = family_model("llama", tmp_path)
    monkeypatch.delitem(factory.SUPPORTED_ARCHITECTURES, "LlamaForCausalLM")
    with pytest.raises(BridgeError, match=r"no TransformerBridge adapter for LlamaForCausalLM.*gpt2.*gpt_neox"):
        to_transformer_lens(model, tok)
    half, _, _, _ = family_model("neox", tmp_path / "half")
    half = half.__class__(half.config)
    half.calibrate(torch.randint(0, 97, (2, 16)))
    half.remove("pre_mlp", 0)
    with pytest.raises((BridgeError, ExportError), match="remov"):
        to_transformer_lens(half, tok)
