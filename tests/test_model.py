"""The removable model (lnfree/model.py) on tiny GPT-2s: all-real equals stock, removing a site changes only its
path, sigmas frozen at removal, state round trips, dtypes and devices, the norm statistics, the errors, and
calibration in eval mode whatever the model's mode."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrated_all_removed, ids, remove_all, stock_and_removable, tiny_config

from lnfree.model import load_removable, make_removable, next_token_ce, parse_site_name, save_removable
from lnfree.norm import BOS, EOT, ORDINARY


def test_all_real_matches_stock_with_and_without_padding():
    stock, model = stock_and_removable()
    x = ids()
    assert torch.allclose(stock(x).logits, model(x).logits, atol=1e-5)
    for side in ("left", "right"):
        mask = torch.ones_like(x)
        if side == "left":
            mask[0, :5] = 0
        else:
            mask[0, -5:] = 0
        a = stock(x, attention_mask=mask).logits
        b = model(x, attention_mask=mask).logits
        keep = mask.bool()
        assert torch.allclose(a[keep], b[keep], atol=1e-5)
    pos = torch.arange(16).flip(0)[None].repeat(2, 1)
    assert torch.allclose(stock(x, position_ids=pos).logits, model(x, position_ids=pos).logits, atol=1e-5)


def test_all_real_generate_equals_stock_token_for_token():
    stock, model = stock_and_removable()
    prompt = ids(2, 6)
    mask = torch.ones_like(prompt)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=mask)
    assert torch.equal(stock.generate(prompt, **kw), model.generate(prompt, **kw))


def test_hidden_states_and_eager_attention():
    stock, model = stock_and_removable(attn_implementation="eager")
    x = ids()
    a = stock(x, output_hidden_states=True, output_attentions=True)
    b = model(x, output_hidden_states=True, output_attentions=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert torch.allclose(ha, hb, atol=1e-5)
    assert torch.allclose(a.attentions[-1], b.attentions[-1], atol=1e-6)


def _capture(model):
    """Input and output of every norm module, by module."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.__setitem__(mod, (i[0], o)))
             for b in model.transformer.h for m in (b.ln_1, b.ln_2)]
    hooks.append(model.transformer.ln_f.register_forward_hook(lambda mod, i, o: seen.__setitem__(mod, (i[0], o))))
    return seen, hooks


@pytest.mark.parametrize("kind,block", [("ln2", 0), ("ln1qk", 1), ("ln1v", 0), ("lnf", None)])
def test_removing_one_site_changes_only_its_path(kind, block):
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32, seed=3))
    sigma = model.remove(kind, block)
    assert model.removed_sites() == [f"{kind}.{block}" if block is not None else "lnf"]
    seen, hooks = _capture(model)
    model(ids())
    for h in hooks:
        h.remove()

    def real(x, mod):
        return F.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, mod.eps)

    def frozen(x, mod, s):  # the formula, written out by hand
        return (x - x.mean(-1, keepdim=True)) / s * mod.weight + mod.bias

    d = model.config.n_embd
    for i, b in enumerate(model.transformer.h):
        x, out = seen[b.ln_1]
        qk_removed, v_removed = (kind, block) == ("ln1qk", i), (kind, block) == ("ln1v", i)
        if qk_removed or v_removed:
            assert out.shape[-1] == d + 2  # [u, f_qk, f_v]: the shared input and each path's factor
            exp_qk = frozen(x, b.ln_1, sigma) if qk_removed else real(x, b.ln_1)
            exp_v = frozen(x, b.ln_1, sigma) if v_removed else real(x, b.ln_1)
            got_qk, got_v = b.ln_1.paths(out)
            assert torch.allclose(got_qk, exp_qk, atol=1e-5)
            assert torch.allclose(got_v, exp_v, atol=1e-5)
        else:
            assert torch.allclose(out, real(x, b.ln_1), atol=1e-5)
        x, out = seen[b.ln_2]
        exp = frozen(x, b.ln_2, sigma) if (kind, block) == ("ln2", i) else real(x, b.ln_2)
        assert torch.allclose(out, exp, atol=1e-5)
    x, out = seen[model.transformer.ln_f]
    lnf = model.transformer.ln_f
    assert torch.allclose(out, frozen(x, lnf, sigma) if kind == "lnf" else real(x, lnf), atol=1e-5)


