"""The exports (lnfree/export.py, lnfree/folded.py): the hf and folded forms reproduce the model's logits, refuse
what they cannot export exactly, carry their record, tokenizer and sigmas, and load onto the device asked for; a
run's export step keeps the valid form when the other fails."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import calibrated_all_removed, ids, remove_all, stock_and_removable

from lnfree.export import ExportError, export_folded, export_hf, fold, to_stock
from lnfree.families.gpt2_folded import FoldedGPT2
from lnfree.folded import load_folded
from lnfree.io import load
from lnfree.model_record import EXPORT_INFO


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().detach())


@pytest.mark.slow
def test_hf_export_reproduces_lnfree_logits_and_loads_without_lnfree(tmp_path):
    _, model = calibrated_all_removed()
    err = export_hf(model, tmp_path / "hf")
    assert err <= 1e-4
    x = ids(3, 40, seed=7)
    ref = model(x).logits.detach()
    torch.save({"x": x, "ref": ref}, tmp_path / "check.pt")
    code = f"""
import sys, torch
from transformers import GPT2LMHeadModel
m = GPT2LMHeadModel.from_pretrained({str(tmp_path / 'hf')!r}).eval()
d = torch.load({str(tmp_path / 'check.pt')!r})
out = m(d["x"]).logits
assert "lnfree" not in sys.modules
print(float((out - d["ref"]).abs().max() / d["ref"].abs().max()))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip().splitlines()[-1]) <= 1e-4
    info = json.loads((tmp_path / "hf" / "lnfree_export.json").read_text())
    assert info["form"] == "hf_lnfree" and info["sigmas"] == model.sigmas()
    c = model.config  # the shape under TransformerLens' names, for users of other tools
    assert (info["n_ctx"], info["d_model"], info["n_layers"], info["n_heads"], info["d_vocab"]) == \
        (c.n_positions, c.n_embd, c.n_layer, c.n_head, c.vocab_size)


def test_hf_export_of_all_real_model_is_plain_gpt2(tmp_path):
    stock, model = stock_and_removable()
    export_hf(model, tmp_path / "hf")
    from transformers import GPT2LMHeadModel

    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.layer_norm_epsilon == stock.config.layer_norm_epsilon
    assert torch.allclose(loaded(ids()).logits, stock(ids()).logits, atol=1e-5)


def test_folded_export_has_no_norm_and_same_logits(tmp_path):
    _, model = calibrated_all_removed()
    folded = fold(model)
    norms = [m for m in folded.modules() if "norm" in type(m).__name__.lower()]
    assert norms == []
    x = ids(2, 48, seed=4)
    assert _rel(folded(x), model(x).logits) <= 1e-5
    export_folded(model, tmp_path / "folded")
    loaded = load_folded(tmp_path / "folded")
    assert isinstance(loaded, FoldedGPT2)
    assert _rel(loaded(x), model(x).logits) <= 1e-5
    mask = torch.ones_like(x)
    mask[0, -10:] = 0  # right padding: real tokens unaffected
    a, b = loaded(x, attention_mask=mask), model(x, attention_mask=mask).logits
    assert _rel(a[mask.bool()], b[mask.bool()]) <= 1e-5
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"lnfree\.load"):  # stock transformers is pointed to lnfree's loader
        AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    from lnfree.io import load

    assert _rel(load(str(tmp_path / "folded"))[0](x), model(x).logits) <= 1e-5  # config.json is no GPT-2 dir to io


def test_export_refusals(tmp_path):
    _, model = calibrated_all_removed()
    with pytest.raises(ExportError, match="fp16"):
        export_hf(model, tmp_path / "fp16", dtype=torch.float16)
    assert not (tmp_path / "fp16").exists()
    _, partial = stock_and_removable()
    partial.calibrate(ids(4, 32))
    partial.remove("ln2", 0), partial.remove("ln2", 1), partial.remove("ln1qk", 0)
    with pytest.raises(ExportError, match=r"still real: ln1qk\.1, ln1v\.0"):
        export_hf(partial, tmp_path / "p")
    with pytest.raises(ExportError, match="lnf"):
        export_folded(partial, tmp_path / "pf")
    assert not (tmp_path / "p").exists() and not (tmp_path / "pf").exists()


