"""lnfree.bridges: any lnfree model or export in TransformerLens and NNsight, logits equal to the source's."""

import pytest
import torch

from lnfree.bridges import BridgeError, require, stock_model, to_nnsight, to_transformer_lens
from lnfree.export import HF_TOL
from lnfree.io import load
from lnfree.model_record import logits

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
    model, _ = stock_model(str(run))
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
        stock_model(half)
    import lnfree.bridges as b

    monkeypatch.setitem(b.SUPPORTED, "nnsight", ((9, 0), (9, 1)))
    with pytest.raises(BridgeError, match="not supported"):
        require("nnsight")


# -- the other families: the random-init options model=tiny_llama / tiny_neox with every site removed ----------------
FAMILY_CASES = {"llama": ["model=tiny_llama"], "neox": ["model=tiny_neox"],
                "qwen2": ["model=tiny_llama", "model.shape.model_type=qwen2"]}  # Qwen2: q/k/v biases


@torch.no_grad()
def family_model(name, tmp_path):
    """(the option's removable model with every site removed at its own sigma, a stock model, its tokenizer, a
    batch)."""
    from conftest import compose_train

    from lnfree.io import load_tokenizer
    from lnfree.norm import recording
    from lnfree.references import resolve
    from lnfree.training import config as _config  # noqa: F401  (registers the schemas)

    shape = compose_train(tmp_path / "cfg", *FAMILY_CASES[name]).model.shape
    tok = load_tokenizer("builtin")
    model, _ = load(resolve("random", shape=shape), tokenizer=tok, removable=True)
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # non-trivial gammas and betas, so that a dropped norm shows
        if "norm" in n:
            p.uniform_(0.5, 1.5) if n.endswith("weight") else p.normal_(0, 0.1)
    model.eval().calibrate(torch.randint(0, 4096, (4, 32)))
    original = load(resolve("random", shape=shape), tokenizer=tok)[0].eval()
    original.load_state_dict({k: v for k, v in model.state_dict().items() if k in original.state_dict()})
    for site in model.sites():  # after each removal, new statistics for the sites still real (as training brings)
        kind, _, block = site.partition(".")
        model.remove(kind, int(block) if block else None)
        model.get_input_embeddings().weight.mul_(1.25)
        with recording(model.token_context):
            model(torch.randint(0, 4096, (4, 32)))
        model.commit_norm_stats(momentum=0.0)
    sigmas = model.sigmas()
    assert sigmas["attn_v.0"] > 1.2 * sigmas["attn_qk.0"]  # a wrong QK/V ratio would show in the logits
    return model, original, tok, torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(4))


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
    with torch.no_grad():  # an original model bridges as it is
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
    half.calibrate(torch.randint(0, 4096, (2, 16)))
    half.remove("pre_mlp", 0)
    with pytest.raises((BridgeError, ExportError), match="remov"):
        to_transformer_lens(half, tok)