@pytest.mark.parametrize("removed", [["ln1qk.0"], ["ln1v.0"], ["ln1qk.0", "ln1v.0"]])
def test_split_qkv_projection_reads_q_k_from_the_qk_path_and_v_from_the_v_path(removed):
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32, seed=3))
    sigmas = {name: model.remove(*parse_site_name(name)) for name in removed}
    block = model.transformer.h[0]
    x = torch.randn(2, 16, model.config.n_embd) * 3 + 1
    ln, w, b = block.ln_1, block.attn.c_attn.weight, block.attn.c_attn.bias
    real = F.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, ln.eps)

    def path(name):  # written out by hand: frozen (x - mean) / sigma * gamma + beta, or the real LayerNorm
        if name in sigmas:
            return (x - x.mean(-1, keepdim=True)) / sigmas[name] * ln.weight + ln.bias
        return real

    d = model.config.n_embd
    with torch.no_grad():
        got = block.attn.c_attn(ln(x))
        ref = torch.cat([(path("ln1qk.0") @ w + b)[..., :2 * d], (path("ln1v.0") @ w + b)[..., 2 * d:]], -1)
    assert got.shape == (2, 16, 3 * d)
    assert torch.allclose(got, ref, atol=1e-5)


def _train_step(model, opt, x):
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.commit_norm_stats(momentum=0.9)


def test_sigma_frozen_at_removal_and_qk_v_separate():
    _, model = stock_and_removable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    qk, v = model.site("ln1qk", 0), model.site("ln1v", 0)
    _train_step(model, opt, ids(4, 32, seed=0))
    est_before = qk.running[ORDINARY].clone()
    _train_step(model, opt, ids(4, 32, seed=1))
    assert not torch.equal(est_before, qk.running[ORDINARY])  # the estimate moves on training steps
    s_qk = model.remove("ln1qk", 0)
    assert s_qk == pytest.approx(float(qk.running[ORDINARY]))
    for seed in range(2, 5):
        _train_step(model, opt, ids(4, 32, seed=seed))
    s_v = model.remove("ln1v", 0)
    assert s_v == pytest.approx(float(v.running[ORDINARY]))
    assert s_v != pytest.approx(s_qk, abs=1e-7)  # each path froze at its own event
    frozen = {k: s.sigma.clone() for k, s in model.sites().items()}
    running = {k: s.running.clone() for k, s in model.sites().items()}
    for seed in range(5, 8):
        _train_step(model, opt, ids(4, 32, seed=seed))
    model.eval()
    with torch.no_grad():
        model(ids(4, 32, seed=9))
    model.commit_norm_stats(momentum=0.9)  # nothing was recorded in eval: nothing changes
    for k, s in model.sites().items():
        assert torch.equal(s.sigma.nan_to_num(), frozen[k].nan_to_num())
    assert model.sigmas()["ln1qk.0"] == s_qk and model.sigmas()["ln1v.0"] == s_v
    # real sites kept estimating through training but not through the eval pass
    model.train()
    before = model.site("ln2", 1).running.clone()
    with torch.no_grad():
        model(ids())
    model.commit_norm_stats(0.9)
    assert torch.equal(before.nan_to_num(), model.site("ln2", 1).running.nan_to_num())
    assert not torch.equal(running["ln2.1"], before)


