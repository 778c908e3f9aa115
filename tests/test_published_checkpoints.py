"""The published LN-free checkpoints' form (docs/reference/published_checkpoints.md): a stock HF dir whose every
LayerNorm has eps 1e12 and weight gamma x 1e6 / sigma, no lnfree record. It resolves as an LN-free model, refuses fp16
and removable=True, and its removable, folded, exported-folded and bridged forms give its logits."""

import pytest
import torch
from conftest import tiny_config
from transformers import GPT2LMHeadModel

from lnfree import load
from lnfree.errors import ModelIOError


def _published_form(d):
    """A tiny GPT-2 written as the paper authors publish LN-free checkpoints: a stock HF dir whose every LayerNorm
    has eps = 1e12 and weight = gamma * 1e6 / sigma (one sigma per norm), no lnfree record."""
    from lnfree.io import load_tokenizer

    tok = load_tokenizer("builtin")
    stock = GPT2LMHeadModel(tiny_config(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                                        eos_token_id=tok.eos_token_id, layer_norm_epsilon=1e12)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in stock.modules():
            if isinstance(m, torch.nn.LayerNorm):
                sigma = float(torch.empty(()).uniform_(0.5, 3.0, generator=g))
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=g) * 1e6 / sigma)
                m.bias.normal_(0, 0.1, generator=g)
    stock.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_published_lnfree_checkpoints_load_as_lnfree_fold_and_bridge(tmp_path):
    from lnfree.bridges import stock_model
    from lnfree.export import export_folded, fold, from_lnfree_stock, logits_error
    from lnfree.references import resolve

    d = _published_form(tmp_path / "published")
    assert resolve(str(d)).kind == "hf_lnfree"
    model, tok = load(str(d))
    with pytest.raises(ModelIOError, match="LN-free"):
        load(str(d), removable=True)
    with pytest.raises(ModelIOError, match="overflow fp16"):
        load(str(d), dtype=torch.float16)
    removable = from_lnfree_stock(model)
    assert not removable.real_sites() and set(removable.sigmas().values()) == {1.0}
    batch = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    assert logits_error(model, removable, batch) < 1e-5
    assert logits_error(model, fold(removable), batch) < 1e-5
    export_folded(removable, tmp_path / "folded", tok)
    folded, _ = load(str(tmp_path / "folded"))
    assert logits_error(model, folded, batch) < 1e-5
    bridged, _ = stock_model(str(d))  # what to_transformer_lens and to_nnsight wrap
    assert logits_error(model, bridged, batch) == 0
