"""finetune=lora: peft adapters on a frozen removable GPT-2 (lnfree/lora.py)."""

import pytest
import torch
from conftest import TINY_RUN, calibrated_all_removed, compose_train, ids, needs, stock_and_removable, train_until_crash

from lnfree.io import model_from_checkpoint, read_checkpoint
from lnfree.lora import apply_lora, has_lora, merged_copy
from lnfree.model import parse_site_name
from lnfree.training.config import LimitError
from lnfree.training.run import train

PEFT = needs("peft", "lora")  # the tests that build adapters; the refusals below run without peft
SETTINGS = dict(r=4, alpha=8.0, dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"], train_norms=True)


def _adapted(model, settings=SETTINGS, seed=0):
    apply_lora(model, settings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); a random B makes a wrong formula show
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@PEFT
@pytest.mark.parametrize("removed", [[], ["ln1qk.0"], ["ln1v.1"], ["ln2.0", "ln1qk.0", "ln1qk.1", "ln1v.0"]])
def test_split_qkv_lora_equals_a_lora_on_each_path_and_merges_exactly(removed):
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32, seed=3))
    for name in removed:
        model.remove(*parse_site_name(name))
    _adapted(model)
    x = ids()
    adapted = _logits(model, x)
    # by hand: the base projection plus each path's own low-rank update (Q, K from x_qk; V from x_v)
    block = model.transformer.h[0]
    lora = block.attn.c_attn
    captured = {}
    h = block.ln_1.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    model(x)
    h.remove()
    x_qk, x_v = block.ln_1.paths(captured["out"])
    base = lora.get_base_layer()
    a, b, s = lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"]
    d = model.config.n_embd
    ref = torch.cat([(x_qk @ base.weight + base.bias)[..., :2 * d] + s * (x_qk @ a.T @ b.T)[..., :2 * d],
                     (x_v @ base.weight + base.bias)[..., 2 * d:] + s * (x_v @ a.T @ b.T)[..., 2 * d:]], -1)
    with torch.no_grad():
        assert torch.allclose(lora(captured["out"]), ref, atol=1e-5)
    # merging folds the same update into the weights: the merged plain model gives the adapted logits
    merged = merged_copy(model)
    assert not any("lora" in k for k in merged.state_dict())
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "SplitQKVProjection"
    assert merged.transformer.h[0].attn.c_attn._ln[0] is merged.transformer.h[0].ln_1  # not the original's ln_1
    assert torch.allclose(_logits(merged, x), adapted, rtol=0, atol=1e-5 * adapted.abs().max())
    assert not (_logits(merged, x) - _logits(stock_and_removable()[1], x)).abs().max() < 1e-3  # it did change


@PEFT
def test_split_lora_on_an_ordinary_input_is_peft_own_linear_lora_dropout_draws_included():
    # while ln_1 is real, c_attn's input is the ordinary [batch, pos, d]: the LoRA layer must be exactly peft's
    # Linear LoRA, whose dropout draws one mask for all of Q, K and V (the split path draws one per path)
    from peft.tuners.lora.layer import Linear

    _, model = stock_and_removable()
    lora = _adapted(model, {**SETTINGS, "dropout": 0.5}).transformer.h[0].attn.c_attn.train()
    x = torch.randn(2, 5, model.config.n_embd)  # pos != d: the input width alone marks the ordinary form
    with torch.no_grad():
        torch.manual_seed(3)
        out = lora(x)
        torch.manual_seed(3)
        assert torch.equal(out, Linear.forward(lora, x))
        assert not torch.equal(out, lora.eval()(x))  # dropout did act