def test_state_dict_round_trip_restores_modes_and_sigmas(tmp_path):
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32))
    model.remove("ln2", 0), model.remove("ln1v", 1), model.remove("lnf")
    fresh = make_removable(tiny_config())
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert fresh.removed_sites() == model.removed_sites()
    assert fresh.sigmas() == model.sigmas()
    assert torch.equal(fresh(ids()).logits, model(ids()).logits)
    save_removable(model, tmp_path / "m")
    loaded = load_removable(tmp_path / "m").eval()
    assert loaded.sigmas() == model.sigmas()
    assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_gradient_checkpointing_same_loss_grads_and_stats():
    _, a = stock_and_removable()
    a.calibrate(ids(4, 32))
    a.remove("ln1qk", 0)
    b = make_removable(tiny_config())
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    results = []
    for m in (a, b):
        m.train()
        x = ids(2, 32, seed=5)
        loss = m(x, labels=x).loss
        loss.backward()
        m.commit_norm_stats(momentum=0.5)
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()},
                        {n: s.running.clone() for n, s in m.sites().items()}))
    assert b.is_gradient_checkpointing
    (la, ga, ra), (lb, gb, rb) = results
    assert torch.allclose(la, lb, atol=1e-6)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-6), n
    for n in ra:  # recomputation adds the same std twice: the mean, and so the estimate, is unchanged
        assert torch.allclose(ra[n].nan_to_num(), rb[n].nan_to_num(), atol=1e-6), n


def test_dropout_only_in_training_mode():
    model = make_removable(tiny_config(resid_pdrop=0.5, attn_pdrop=0.5, embd_pdrop=0.5))
    model.eval()
    x = ids()
    assert torch.equal(model(x).logits, model(x).logits)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)


def test_bf16_keeps_fp32_sigmas_and_runs():
    _, model = calibrated_all_removed()
    ref = model(ids()).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids()).logits
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05
    half = make_removable(tiny_config())
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    site = half.site("ln2", 0)
    assert site.sigma.dtype == torch.float32 and half.transformer.h[0].ln_2.weight.dtype == torch.bfloat16
    assert half.sigmas() == model.sigmas()
    assert half(ids()).logits.dtype == torch.bfloat16


def test_all_removed_generate_with_and_without_cache_agree():
    _, model = calibrated_all_removed()
    prompt = ids(2, 5)
    kw = dict(max_new_tokens=15, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_special_bos_sigma_is_per_position():
    _, model = stock_and_removable(lnfree_special_bos=True)
    x = ids(4, 32)
    model.calibrate(x)
    site = model.site("ln2", 0)
    assert not torch.isnan(site.running[BOS])  # position 0 measured on its own
    model.remove("ln2", 0)
    assert site.special_active and site.sigma[BOS] != site.sigma[ORDINARY]
    seen, hooks = _capture(model)
    model(x)
    inp, out = seen[model.transformer.h[0].ln_2]
    mod = model.transformer.h[0].ln_2
    centred = inp - inp.mean(-1, keepdim=True)
    assert torch.allclose(out[:, 0], centred[:, 0] / site.sigma[BOS] * mod.weight + mod.bias, atol=1e-5)
    assert torch.allclose(out[:, 1:], centred[:, 1:] / site.sigma[ORDINARY] * mod.weight + mod.bias, atol=1e-5)
    model.end_special("bos", 0)
    model(x)
    inp, out = seen[mod]
    for h in hooks:
        h.remove()
    assert not site.special_active
    assert torch.allclose(out[:, 0], (inp[:, 0] - inp[:, 0].mean(-1, keepdim=True)) / site.sigma[ORDINARY]
                          * mod.weight + mod.bias, atol=1e-5)


def test_special_bos_sigma_on_the_split_ln1_paths_and_per_category_statistics():
    _, model = stock_and_removable(lnfree_special_bos=True)
    x = ids(4, 32)
    model.calibrate(x)
    model.remove("ln1qk", 0)  # qk frozen with its own bos sigma; v still real and measured
    site, v = model.site("ln1qk", 0), model.site("ln1v", 0)
    assert site.special_active and site.sigma[BOS] != site.sigma[ORDINARY]
    seen, hooks = _capture(model)
    model.train()
    v.acc.zero_()
    model(x)
    for h in hooks:
        h.remove()
    mod = model.transformer.h[0].ln_1
    inp, out = seen[mod]
    x_qk, _ = mod.paths(out)
    centred = inp - inp.mean(-1, keepdim=True)
    assert torch.allclose(x_qk[:, 0], centred[:, 0] / site.sigma[BOS] * mod.weight + mod.bias, atol=1e-5)
    assert torch.allclose(x_qk[:, 1:], centred[:, 1:] / site.sigma[ORDINARY] * mod.weight + mod.bias, atol=1e-5)
    # the real v path records each token's std under its category: position 0 apart
    assert v.acc[1, BOS] == 4 and v.acc[1, ORDINARY] == 4 * 31
    std = (centred.pow(2).mean(-1) + mod.eps).rsqrt().reciprocal().detach()  # [batch, pos]
    assert float(v.acc[0, BOS]) == pytest.approx(float(std[:, 0].sum()), rel=1e-5)
    assert float(v.acc[0, ORDINARY]) == pytest.approx(float(std[:, 1:].sum()), rel=1e-5)


@pytest.mark.parametrize("removed", [[], ["ln1qk"], ["ln1qk", "ln1v", "ln2", "lnf"]])
def test_no_statistics_outside_training_unless_recording(removed):
    # validation/evaluation forwards must not feed the running estimate that the next training step commits
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32, seed=3))
    for kind in removed:
        model.remove(kind, None if kind == "lnf" else 0)
    for s in model.sites().values():
        s.acc.zero_()
    model.eval()
    model(ids())  # eval mode, gradients enabled
    model.train()
    with torch.no_grad():
        model(ids())  # training mode under no_grad
    assert all(torch.count_nonzero(s.acc) == 0 for s in model.sites().values())
    model(ids())  # a training forward does record, in every real site
    assert all((torch.count_nonzero(s.acc) > 0) != s.is_removed for s in model.sites().values())


