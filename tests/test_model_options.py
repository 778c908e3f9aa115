"""Model config options (the table in docs/families.md): a GPT-2 or GPT-NeoX option is either exported exactly in
both forms (hf and folded) or refused before compute, naming the option. Per-family removal: tests/test_families.py."""

import pytest
import torch
from conftest import TINY_RUN, calibrated_all_removed, compose_train, ids

from lnfree import load
from lnfree.errors import ModelIOError
from lnfree.export import export_folded, export_hf
from lnfree.families import UnsupportedFamily


@pytest.mark.parametrize("option", [{"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True},
                                    {"reorder_and_upcast_attn": True, "_attn_implementation": "eager"},
                                    {"activation_function": "silu"}, {"activation_function": "gelu_fast"}],
                         ids=lambda o: next(iter(o)) + "=" + str(next(iter(o.values()))))
def test_gpt2_options_the_issue_found_export_exactly_in_both_forms(option, tmp_path):
    kw = {k: v for k, v in option.items() if not k.startswith("_")}
    _, model = calibrated_all_removed(**kw)
    if "_attn_implementation" in option:
        model.config._attn_implementation = option["_attn_implementation"]
    x = ids(3, 24, seed=6)
    with torch.no_grad():
        want = model(x).logits.double()
    assert export_hf(model, tmp_path / "hf") < 1e-4
    assert export_folded(model, tmp_path / "folded") < 1e-5
    for form in ("hf", "folded"):
        loaded, _ = load(str(tmp_path / form))
        with torch.no_grad():
            out = loaded(x)
        got = (out.logits if hasattr(out, "logits") else out).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4, form


def test_every_folded_activation_is_the_function_transformers_computes():
    from transformers.activations import ACT2FN

    from lnfree.families.gpt2_folded import ACTIVATIONS

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for name, fn in ACTIVATIONS.items():
        assert torch.allclose(fn(x), ACT2FN[name](x), rtol=1e-6, atol=1e-7), name


def test_a_gpt2_activation_the_adapter_cannot_export_is_refused_before_compute(tmp_path):
    from transformers import GPT2Config

    from lnfree.model import make_removable
    from lnfree.training.run import check_config

    with pytest.raises(UnsupportedFamily, match="activation_function='quick_gelu'"):
        make_removable(GPT2Config(n_layer=1, n_head=2, n_embd=16, activation_function="quick_gelu"))
    cfg = compose_train(tmp_path / "run", *TINY_RUN, "+model.shape.activation_function=quick_gelu")
    with pytest.raises(ModelIOError, match="activation_function='quick_gelu'"):
        check_config(cfg)
    assert not (tmp_path / "run").exists()


def test_neox_without_attention_biases_folds_exactly(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lnfree.model import make_removable

    V = 97
    torch.manual_seed(0)
    stock = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=96, eos_token_id=96, tie_word_embeddings=False, rotary_pct=0.25,
        hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.15, attention_bias=False)).eval()
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    model = make_removable(stock).eval()
    model.calibrate(torch.randint(0, V, (4, 32)))
    for name in list(model.sites()):
        kind, _, block = name.partition(".")
        model.remove(kind, int(block) if block else None)
    assert export_hf(model, tmp_path / "hf") < 1e-4 and export_folded(model, tmp_path / "folded") < 1e-5
    folded, _ = load(str(tmp_path / "folded"))
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        a, b = folded(x).logits.double(), model(x).logits.double()
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
