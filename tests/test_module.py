"""The LightningModule (lnfree/training/module.py): the auxiliary loss's target, the LR schedule, the training and
validation steps and what they log, the optimizer's groups, the token counter and torch.compile, each against a
hand computation."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ids, stock_and_removable, tiny_config

from lnfree.model import make_removable, next_token_ce
from lnfree.training.callbacks import LNRemovalCallback
from lnfree.training.module import lr_lambda, residual_std_aux


def test_aux_loss_target_is_the_mean_std_of_ordinary_tokens_by_hand():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8) * torch.tensor([3.0, 1, 1, 1, 1]).view(1, 5, 1)  # position 0 is an outlier
    x = torch.tensor([[7, 1, 2, 9, 3], [7, 9, 4, 5, 6]])  # 9 = end-of-text
    h.requires_grad_(True)
    loss = residual_std_aux(h, x, eot_id=9)
    s = torch.sqrt(h.detach().var(-1, unbiased=False) + 1e-5)
    ordinary = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)  # not pos 0, not eot
    tau = s[ordinary].mean()
    assert float(loss) == pytest.approx(float(((s - tau) ** 2).mean()), rel=1e-5)
    # tau is a target, not a path for gradients: d loss / d s_t = 2 (s_t - tau) / N only
    loss.backward()
    hs = h.detach().clone().requires_grad_(True)
    s2 = torch.sqrt(hs.var(-1, unbiased=False) + 1e-5)
    ((s2 - tau) ** 2).mean().backward()
    assert torch.allclose(h.grad, hs.grad, atol=1e-6)
    no_eot = residual_std_aux(h.detach(), x, eot_id=None)  # without an eot id only position 0 is excluded
    tau_all = s[:, 1:].mean()
    assert float(no_eot) == pytest.approx(float(((s - tau_all) ** 2).mean()), rel=1e-5)
    one = residual_std_aux(h.detach()[:1, :2], x[:1, :2], eot_id=9)  # a single ordinary token: tau is its std
    assert float(one) == pytest.approx(float(((s[0, :2] - s[0, 1]) ** 2).mean()), rel=1e-5)


def test_lr_schedule_warm_up_steps_and_cosine_by_hand():
    lr, min_lr, warm, decay = 6e-4, 6e-5, 4, 20
    got = [lr * lr_lambda(s, warm, decay, lr, min_lr) for s in range(25)]
    assert got[:4] == pytest.approx([lr / 4, 2 * lr / 4, 3 * lr / 4, lr])  # never 0 at the first step
    for s in range(4, 20):
        p = (s - warm) / (decay - warm)
        assert got[s] == pytest.approx(min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p)))
    assert got[12] == pytest.approx((lr + min_lr) / 2)  # halfway through the cosine
    assert got[20:] == pytest.approx([min_lr] * 5)  # flat at the floor after decay_steps
    assert lr_lambda(0, 0, 10, lr, min_lr) == pytest.approx(1.0)  # no warm-up
    assert lr_lambda(4, 4, 4, lr, min_lr) == pytest.approx(min_lr / lr)  # no cosine: the floor right after warm-up


def test_token_counter_is_an_exact_integer_and_callback_state_round_trips():
    from types import SimpleNamespace as NS

    from lnfree.training.module import LNFreeModule

    _, model = stock_and_removable()
    module = LNFreeModule(model, NS())
    assert module.tokens_seen.dtype == torch.int64  # a float32 counter would stop counting exactly at 2^24 tokens
    assert module.run_info == {} and module.aux_weight == 0.0 and module.lr_scale == 1.0  # the documented defaults
    assert module.max_steps == 1 and module._use_compile is False and module._sharded is False
    cb = LNRemovalCallback([], momentum=0.9)
    cb.load_state_dict({})  # a checkpoint written before the log existed
    assert cb.applied == []
    cb.load_state_dict({"applied": [{"site": "ln2.0", "step": 4}]})
    assert cb.state_dict() == {"applied": [{"site": "ln2.0", "step": 4}]}


def test_final_residual_is_kept_only_for_a_training_step_with_the_aux_loss():
    from types import SimpleNamespace as NS

    from lnfree.training.module import LNFreeModule

    _, model = stock_and_removable()
    x = ids(2, 16)
    for aux, training, kept in ((0.1, True, True), (0.1, False, False), (0.0, True, False)):
        module = LNFreeModule(model, NS(), aux_weight=aux)
        module.train(training)
        module(x)
        assert (module._final_resid is not None) == kept, (aux, training)
        if kept:  # ln_f's input: [batch, pos, d]
            assert module._final_resid.shape == (2, 16, model.config.n_embd)


def test_training_and_validation_steps_compute_and_log_what_the_dashboards_read():
    from lnfree.training.module import LNFreeModule

    class LogRecorder(LNFreeModule):
        """Records each self.log call (value and options) instead of handing it to a Trainer."""

        def log(self, name, value, **options):
            self.logged[name] = (value, options)

    _, model = stock_and_removable()
    x = ids(2, 16)
    x[0, 5] = x[1, 9] = model.config.eos_token_id  # end-of-text tokens are left out of the aux target
    groups = [{"lr": 3e-4}, {"lr": 1.0}]  # the first group's LR is the one logged
    for aux_weight in (0.0, 0.25):
        module = LogRecorder(model, SimpleNamespace(), aux_weight=aux_weight)
        module.logged = {}
        module.trainer = SimpleNamespace(world_size=3, optimizers=[SimpleNamespace(param_groups=groups)])
        module.train()
        logits = module(x)  # the same forward the step makes (no dropout): expected values by hand
        ce = next_token_ce(logits, x)
        aux = residual_std_aux(module._final_resid, x, model.config.eos_token_id) if aux_weight else None
        out = module.training_step(x, 0)
        module.training_step(x, 1)
        assert module._final_resid is None  # not kept past its step
        expected_loss = ce + aux_weight * aux if aux_weight else ce
        assert float(out["loss"]) == pytest.approx(float(expected_loss), rel=1e-6)
        assert float(out["ce"]) == pytest.approx(float(ce), rel=1e-6) and not out["ce"].requires_grad
        names = {"train/ce", "train/loss", "train/tokens_seen", "train/lr"} | ({"train/aux"} if aux_weight else set())
        assert set(module.logged) == names
        assert module.logged["train/ce"][1] == {"prog_bar": True}
        assert float(module.logged["train/loss"][0]) == pytest.approx(float(expected_loss), rel=1e-6)
        if aux_weight:
            assert float(module.logged["train/aux"][0]) == pytest.approx(float(aux), rel=1e-6)
        assert module.logged["train/tokens_seen"] == (pytest.approx(2 * (2 * 16 * 3)), {"reduce_fx": "max"})
        assert module.logged["train/lr"] == (3e-4, {})
    module.eval()
    module.validation_step(x, 0)
    value, options = module.logged["val/ce"]
    assert float(value) == pytest.approx(float(next_token_ce(module(x), x)), rel=1e-6)
    assert options == {"prog_bar": True, "sync_dist": True, "batch_size": 2}  # mean over ranks, weighted by batch


def test_optimizer_groups_decay_only_matrices_and_scale_the_lr():
    from lnfree.training.module import LNFreeModule

    _, model = stock_and_removable()
    params = dict(model.named_parameters())
    matrices = {n for n, p in params.items() if p.ndim >= 2}
    embeddings = {n for n in params if n.endswith(("wte.weight", "wpe.weight"))}
    assert len(embeddings) == 2 and {n for n in params if "ln_" in n} <= set(params) - matrices
    for decay_embeddings in (False, True):
        optim = SimpleNamespace(weight_decay=0.1, decay_embeddings=decay_embeddings, lr=1e-3, min_lr=1e-4,
                                betas=[0.9, 0.95], eps=1e-6, warmup_steps=2, decay_steps=None)
        module = LNFreeModule(model, optim, max_steps=10, lr_scale=2.0)
        out = module.configure_optimizers()
        opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
        decay, no_decay = opt.param_groups
        names = {id(p): n for n, p in params.items()}
        expected = matrices if decay_embeddings else matrices - embeddings
        assert {names[id(p)] for p in decay["params"]} == expected
        assert {names[id(p)] for p in no_decay["params"]} == set(params) - expected  # biases, norm gains
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
        assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6
        assert opt.defaults["fused"] is None  # on the CPU
        assert out["lr_scheduler"]["interval"] == "step"
        peak = 2e-3  # lr * lr_scale, and min_lr * lr_scale at the end of the cosine (decay_steps = max_steps)
        assert [g["initial_lr"] for g in opt.param_groups] == [peak, peak]
        for step in (0, 1, 5, 10, 12):
            assert sched.lr_lambdas[0](step) == lr_lambda(step, 2, 10, peak, 2e-4)
    module._device = SimpleNamespace(type="cuda", index=0)  # on CUDA: the fused AdamW (CPU params accept it)
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True
    frozen = LNFreeModule(model, optim)
    for p in model.transformer.wte.parameters():
        p.requires_grad_(False)
    opt = frozen.configure_optimizers()["optimizer"]
    assert all(p is not model.transformer.wte.weight for g in opt.param_groups for p in g["params"])
    held = {id(p) for g in opt.param_groups for p in g["params"]}  # every parameter after the frozen one too
    assert held == {id(p) for p in model.parameters() if p.requires_grad} and len(held) == len(params) - 1


def test_a_checkpoint_carries_the_model_config_and_the_run_info():
    """lnfree.io.load rebuilds the model from the checkpoint alone, and resume compares the run info."""
    from lnfree.io import CKPT_MODEL_CONFIG, RUN_INFO
    from lnfree.training.module import LNFreeModule

    _, model = stock_and_removable()
    checkpoint = {}
    LNFreeModule(model, SimpleNamespace(), run_info={"seed": 3}).on_save_checkpoint(checkpoint)
    assert checkpoint == {CKPT_MODEL_CONFIG: model.config.to_dict(), RUN_INFO: {"seed": 3}}


def test_without_compile_the_runner_is_the_model_itself():
    """model.compile=false (the default): forward runs the model as it is, never a torch.compile wrapper."""
    from lnfree.training.module import LNFreeModule

    model = make_removable(tiny_config(n_layer=1, n_embd=8))  # small and no forward: cheap, so mutmut runs it first
    module = LNFreeModule(model, SimpleNamespace())
    assert module._runner() is model and module._runner() is model and not module._compiled


def test_compile_wraps_the_model_once_and_raises_the_recompile_limit():
    """model.compile=true: one torch.compile wrapper, made at first use (compilation itself happens at its first
    call, which this test never makes), and a recompile limit of 4 x (sites + 2), never lowered."""
    import torch._dynamo

    from lnfree.training.module import LNFreeModule

    cfg = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit") if hasattr(cfg, n)]
    assert names
    saved = {n: getattr(cfg, n) for n in names}  # restored by hand: pytest's monkeypatch would delete them
    try:
        for n in names:
            setattr(cfg, n, 2)
        _, model = stock_and_removable()
        module = LNFreeModule(model, SimpleNamespace(), compile=True)
        runner = module._runner()
        assert runner is not model and runner._orig_mod is model and module._runner() is runner
        assert [getattr(cfg, n) for n in names] == [4 * (7 + 2)] * len(names)  # 7 sites in a 2-block model
        for n in names:
            setattr(cfg, n, 1000)
        LNFreeModule(model, SimpleNamespace(), compile=True)._runner()
        assert [getattr(cfg, n) for n in names] == [1000] * len(names)
        assert module.state_dict().keys() == LNFreeModule(model, SimpleNamespace()).state_dict().keys()  # no wrapper
    finally:
        for n, v in saved.items():
            setattr(cfg, n, v)