def test_all_real_uses_the_config_eps_in_eval_and_training():
    stock, model = stock_and_removable(layer_norm_epsilon=0.5)  # far from LayerNorm's default 1e-5
    x = ids()
    assert torch.allclose(model(x).logits, stock(x).logits, atol=1e-5)  # no statistics: F.layer_norm
    model.train(), stock.train()
    assert torch.allclose(model(x).logits, stock(x).logits, atol=1e-5)  # statistics: native_layer_norm


def test_bf16_model_with_special_sigmas_stays_bf16():
    # per-token fp32 sigmas ([batch, pos, 1]) must not promote a bf16 model's activations to fp32
    _, model = stock_and_removable(lnfree_special_bos=True)
    x = ids(4, 32)
    model.calibrate(x)
    remove_all(model)
    assert model.site("ln2", 0).special_active
    ref = model(x).logits
    half = model.to(torch.bfloat16)
    out = half(x).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


def test_site_state_layout_is_what_checkpoints_and_exports_hold():
    # the file format of every checkpoint and export: two bool flags and two fp32 [ordinary, bos, eot] vectors
    _, model = stock_and_removable()
    state = model.transformer.h[0].ln_2.site.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "removed": (torch.bool, ()), "special": (torch.bool, (2,)),
        "running": (torch.float32, (3,)), "sigma": (torch.float32, (3,))}  # accumulators are not saved


def test_sigma_state_follows_device_moves():
    _, model = calibrated_all_removed()
    meta = model.to("meta")
    for s in meta.sites().values():
        assert {b.device.type for b in (s.running, s.sigma, s.acc)} == {"meta"}
        assert s.sigma.dtype == torch.float32


def test_removable_norms_keep_layernorm_attributes_that_tools_read():
    stock, model = stock_and_removable(layer_norm_epsilon=1e-3)
    for ours, theirs in ((model.transformer.h[1].ln_1, stock.transformer.h[1].ln_1),
                         (model.transformer.ln_f, stock.transformer.ln_f)):
        assert ours.normalized_shape == theirs.normalized_shape == (model.config.n_embd,)
        assert ours.eps == theirs.eps == 1e-3


@pytest.mark.parametrize("removed", [[], ["ln1qk"], ["ln1qk", "ln1v"]])
def test_split_qkv_projection_under_autocast_returns_the_autocast_dtype(removed):
    # as a stock c_attn (addmm) does under bf16 autocast, whichever input form ln_1 hands it
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32, seed=3))
    for kind in removed:
        model.remove(kind, 0)
    seen = {}
    hook = model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids())
    hook.remove()
    assert seen["out"].dtype == torch.bfloat16