@PEFT
def test_only_adapters_and_norms_train_and_the_base_stays_frozen():
    _, model = calibrated_all_removed()
    _adapted(model).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".ln_" in n or "ln_f" in n for n in trainable)
    assert any(".ln_1.weight" in n for n in trainable) and any("c_attn.lora_A" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = ids()
    model(x, labels=x).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed <= trainable  # the base (embeddings, projections' base_layer, lm_head) did not move
    assert any("c_attn.lora_B" in n for n in changed) and any("ln_1.weight" in n for n in changed)
    _, no_norms = calibrated_all_removed()
    assert has_lora(model) and not has_lora(no_norms)  # the adapter settings travel in the model's config
    apply_lora(no_norms, {**SETTINGS, "train_norms": False, "target_modules": ["c_fc"]})
    assert has_lora(no_norms)
    assert {n.split(".")[-3] for n, p in no_norms.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


LORA_RUN = [*TINY_RUN, "finetune=lora", "finetune.rank=4"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora_run")
    return train(compose_train(run, *LORA_RUN)), run


@PEFT
@pytest.mark.slow
def test_lora_run_removes_every_site_and_exports_the_merged_model(lora_run):
    summary, run = lora_run
    assert summary["finetune"] == "lora" and summary["all_removed"]
    assert summary["trainable_params"] < summary["n_params"] / 2
    assert summary["lora_merge_error"] <= 1e-5
    assert summary["exports"]["hf"]["relative_error"] <= 1e-4
    assert summary["exports"]["folded"]["relative_error"] <= 1e-5
    assert summary["val_ce"] < summary["val_ce_before"]
    # the checkpoint keeps the adapters; the loader rebuilds, loads and merges them: = the exported model
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert any("lora_A" in k for k in ckpt["state_dict"])
    from transformers import GPT2LMHeadModel

    loaded = model_from_checkpoint(ckpt)
    hf = GPT2LMHeadModel.from_pretrained(run / "export" / "hf").eval()
    x = ids(2, 32)
    ref = _logits(loaded, x)
    assert (_logits(hf, x) - ref).abs().max() / ref.abs().max() < 1e-4


@PEFT
@pytest.mark.slow
def test_lora_run_resumes_exactly(lora_run, tmp_path, monkeypatch):
    full, full_dir = lora_run
    ckpt = train_until_crash(compose_train(tmp_path, *LORA_RUN), monkeypatch, step=12)
    resumed = train(compose_train(tmp_path, *LORA_RUN, f"ckpt_path={ckpt}"))
    assert resumed["sigmas"] == full["sigmas"]
    assert resumed["val_ce"] == full["val_ce"]
    a = read_checkpoint(full_dir / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    adapters = [k for k in a if "lora_" in k]
    assert adapters and all(torch.equal(a[k], b[k]) for k in adapters)


def test_bad_lora_configs_are_refused_before_any_compute(tmp_path):
    with pytest.raises(LimitError, match="finetune.target_modules"):
        train(compose_train(tmp_path, *LORA_RUN, "finetune.target_modules=[c_attn,wte]"))
    with pytest.raises(LimitError, match="finetune.kind"):
        train(compose_train(tmp_path, *TINY_RUN, "finetune.kind=qlora"))
    with pytest.raises(LimitError, match="finetune.rank"):
        train(compose_train(tmp_path, *LORA_RUN, "finetune.rank=0"))
    assert not (tmp_path / "checkpoints").exists()


@PEFT
def test_adapter_settings_reach_peft():
    from lnfree.lora import lora_settings

    _, model = stock_and_removable()
    settings = dict(r=3, alpha=12.0, dropout=0.25, target_modules=["c_attn", "c_fc"], train_norms=True)
    apply_lora(model, settings)
    block = model.transformer.h[1]
    for module in (block.attn.c_attn, block.mlp.c_fc):
        assert module.lora_A["default"].weight.shape[0] == 3 and module.scaling["default"] == 12.0 / 3
        assert module.lora_dropout["default"].p == 0.25
    assert not hasattr(block.attn.c_proj, "lora_A") and not hasattr(block.mlp.c_proj, "lora_A")  # not targeted
    assert block.mlp.c_fc.lora_B["default"].bias is None  # bias="none": only A and B train
    cfg = type("Cfg", (), dict(rank=3, alpha=12, dropout=0.25, target_modules=("c_attn", "c_fc"), train_norms=True))
    assert lora_settings(cfg) == settings
    assert lora_settings(type("Cfg", (cfg,), {"train_norms": False}))["train_norms"] is False


@PEFT
def test_no_warning_about_lnfree_own_split_projection():
    import warnings

    _, model = stock_and_removable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, SETTINGS)
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]


@PEFT
def test_peft_warnings_other_than_the_split_projection_one_still_reach_the_user():
    # lm_head is an nn.Linear, not a Conv1D: peft says it is overriding fan_in_fan_out, which a user should see
    _, model = stock_and_removable()
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is"):
        apply_lora(model, {**SETTINGS, "target_modules": ["c_attn", "lm_head"]})


def test_lora_without_peft_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # as if the `lora` extra were not installed
    _, model = stock_and_removable()
    with pytest.raises(ImportError, match=r"^finetune=lora needs peft: pip install 'lnfree\[lora\]'$"):
        apply_lora(model, SETTINGS)


@PEFT
def test_split_qkv_lora_with_fp32_adapters_on_a_bf16_base_and_when_disabled():
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32, seed=3))
    model.remove("ln1qk", 0)  # block 0's c_attn now reads the split input
    _adapted(model)
    x = ids()
    lora = model.transformer.h[0].attn.c_attn
    captured = {}
    h = model.transformer.h[0].ln_1.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    model(x)
    h.remove()
    split = captured["out"]
    with torch.no_grad():
        ref = lora(split)
        base_only = lora.get_base_layer()(split)
        lora.enable_adapters(False)  # disabled adapters: the base projection alone
        assert torch.equal(lora(split), base_only)
        lora.enable_adapters(True)
        model.to(torch.bfloat16)  # base in bf16, adapters kept in fp32 (mixed precision)
        lora.lora_A.float(), lora.lora_B.float()
        out = lora(split.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max())