def test_export_refusal_lists_six_real_sites_then_counts_the_rest():
    from lnfree.export import require_all_removed

    _, model = stock_and_removable()  # 7 sites, all real
    model.calibrate(ids(4, 32))
    with pytest.raises(ExportError, match=r"^x needs every norm site removed; still real: ln2\.0, ln2\.1, ln1qk\.0, "
                                          r"ln1qk\.1, ln1v\.0, ln1v\.1 and 1 more$"):
        require_all_removed(model, "x")
    model.remove("lnf")
    with pytest.raises(ExportError, match=r"still real: ln2\.0, ln2\.1, ln1qk\.0, ln1qk\.1, ln1v\.0, ln1v\.1$"):
        require_all_removed(model, "x")


def test_export_refuses_sites_that_still_use_special_sigmas(tmp_path):
    # per-token (bos/eot) scales have no stock-GPT-2 or folded form: the bos/eot events must come first
    _, model = stock_and_removable(lnfree_special_bos=True)
    model.calibrate(ids(4, 32))
    remove_all(model)
    special = r"\['ln2\.0', 'ln2\.1', 'ln1qk\.0', 'ln1qk\.1'\]"
    for export in (export_hf, export_folded):
        with pytest.raises(ExportError, match=rf": sites {special} still use special bos/eot sigmas \(per-token "
                                              r"scales cannot be exported\); apply the bos/eot events first$"):
            export(model, tmp_path / export.__name__)
        assert not (tmp_path / export.__name__).exists()
    for stage in range(model.config.n_layer + 1):
        model.end_special("bos", stage)
    assert export_hf(model, tmp_path / "hf") <= 1e-4  # once every bos event is applied