def test_remove_errors():
    model = make_removable(tiny_config())
    with pytest.raises(FloatingPointError, match="never calibrated"):
        model.remove("ln2", 0)
    with pytest.raises(KeyError):
        model.remove("ln3", 0)
    model.calibrate(ids())
    model.remove("ln2", 0)
    with pytest.raises(RuntimeError, match="already removed"):
        model.remove("ln2", 0)


def test_unknown_sites_are_named_in_the_error():
    model = make_removable(tiny_config())  # 2 blocks
    kinds = r"\('ln2', 'ln1qk', 'ln1v', 'lnf'\)"
    with pytest.raises(KeyError, match=rf"no site 'ln2\.5'; sites are {kinds} x blocks 0\.\.1"):
        model.site("ln2", 5)
    unknown = (r"unknown site kind 'ln3'; kinds are \('pre_mlp', 'attn_qk', 'attn_v', 'final'\) "
               rf"\(gpt2 names their sites {kinds}\)")
    with pytest.raises(KeyError, match=unknown):
        model.site("ln3", 0)
    with pytest.raises(KeyError, match=r"site kind 'ln2' needs a block"):
        model.site("ln2")
    with pytest.raises(KeyError, match=r"site kind 'pre_mlp' needs a block"):
        model.site_name("pre_mlp")


def test_remove_freezes_an_eot_sigma_when_the_config_asks():
    _, model = stock_and_removable(lnfree_special_eot=True)
    x = ids(4, 32)
    x[:, 7] = x[:, 19] = model.config.eos_token_id
    model.train()
    model(x)
    assert model.site("ln2", 0).acc[1].tolist() == [4 * 30, 0, 4 * 2, 0]  # ordinary, bos, eot, ignored
    model.eval()
    model.calibrate(x)
    model.remove("ln2", 0)
    site = model.site("ln2", 0)
    assert site.special.tolist() == [False, True] and site.sigma[EOT] != site.sigma[ORDINARY]


def test_a_reference_is_made_removable_through_io_from_an_hf_dir_and_from_a_saved_removable_dir(tmp_path):
    from lnfree.io import load

    stock, _ = stock_and_removable()
    stock.save_pretrained(tmp_path / "hf")
    with pytest.raises(TypeError, match=r"lnfree\.load\(reference, removable=True\)"):
        make_removable(str(tmp_path / "hf"))  # a path is a reference: io checks it, make_removable never reads one
    model, _ = load(str(tmp_path / "hf"), removable=True)
    x = ids()
    assert torch.allclose(model.eval()(x).logits, stock(x).logits, atol=1e-5)
    model.calibrate(ids(4, 32, seed=3))
    model.remove("ln1v", 1)
    save_removable(model, tmp_path / "removable")
    back, _ = load(tmp_path / "removable", removable=True)  # modes and sigmas come back, not a fresh all-real model
    assert back.removed_sites() == ["ln1v.1"] and back.sigmas() == model.sigmas()


@pytest.mark.parametrize("attn", [None, "eager", "sdpa"])
def test_make_removable_from_a_config_keeps_its_attention_implementation(attn):
    cfg = tiny_config()
    cfg._attn_implementation = attn
    assert make_removable(cfg).config._attn_implementation == (attn or "sdpa")


def test_statistics_leave_out_padding_and_follow_the_given_positions():
    _, model = stock_and_removable(lnfree_special_bos=True)
    model.train()
    site = model.site("ln2", 0)
    x, mask = ids(2, 16), torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding: 5 tokens that are no token's context
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    model(x, attention_mask=mask, position_ids=pos)
    # position 0 is where position_ids == 0 (token 5 of row 0); padding (position_ids 0 too) counts nowhere
    assert site.acc[1, BOS] == 2 and site.acc[1, ORDINARY] == 32 - 5 - 2
    site.acc.zero_()
    model(x, attention_mask=mask, position_ids=pos + 3)  # a continuation: no token at position 0
    assert site.acc[1, BOS] == 0 and site.acc[1, ORDINARY] == 32 - 5
    _, plain = stock_and_removable()  # no special sigmas: padding is still left out
    plain.train()
    plain(x, attention_mask=mask)
    assert plain.site("ln2", 0).acc[1].tolist() == [32 - 5, 0, 0, 5]  # ordinary, bos, eot, ignored


@pytest.mark.parametrize("cache_arg", ["cache", "past_key_values"])  # transformers 5's name, and the old one
def test_tokens_after_a_kv_cache_are_not_at_position_zero(cache_arg):
    from lnfree.norm import recording

    _, model = stock_and_removable(lnfree_special_bos=True)
    x = ids(2, 8)
    cache = model(x[:, :5], use_cache=True).cache
    with recording(model.token_context), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values is deprecated
        model(x[:, 5:6], use_cache=True, **{cache_arg: cache})
    assert model.site("ln2", 0).acc[1].tolist() == [2, 0, 0, 0]  # the 6th tokens: ordinary


def test_token_categories_are_built_on_the_input_device():
    _, model = stock_and_removable(lnfree_special_bos=True)
    cat = model._token_categories(ids(2, 8).to("meta"), None, None, {})
    assert cat.device.type == "meta" and cat.dtype == torch.long


def test_statistics_from_inputs_embeds_mark_position_zero():
    _, model = stock_and_removable(lnfree_special_bos=True)
    model.train()
    embeds = model.transformer.wte(ids(2, 16)).detach()
    model(inputs_embeds=embeds)
    site = model.site("ln2", 0)
    assert site.acc[1, BOS] == 2 and site.acc[1, ORDINARY] == 2 * 15


def test_make_removable_keeps_dtype_and_refuses_what_is_not_gpt2():
    stock, _ = stock_and_removable()
    assert make_removable(stock.to(torch.bfloat16)).transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="^cannot make a removable model from int$"):
        make_removable(42)
    stock.transformer.h[1].mlp.c_proj = torch.nn.Identity()  # a GPT2LMHeadModel without some GPT-2 weights
    missing = r"\['transformer\.h\.1\.mlp\.c_proj\.weight', 'transformer\.h\.1\.mlp\.c_proj\.bias'\]"
    with pytest.raises(RuntimeError, match=rf"do not match a gpt2 layout: missing {missing}, unexpected \[\]"):
        make_removable(stock)


def test_unsupported_config_refused_naming_the_supported_families():
    from transformers import BertConfig

    with pytest.raises(ValueError, match=r"model_type='bert'.*supported families are gpt2 \(gpt2\), llama "):
        make_removable(BertConfig())


def test_something_without_a_model_type_is_refused_by_name():
    from types import SimpleNamespace

    from lnfree.model import check_gpt2_config

    with pytest.raises(ValueError, match=r"got model_type=None \(SimpleNamespace\)$"):
        check_gpt2_config(SimpleNamespace(n_layer=2))
    with pytest.raises(ValueError, match="^GPT-2 with cross-attention is not supported$"):
        check_gpt2_config(tiny_config(add_cross_attention=True))
    check_gpt2_config(SimpleNamespace(model_type="gpt2"))  # duck-typed, no cross-attention flag: accepted


def test_no_host_sync_from_the_removal_machinery():
    """forward + backward + the per-step statistics commit of the removable model (all real: statistics
    recorded; half removed; all removed) make no more host syncs than stock GPT-2's forward + backward."""
    from lnfree.bench.syncs import count_syncs

    stock, model = stock_and_removable()
    x = ids(2, 32)

    def step(m, commit):
        def run():
            m.train()
            m(x, labels=x).loss.backward()
            if commit:
                m.commit_norm_stats(0.9)
        return run

    base = count_syncs(step(stock, False))
    assert count_syncs(step(model, True)) == base
    model.calibrate(x)
    for i in range(2):
        model.remove("ln2", i)
    model.remove("ln1qk", 0)
    assert count_syncs(step(model, True)) == base
    remove_all_rest = [n for n in model.real_sites()]
    for n in remove_all_rest:
        k, _, b = n.partition(".")
        model.remove(k, int(b) if b else None)
    assert count_syncs(step(model, True)) == base
    assert count_syncs(lambda: model.sigmas()) > 0  # the counter does see a sync (sigmas() reads values)