def test_export_verification_refuses_a_wrong_model(tmp_path, monkeypatch):
    """The check is real: corrupt the conversion's output and the export must refuse to write."""
    _, model = calibrated_all_removed()
    stock = to_stock(model)
    from lnfree import export as ex

    with torch.no_grad():
        stock.transformer.ln_f.weight.mul_(1.01)
    monkeypatch.setattr(ex, "to_stock", lambda m, dtype=None: stock)
    with pytest.raises(ExportError, match="relative error"):
        ex.export_hf(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bf16_hf_export_allowed(tmp_path):
    _, model = calibrated_all_removed()
    stock = to_stock(model, torch.bfloat16)
    assert stock.dtype == torch.bfloat16
    assert _rel(stock(ids()).logits.float(), model(ids()).logits) < 0.05


class _SavesConfig:
    """A tokenizer whose save_pretrained writes a given tokenizer_config.json (what transformers 5.x writes)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def save_pretrained(self, out_dir):
        (out_dir / "tokenizer_config.json").write_text(json.dumps(self.cfg))


@pytest.mark.parametrize("written", ["TokenizersBackend", "PreTrainedTokenizerFast", None])
def test_save_tokenizer_names_a_class_both_transformers_majors_know(tmp_path, written):
    from lnfree.export import save_tokenizer

    cfg = {"backend": "tokenizers", "is_local": True, "local_files_only": False, "model_max_length": 1024}
    if written:
        cfg["tokenizer_class"] = written
    else:  # an older save: no class and none of the load-time keys
        cfg = {"model_max_length": 1024}
    save_tokenizer(_SavesConfig(cfg), tmp_path)
    text = (tmp_path / "tokenizer_config.json").read_text()
    expected = {"model_max_length": 1024, "tokenizer_class": "GPT2TokenizerFast"}  # load-time keys dropped
    assert json.loads(text) == expected
    assert text == json.dumps(json.loads(text), indent=2) + "\n"  # readable, diffable


def test_save_tokenizer_keeps_a_class_it_did_not_write(tmp_path):
    from lnfree.export import save_tokenizer

    cfg = {"tokenizer_class": "MyTokenizer", "backend": "custom"}  # a user's own tokenizer: left exactly as saved
    save_tokenizer(_SavesConfig(cfg), tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == cfg


def test_folded_model_masks_padding_keys_and_takes_position_ids():
    _, model = calibrated_all_removed()
    folded = fold(model)
    x = ids(2, 24, seed=5)
    mask = torch.ones_like(x)
    mask[0, :6] = 0  # left padding: real tokens must not see the pads, and must start at position 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    a = folded(x, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    assert _rel(a[real], model(x, attention_mask=mask, position_ids=pos).logits[real]) <= 1e-5
    assert _rel(a[0, 6:], folded(x[:1, 6:])[0]) <= 1e-5  # = the same tokens without padding


def test_folded_model_builds_positions_and_mask_on_the_input_device():
    _, model = calibrated_all_removed()
    folded = fold(model).to("meta")  # a device other than the CPU, on a machine without a GPU
    x = ids(2, 16).to("meta")
    seen = []
    hook = folded.wpe.register_forward_pre_hook(lambda m, args: seen.append(args[0].device.type))
    assert folded(x).device.type == "meta"
    hook.remove()
    assert seen == ["meta"]  # the position ids too (on a GPU, CPU positions would fail or sync)
    assert folded(x, attention_mask=torch.ones_like(x)).shape == (2, 16, model.config.vocab_size)


def test_folded_model_refuses_an_unknown_activation():
    from lnfree.families.gpt2_folded import ACTIVATIONS, FoldedConfig

    _, model = calibrated_all_removed()
    cfg = fold(model).config
    with pytest.raises(ValueError, match=r"activation 'quick_gelu' not supported; \['gelu"):
        FoldedGPT2(FoldedConfig(**{**cfg.__dict__, "activation_function": "quick_gelu"}))
    assert "gelu_new" in ACTIVATIONS


def test_folded_export_verifies_on_the_given_ids_writes_its_record_and_overwrites(tmp_path):
    from lnfree.export import logits_error
    from lnfree.model_record import EXPORT_INFO

    _, model = calibrated_all_removed()
    x = ids(3, 20, seed=9)
    out = tmp_path / "nested" / "dir" / "folded"  # parents are made
    err = export_folded(model, out, input_ids=x)
    assert err == logits_error(model, fold(model), x)
    record = json.loads((out / EXPORT_INFO).read_text())
    assert record["form"] == "folded" and record["relative_error"] == err and record["sigmas"] == model.sigmas()
    assert export_folded(model, out, input_ids=x, tol=err) == err  # the tolerance is inclusive; re-export overwrites
    with pytest.raises(ExportError, match=r"folded export differs from the model: relative error .* > 0e\+00"):
        export_folded(model, tmp_path / "strict", input_ids=x, tol=0.0)
    assert isinstance(load_folded(out), FoldedGPT2)


def test_hf_export_verifies_on_the_given_ids_writes_safetensors_and_its_record(tmp_path):
    from lnfree.export import HF_EPS, logits_error, to_stock
    from lnfree.model_record import EXPORT_INFO

    _, model = calibrated_all_removed()
    x = ids(3, 20, seed=9)
    err = export_hf(model, tmp_path / "hf", input_ids=x)
    assert err == logits_error(model, to_stock(model), x)
    assert (tmp_path / "hf" / "model.safetensors").exists() and not list((tmp_path / "hf").glob("*.bin"))
    record = json.loads((tmp_path / "hf" / EXPORT_INFO).read_text())
    assert record["form"] == "hf_lnfree" and record["relative_error"] == err
    assert record["layer_norm_epsilon"] == HF_EPS  # what a reader needs to know: the norms are neutralised
    assert export_hf(model, tmp_path / "hf", input_ids=x, tol=err) == err  # the tolerance is inclusive
    _, real = stock_and_removable()  # nothing removed: a plain GPT-2, recorded as such
    export_hf(real, tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / EXPORT_INFO).read_text())
    assert plain["form"] == "hf" and plain["layer_norm_epsilon"] == real.config.layer_norm_epsilon


def test_exports_load_onto_the_device_asked_for(tmp_path):
    from lnfree.model import load_removable, save_removable

    _, model = calibrated_all_removed()
    export_folded(model, tmp_path / "folded")
    save_removable(model, tmp_path / "removable")
    for loaded in (load_folded(tmp_path / "folded", device="meta"), load_removable(tmp_path / "removable", "meta")):
        assert {p.device.type for p in loaded.parameters()} == {"meta"}


def test_the_verification_batch_is_the_same_every_time():
    from lnfree.export import check_batch

    _, model = calibrated_all_removed()
    torch.manual_seed(1)
    a = check_batch(model)
    torch.manual_seed(2)  # independent of the global RNG: an export's recorded error can be reproduced
    assert torch.equal(a, check_batch(model))
    assert a.shape == (2, min(64, model.config.n_positions)) and int(a.max()) < model.config.vocab_size


def test_the_verification_batch_can_hold_every_token_id():
    from lnfree.export import check_batch

    _, model = stock_and_removable()
    x = check_batch(model, n_batch=64)  # 4096 draws from a vocabulary of 97: the first and last id among them
    assert int(x.min()) == 0 and int(x.max()) == model.config.vocab_size - 1


def test_exports_record_the_tokenizer_they_carry_and_the_sigmas(tmp_path):
    from lnfree.io import load_tokenizer
    from lnfree.model_record import EXPORT_INFO, tokenizer_sha256

    _, model = calibrated_all_removed()
    tok = load_tokenizer("builtin")
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    export_folded(model, tmp_path / "folded", tokenizer=tok)
    for form in ("hf", "folded"):
        record = json.loads((tmp_path / form / EXPORT_INFO).read_text())
        assert (tmp_path / form / "tokenizer.json").is_file()
        assert record["tokenizer_sha256"] == tokenizer_sha256(tok)  # what lnfree.io.load checks a tokenizer by
        assert record["sigmas"] == model.sigmas()


def test_another_familys_folded_model_is_rebuilt_from_its_saved_config(tmp_path):
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from lnfree.folded import CONFIG_FILE, hf_folded_model, save_folded

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folded = LlamaForCausalLM(cfg).eval()  # a folded Llama's layout: identity norms, an unembedding with a bias
    for block in folded.model.layers:
        block.input_layernorm, block.post_attention_layernorm = nn.Identity(), nn.Identity()
    folded.model.norm = nn.Identity()
    folded.set_output_embeddings(nn.Linear(32, 97, bias=True))
    save_folded(folded, tmp_path)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    with torch.device("meta"):  # the structure first: a config that lost its fields would build a full-size model
        rebuilt = hf_folded_model(saved)
    assert type(rebuilt) is LlamaForCausalLM
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in folded.state_dict().items()}
    assert sorted(n for n, m in rebuilt.named_modules() if isinstance(m, nn.Identity)) == sorted(saved["identity"])
    loaded = load_folded(tmp_path)
    x = ids(2, 12)
    assert torch.equal(loaded(x).logits, folded(x).logits)


def test_a_failed_export_form_leaves_the_other_valid_one(tmp_path, monkeypatch):
    from lnfree.errors import ExportError
    from lnfree.training import run as train_module

    _, model = calibrated_all_removed()

    def broken(*args, **kwargs):
        raise ExportError("folded export differs from the model")

    monkeypatch.setattr(train_module, "export_folded", broken)  # the only way to make a verified export fail
    exports, error = train_module.export_run(model, None, tmp_path, SimpleNamespace(val_data=ids(4, 32)))
    assert set(exports) == {"hf"} and "folded export: ExportError" in error
    assert (tmp_path / "export" / "hf" / EXPORT_INFO).exists() and not (tmp_path / "export" / "folded").exists()
    assert load(str(tmp_path / "export" / "hf"))[0] is not None