def test_site_names_parse_back():
    assert parse_site_name("lnf") == ("lnf", None)
    assert parse_site_name("ln1qk.3") == ("ln1qk", 3)
    _, model = stock_and_removable()
    for name in model.sites():
        assert model.site_name(*parse_site_name(name)) == name


def test_save_removable_makes_parents_overwrites_and_keeps_the_tokenizer(tmp_path):
    import json

    from lnfree.data import corpus

    _, model = stock_and_removable()
    model.calibrate(ids(4, 32))
    model.remove("ln2", 0)
    out = tmp_path / "a" / "b"
    save_removable(model, out)
    save_removable(model, out, tokenizer=corpus.load_tokenizer())  # a second save into the same folder
    assert json.loads((out / "lnfree.json").read_text()) == {"sigmas": model.sigmas()}
    assert (out / "tokenizer.json").exists()
    assert load_removable(out).sigmas() == model.sigmas()


def test_non_embedding_params_leaves_out_token_and_position_embeddings():
    from lnfree.model import non_embedding_params

    _, model = stock_and_removable()
    c = model.config
    d, L = c.n_embd, c.n_layer
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert non_embedding_params(model) == L * per_block + 2 * d  # + ln_f; the unembedding is tied to wte


def test_a_call_with_labels_is_quiet_and_its_loss_is_the_causal_lm_loss(recwarn):
    import logging

    from transformers.utils import logging as hf_logging

    stock, model = stock_and_removable()
    x = ids()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger().addHandler(handler)
    try:
        loss = model(x, labels=x).loss
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert not [r for r in records if "loss_type" in r.getMessage()]
    assert torch.allclose(loss, stock(x, labels=x).loss, atol=1e-6)


def test_next_token_ce_predicts_the_following_token():
    torch.manual_seed(0)
    logits, x = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    by_hand = -torch.stack([F.log_softmax(logits[b, t], -1)[x[b, t + 1]] for b in range(2) for t in range(5)])
    assert float(next_token_ce(logits, x)) == pytest.approx(float(by_hand.mean()), rel=1e-6)
    assert float(next_token_ce(logits, x, reduction="sum")) == pytest.approx(float(by_hand.sum()), rel=1e-6)


def test_a_reference_is_sent_to_lnfree_load_by_name():
    import re

    for ref in ("gpt2", "runs/some/run.ckpt"):
        with pytest.raises(TypeError, match=rf"^make_removable takes a model or a config, not the reference "
                                            rf"'{re.escape(ref)}': load it with lnfree\.load\(reference, "
                                            rf"removable=True\), which checks it first$"):
            make_removable(ref)


def test_make_removable_builds_each_familys_removable_class_from_a_config():
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    small = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)
    for config, stock in ((LlamaConfig(**small, num_key_value_heads=2), LlamaForCausalLM),
                          (Qwen2Config(**small, num_key_value_heads=2), Qwen2ForCausalLM),
                          (GPTNeoXConfig(**small), GPTNeoXForCausalLM)):
        model = make_removable(config)  # random init, every site real
        assert isinstance(model, stock) and type(model).__name__ == f"Removable{stock.__name__}"
        assert model.config.model_type == config.model_type and len(model.real_sites()) == len(model.sites()) == 7


def test_calibration_runs_in_eval_mode_whatever_the_mode_and_restores_it():
    stock, _ = stock_and_removable(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    batch = ids(4, 32)
    sigmas = []
    for mode in (True, False, True):
        model = make_removable(stock).train(mode)
        model.calibrate(batch)
        assert model.training is mode
        sigmas.append(model.sigmas())
    assert sigmas[0] == sigmas[1] == sigmas[2]  # no dropout in the estimate: deterministic, mode-independent
    assert make_removable(stock).training is False  # the source's mode (stock is in eval mode)
