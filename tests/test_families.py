"""Per-family tests (lnfree/families): Llama architecture (Llama, Mistral, Qwen2) and GPT-NeoX on tiny random
configs. The reference for every removal stage is written here from the stock Hugging Face model and a few lines
of torch (no lnfree code): each norm is replaced by the formula, real or with the frozen sigma, and the
attention-input readers read their own path (query/key or value) of the norm."""

import pytest
import torch
from conftest import needs
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
)

from lnfree.export import HF_EPS, ExportError, export_folded, export_hf
from lnfree.families import UnsupportedFamily
from lnfree.io import load
from lnfree.model import make_removable
from lnfree.norm import recording

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=96, eos_token_id=96, tie_word_embeddings=False,
             initializer_range=0.15)  # sharp attention: a wrong query/key scale shows in the logits
LLAMA_LIKE = dict(num_key_value_heads=2, rms_norm_eps=1e-6, attention_dropout=0.0)
NEOX = dict(rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-5)
CASES = {  # name: (stock class, config)
    "llama": (LlamaForCausalLM, LlamaConfig(**SMALL, **LLAMA_LIKE)),
    "llama_tied": (LlamaForCausalLM, LlamaConfig(**{**SMALL, "tie_word_embeddings": True}, **LLAMA_LIKE)),
    "mistral": (MistralForCausalLM, MistralConfig(**SMALL, **LLAMA_LIKE)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SMALL, **LLAMA_LIKE)),  # q/k/v biases
    "neox": (GPTNeoXForCausalLM, GPTNeoXConfig(**SMALL, **NEOX, use_parallel_residual=True)),
    "neox_sequential": (GPTNeoXForCausalLM, GPTNeoXConfig(**SMALL, **NEOX, use_parallel_residual=False)),
}


def ids(b=2, t=16, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def stock_model(case):
    cls, cfg = CASES[case]
    torch.manual_seed(0)
    stock = cls(cfg).eval()
    with torch.no_grad():  # non-trivial gamma (and beta) so that a wrong formula shows
        for name, p in stock.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    return stock


# -- the by-hand reference ---------------------------------------------------------------------------------
def norm_formula(x, w, b, eps, sigma):
    """LayerNorm (b is not None: centred) or RMSNorm, dividing by the per-token std, or by sigma once frozen."""
    if b is not None:
        x = x - x.mean(-1, keepdim=True)
    s = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) if sigma is None else sigma
    y = x / s * w
    return y if b is None else y + b


class RefNorm(nn.Module):
    def __init__(self, norm, eps, sigma):
        super().__init__()
        self.w, self.b, self.eps, self.sigma = norm.weight, getattr(norm, "bias", None), eps, sigma

    def forward(self, x):
        return norm_formula(x, self.w, self.b, self.eps, self.sigma)


class RefReader(nn.Module):
    """A linear layer reading the attention-input norm: value columns see the value path, the others the q/k path."""

    def __init__(self, linear, qk: RefNorm, v: RefNorm, v_cols):
        super().__init__()
        self.linear, self.qk, self.v, self.v_cols = linear, qk, v, v_cols

    def forward(self, x):
        return torch.where(self.v_cols, self.linear(self.v(x)), self.linear(self.qk(x)))


def reference(case, sigmas: dict):
    """The stock model with every norm by hand; sigmas: site name -> frozen sigma (absent or None: real)."""
    stock = stock_model(case)
    cfg = stock.config
    neox = cfg.model_type == "gpt_neox"
    eps = cfg.layer_norm_eps if neox else cfg.rms_norm_eps
    base = stock.gpt_neox if neox else stock.model
    for i, block in enumerate(base.layers):
        ln1 = block.input_layernorm
        qk, v = (RefNorm(ln1, eps, sigmas.get(f"{k}.{i}")) for k in ("attn_qk", "attn_v"))
        block.input_layernorm = nn.Identity()  # the readers normalise their own path
        if neox:
            a, d, hs = block.attention, cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
            v_cols = torch.arange(3 * d) % (3 * hs) >= 2 * hs  # per head: q, k, v of head_size each
            a.query_key_value = RefReader(a.query_key_value, qk, v, v_cols)
        else:
            a = block.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(a, name)
                setattr(a, name, RefReader(lin, qk, v, torch.tensor(name == "v_proj")))
        block.post_attention_layernorm = RefNorm(block.post_attention_layernorm, eps, sigmas.get(f"pre_mlp.{i}"))
    if neox:
        base.final_layer_norm = RefNorm(base.final_layer_norm, eps, sigmas.get("final"))
    else:
        base.norm = RefNorm(base.norm, eps, sigmas.get("final"))
    return stock


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@torch.no_grad()
def logits(model, x, **kw):
    return model(x, **kw).logits


def removable(case):
    model = make_removable(stock_model(case)).eval()
    model.calibrate(ids(4, 32, seed=3))
    return model


def advance(model, seed):
    """New statistics for the sites still real (as training steps would bring), so that sigma_qk != sigma_v."""
    with recording(model.token_context):
        model(ids(4, 32, seed=seed) * (1 + seed % 3) % V)
    model.commit_norm_stats(momentum=0.5)


def all_removed(case):
    model = removable(case)
    for i, name in enumerate(model.sites()):
        model.remove(*_parse(name))
        advance(model, seed=10 + i)
    sig = model.sigmas()
    assert sig["attn_qk.0"] != pytest.approx(sig["attn_v.0"], rel=1e-3)  # the QK/V ratio is not 1
    return model


def _parse(name):
    kind, _, block = name.partition(".")
    return kind, (int(block) if block else None)


# -- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_every_removal_stage_equals_the_by_hand_reference(case):
    model = removable(case)
    L = model.config.num_hidden_layers
    names = list(model.sites())
    assert names == [f"{k}.{i}" for k in ("pre_mlp", "attn_qk", "attn_v") for i in range(L)] + ["final"]
    x = ids()
    assert rel_err(logits(model, x), logits(reference(case, {}), x)) < 1e-5  # every site real
    for i, name in enumerate(names):  # one site more at each stage, in removal order
        model.remove(*_parse(name))
        advance(model, seed=10 + i)
        ref = reference(case, {n: s for n, s in model.sigmas().items() if s is not None})
        err = rel_err(logits(model, x), logits(ref, x))
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("case", ["llama", "qwen2", "neox"])
def test_calibrated_sigma_is_the_mean_per_token_std_of_each_norm_input(case):
    model = removable(case)  # calibrated on ids(4, 32, seed=3)
    stock = stock_model(case)
    neox = stock.config.model_type == "gpt_neox"
    eps = stock.config.layer_norm_eps if neox else stock.config.rms_norm_eps
    base = stock.gpt_neox if neox else stock.model
    inputs = {}

    def grab(name):
        return lambda m, args: inputs.__setitem__(name, args[0])

    for i, block in enumerate(base.layers):
        block.post_attention_layernorm.register_forward_pre_hook(grab(f"pre_mlp.{i}"))
        block.input_layernorm.register_forward_pre_hook(grab(f"attn.{i}"))
    (base.final_layer_norm if neox else base.norm).register_forward_pre_hook(grab("final"))
    logits(stock, ids(4, 32, seed=3))
    for name, site in model.sites().items():
        x = inputs[name.replace("attn_qk", "attn").replace("attn_v", "attn")].double()
        if neox:
            x = x - x.mean(-1, keepdim=True)
        std = torch.sqrt(x.pow(2).mean(-1) + eps).mean()
        assert float(site.running[0]) == pytest.approx(float(std), rel=1e-5), name


@pytest.mark.parametrize("case", CASES)
def test_stock_export_loads_without_lnfree_with_every_norm_affine(case, tmp_path):
    model = all_removed(case)
    err = export_hf(model, tmp_path / "hf")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # transformers alone
    assert type(stock) is CASES[case][0]
    norms = [m for m in stock.modules() if "Norm" in type(m).__name__]
    assert len(norms) == 2 * stock.config.num_hidden_layers + 1
    assert all(getattr(m, "eps", getattr(m, "variance_epsilon", None)) == HF_EPS for m in norms)  # the eps trick
    x = ids(3, 24, seed=5)
    assert err < 1e-4 and rel_err(logits(stock, x), logits(model, x)) < 1e-4
    # KV cache: token-by-token logits equal the full forward's, and greedy generation agrees with the model's
    out = stock(x[:, :12], use_cache=True)
    step = stock(x[:, 12:13], cache=out.past_key_values, use_cache=True).logits[:, -1]
    assert rel_err(step, logits(stock, x[:, :13])[:, -1]) < 1e-4
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=96)
    assert torch.equal(stock.generate(x[:1, :8], **gen), model.generate(x[:1, :8], **gen))
    with pytest.raises(ExportError, match="fp16"):  # eps = 1e12 and weights ~1e6 / sigma overflow fp16
        export_hf(model, tmp_path / "fp16", dtype=torch.float16)
    assert not (tmp_path / "fp16").exists()


@pytest.mark.parametrize("case", CASES)
def test_stock_export_of_a_model_with_every_site_real_is_the_stock_model(case, tmp_path):
    stock = stock_model(case)
    export_hf(make_removable(stock), tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = ids()
    assert rel_err(logits(loaded, x), logits(stock, x)) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_folded_export_has_no_norm_and_matches(case, tmp_path):
    model = all_removed(case)
    err = export_folded(model, tmp_path / "folded")
    folded, _ = load(str(tmp_path / "folded"))
    assert not [m for m in folded.modules() if "Norm" in type(m).__name__]
    x = ids(3, 24, seed=6)
    assert err < 1e-5 and rel_err(logits(folded, x), logits(model, x)) < 1e-5
    with pytest.raises(ValueError):  # transformers alone cannot load it as a model with norms
        AutoModelForCausalLM.from_pretrained(tmp_path / "folded")


@pytest.mark.parametrize("case", ["llama", "qwen2", "neox"])
@pytest.mark.parametrize("stage", ["real", "removed"])
def test_left_padding_leaves_real_tokens_unchanged(case, stage):
    model = removable(case) if stage == "real" else all_removed(case)
    x = ids(1, 12, seed=7)
    pad = torch.cat([torch.full((1, 4), 96), x], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    padded = logits(model, pad, attention_mask=mask, position_ids=pos)[:, 4:]
    assert rel_err(padded, logits(model, x)) < 1e-5


@pytest.mark.parametrize("case", ["llama", "neox"])
def test_padding_is_ignored_by_the_statistics(case):
    x = ids(2, 12, seed=8)
    plain = removable(case)
    plain.calibrate(x)
    padded = removable(case)
    pad = torch.cat([torch.full((2, 5), 96), x], dim=1)
    mask = torch.cat([torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)], dim=1)
    padded.calibrate(pad, attention_mask=mask)  # positions shift under left padding: compare the pre-rotary site
    for name in ("pre_mlp.0",) if case == "neox" else ("pre_mlp.0", "attn_qk.0"):
        if case == "llama" and name != "attn_qk.0":
            continue  # the first norm reads embeddings only: position-independent
        assert float(padded.sites()[name].running[0]) == pytest.approx(float(plain.sites()[name].running[0]),
                                                                       rel=1e-5)


def test_a_site_is_named_by_its_kind_or_by_its_familys_name_for_it():
    from conftest import stock_and_removable

    llama = removable("llama")
    assert llama.site_name("attn_qk", 1) == "attn_qk.1" and llama.site_name("final") == "final"
    with pytest.raises(KeyError, match=r"unknown site kind 'ln2'; kinds are \('pre_mlp', .*'final'\)\"$"):
        llama.site("ln2", 0)  # GPT-2's site names are GPT-2's only
    _, gpt2 = stock_and_removable()
    assert gpt2.site("attn_v", 1) is gpt2.site("ln1v", 1) and gpt2.site_name("final") == "lnf"
    assert [gpt2.family.norm_kind(k) for k in ("ln2", "ln1qk", "ln1v", "lnf", "attn_v")] == \
        ["pre_mlp", "attn_qk", "attn_v", "final", "attn_v"]
    with pytest.raises(KeyError, match=r"unknown site kind 'ln3'; kinds are .* \(gpt2 names their sites \('ln2'"):
        gpt2.site("ln3", 0)


@pytest.mark.parametrize("case", ["gpt2", "llama", "neox"])
def test_the_builtin_schedule_covers_every_site_of_each_family_once(case, tmp_path):
    from conftest import compose_train, stock_and_removable

    from lnfree.schedule import build_events
    from lnfree.training import config as _config  # noqa: F401  (registers the schemas)
    from lnfree.training.callbacks import event_site

    model = stock_and_removable()[1] if case == "gpt2" else removable(case)
    n_layer = len(model.family.blocks(model))
    events = build_events(compose_train(tmp_path, "schedule=builtin").schedule, n_layer, 100)
    assert [e.step for e in events][-1] == 4 + n_layer * 7
    names = [event_site(model, e)[0] for e in events]  # every site of the family, once, in removal order
    assert names == list(model.sites())


@pytest.mark.parametrize("config", [GemmaConfig(), Qwen3Config(), OPTConfig()], ids=lambda c: c.model_type)
def test_unsupported_families_are_refused_naming_the_supported_ones(config):
    with pytest.raises(UnsupportedFamily, match=rf"model_type='{config.model_type}'.*gpt2 .*llama .*gpt_neox"):
        make_removable(config)


def test_a_llama_option_the_adapter_does_not_cover_is_refused():
    reason = r"^lnfree's Llama adapter covers MLPs without biases \(mlp_bias=false\)$"
    with pytest.raises(UnsupportedFamily, match=reason):
        make_removable(LlamaConfig(**SMALL, **LLAMA_LIKE, mlp_bias=True))


# -- training: a whole run per family, and a resume across removal events ---------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_neox"])
def test_training_run_removes_every_site_exports_and_resumes_exactly(name, tmp_path, monkeypatch):
    from conftest import TINY_RUN, compose_train, train_until_crash

    from lnfree.io import read_checkpoint
    from lnfree.training.run import train

    args = [a for a in TINY_RUN if not a.startswith("model=")] + [f"model={name}"]
    full = train(compose_train(tmp_path / "full", *args))
    assert full["all_removed"] and full["removed_sites"][-1] == "final"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "export" / "hf")
    assert getattr(stock.config, "rms_norm_eps", getattr(stock.config, "layer_norm_eps", None)) == HF_EPS
    assert (tmp_path / "full" / "export" / "folded" / "folded.safetensors").exists()

    # a run interrupted mid-schedule resumes from its checkpoint to the same events, sigmas and CE
    ckpt = train_until_crash(compose_train(tmp_path / "part", *args), monkeypatch, step=12)
    state = read_checkpoint(ckpt)
    done = [a["site"] for a in state["callbacks"]["LNRemovalCallback"]["applied"]]
    assert done == ["pre_mlp.0", "pre_mlp.1", "attn_qk.0", "attn_qk.1", "attn_v.0"]  # mid-schedule
    assert state["lnfree_run"]["events"][0] == ["pre_mlp.0", 4]  # named as the family names its sites
    resumed = train(compose_train(tmp_path / "part", *args, f"ckpt_path={ckpt}"))
    assert [(e["site"], e["step"]) for e in resumed["events"]] == [(e["site"], e["step"]) for e in full["events"]]
    assert resumed["sigmas"] == pytest.approx(full["sigmas"], rel=1e-5)
    assert resumed["val_ce"] == pytest.approx(full["val_ce"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "neox"])
def test_the_shipped_member_trains_with_every_site_removed_and_both_exports_verified(family, tmp_path):
    """model=builtin_<family>_w128, the pretrained member that ships with lnfree, through the documented path (a
    short run of the built-in schedule): every site removed, the stock export loads in transformers with every
    norm affine and the folded export has no norm, both within the export check's tolerance."""
    import json

    from conftest import TINY_RUN, compose_train

    from lnfree.export import HF_TOL
    from lnfree.paths import SHIPPED_DIR
    from lnfree.training.run import train

    name = f"builtin_{family}_w128"
    assert (SHIPPED_DIR / f"{family}_w128" / "model.safetensors").exists()
    summary = train(compose_train(tmp_path, *[a for a in TINY_RUN if not a.startswith("model")], f"model={name}"))
    assert summary["all_removed"] and summary["config"]["model"]["source"] == f"builtin:{family}_w128"
    hf_dir = tmp_path / "export" / "hf"
    stock = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(stock) is CASES[family][0]
    assert getattr(stock.config, "rms_norm_eps", getattr(stock.config, "layer_norm_eps", None)) == HF_EPS
    folded, _ = load(str(tmp_path / "export" / "folded"))
    assert not [m for m in folded.modules() if "Norm" in type(m).__name__]
    x = ids()
    assert rel_err(logits(folded, x), logits(stock, x)) < HF_TOL
    for form in ("hf", "folded"):
        assert json.loads((tmp_path / "export" / form / "lnfree_export.json").read_text())["relative_error"] < HF_TOL


@needs("peft", "lora")
@pytest.mark.parametrize("case", ["llama", "qwen2", "neox"])
def test_lora_on_the_attention_input_readers_reads_each_path_and_merges_exactly(case):
    from lnfree.lora import apply_lora, merged_copy

    model = all_removed(case) if case != "neox" else removable(case)
    if case == "neox":  # a mid-removal model: the q/k path removed, the value path real
        model.remove("attn_qk", 0)
    targets = {"llama": ["q_proj", "k_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj"],
               "neox": ["query_key_value", "dense_h_to_4h"]}[case]
    before = {n: p.clone() for n, p in model.named_parameters()}
    apply_lora(model, dict(r=4, alpha=8.0, dropout=0.0, target_modules=targets, train_norms=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); a random B makes a wrong formula show
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("layernorm.weight" in n for n in trainable)
    assert not trainable & set(before) - {n for n in before if "norm" in n}  # base weights frozen
    x = ids()
    adapted = logits(model.eval(), x)
    merged = merged_copy(model)
    assert rel_err(logits(merged, x), adapted) < 1e-5
    # the update is real, and the merged model is a plain removable model again
    assert rel_err(adapted, logits(make_removable(stock_model(case)), x)) > 1e-3
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with pytest.raises(ValueError, match="not .* modules; this family's are"):
        apply_lora(removable(case), dict(r=4, alpha=8.0, dropout=0.0, target_modules=["c_attn"], train_norms=False))


# -- hub options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n_layer", [("pythia_160m", 12), ("smollm_135m", 30)])
def test_hub_experiments_follow_the_contiguous_rule(tmp_path, name, n_layer):
    from conftest import compose_train

    from lnfree.schedule import build_events
    from lnfree.training import config as _config  # noqa: F401  (registers the schemas)

    cfg = compose_train(tmp_path, f"experiment={name}")
    events = build_events(cfg.schedule, n_layer, cfg.trainer.max_steps)
    # standard: pre_mlp from 20 every 2, then attn_qk every 2, attn_v every 3, final right after, over every block
    assert events[-1].kind == "final" and events[-1].step == 20 + n_layer * (2 + 2 + 3)
    assert events[-1].step < 0.4 * cfg.trainer.max_steps


@pytest.mark.slow
@pytest.mark.parametrize("name,source", [("pythia_160m", "EleutherAI/pythia-160m"),
                                         ("smollm_135m", "HuggingFaceTB/SmolLM-135M")])
def test_hub_options_fail_clearly_offline(tmp_path, name, source):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "lnfree.train", f"model={name}", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "ModelIOError" in out.stderr and f"model.source='{source}'" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout and not (tmp_path / "run").exists()


# -- interpretability -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama", "qwen2", "neox", "neox_sequential"])
def test_dla_equals_the_direct_effect_once_the_final_norm_is_frozen(case, tmp_path):
    from lnfree.analysis.interp.dla import dla_vs_de

    x = ids(4, 16, seed=9)
    real = removable(case)
    u = real.lm_head.weight[x[:, -1]]  # each prompt's own last token, as the CLI does
    r = dla_vs_de(real, x, u)
    assert r["decomposition_error"] < 1e-4  # the components sum to the final residual, norm real or not
    assert r["nmae_percent"] > 0.1  # a real final norm: DLA is not the direct effect
    model = all_removed(case)
    r = dla_vs_de(model, x, u)
    assert r["decomposition_error"] < 1e-4 and r["nmae_percent"] < 1e-3
    export_hf(model, tmp_path / "hf")  # the stock LN-free export (eps trick) reads the same
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert dla_vs_de(stock, x, u)["nmae_percent"] < 1e-2


@pytest.mark.parametrize("case", ["llama", "neox", "neox_sequential"])
def test_patching_hooks_each_familys_nodes_and_is_exact_after_the_frozen_final_norm(case):
    """Past the last block only the final norm stands between a node and the metric: frozen, the map is linear and
    AtP == AP there (the final residual; the last layer's heads too where the last MLP does not read them: NeoX's
    parallel residual); real, it is not. A hook on a wrong module would break the equality or leave a node at 0."""
    from lnfree.analysis.interp.patching import activation_patching, attribution_patching, induction_pairs

    clean, corrupt, correct, wrong = induction_pairs(V, 3, half=6, seed=1)
    differs = 5  # the only position where the prompts differ
    gaps = {}
    for arm, model in (("real", removable(case)), ("removed", all_removed(case))):
        ap_r, ap_h = activation_patching(model, clean, corrupt, correct, wrong)
        atp_r, atp_h = attribution_patching(model, clean, corrupt, correct, wrong)
        assert ap_r.shape[1] == atp_r.shape[1] == 3 and ap_h.shape[1:] == (2, 4)  # L + 1 residual nodes, L x H heads
        assert ap_r[:, 0, differs].abs().min() > 0 and atp_r[:, 0, differs].abs().min() > 0  # the embeddings' grad
        assert ap_r[:, 0, :differs].abs().max() == 0 == atp_r[:, 0, :differs].abs().max()  # causal: no effect yet
        assert ap_h[:, -1].abs().max() > 1e-3 and atp_h[:, -1].abs().max() > 1e-3  # the heads' hooks see them
        last = (ap_r[:, -1], atp_r[:, -1]) if case != "neox" else (torch.cat([ap_r[:, -1], ap_h[:, -1]], 1),
                                                                   torch.cat([atp_r[:, -1], atp_h[:, -1]], 1))
        assert last[0].abs().max() > 1e-3  # the nodes matter
        gaps[arm] = float((last[0] - last[1]).abs().max() / last[0].abs().max())
    assert gaps["removed"] < 1e-4 < 1e-2 < gaps["real"]


@pytest.mark.parametrize("case", ["llama", "neox"])
def test_entropy_neuron_total_effect_equals_direct_effect_only_once_the_final_norm_is_frozen(case):
    from lnfree.analysis.interp.neurons import ablation_effects, candidates

    x = ids(4, 24, seed=4)
    for model, exact in ((removable(case), False), (all_removed(case), True)):
        neuron = candidates(model, k=1)[0]["neuron"]
        e = ablation_effects(model, x, neuron)
        assert e["te_entropy"].abs().max() > 1e-6  # the ablation does something
        gap = float((e["te_entropy"] - e["de_entropy"]).abs().max() / e["te_entropy"].abs().max())
        assert gap < 1e-4 if exact else gap > 1e-3  # a real final norm's scale moves with the ablation


def test_model_card_names_the_family_class_and_its_sites():
    from lnfree.model_card import card_text

    summary = {"family": "llama", "hf_class": "LlamaForCausalLM", "all_removed": True, "sigmas": {"final": 2.0},
               "config": {"model": {"name": "builtin_llama_w128", "source": "builtin:llama_w128"}}}
    card = card_text(summary, "hf")
    assert "- llama\n" in card and "model = LlamaForCausalLM.from_pretrained(path)" in card
    assert "GPT2" not in card and "ln_1" not in card and "| final | 2 |" in card


@pytest.mark.parametrize("case", ["llama", "neox"])
def test_io_loads_every_form_of_a_family(case, tmp_path):
    from lnfree.model import save_removable

    model = all_removed(case)
    x = ids()
    export_hf(model, tmp_path / "hf")
    hf, _ = load(str(tmp_path / "hf"))  # the record (files, eps, fingerprint) checked
    assert type(hf) is CASES[case][0] and rel_err(logits(hf, x), logits(model, x)) < 1e-4
    save_removable(model, tmp_path / "removable")
    back, _ = load(str(tmp_path / "removable"), removable=True)
    assert back.sigmas() == model.sigmas() and rel_err(logits(back, x), logits(model, x)) < 1e-6
    stock = stock_model(case)
    stock.save_pretrained(tmp_path / "stock")
    fresh, _ = load(str(tmp_path / "stock"), removable=True, dropout=0.25)
    assert fresh.real_sites() == list(fresh.sites()) and type(fresh).__name__ == f"Removable{type(stock).__name__}"
    block = fresh.family.blocks(fresh)[1]
    attn = block.self_attn if case == "llama" else block.attention
    assert attn.attention_dropout == 0.25  # the float the attention reads, not only the config
    assert rel_err(logits(fresh.eval(), x), logits(stock, x)) < 1e-6


# -- the adapters' small answers, each read by a caller (mutation testing found them unchecked) ---------------
def _stock_and_removable_of(case):
    """A removable model of each family ('gpt2' the tiny GPT-2 of conftest) and its stock twin."""
    from conftest import stock_and_removable

    if case == "gpt2":
        return stock_and_removable()
    stock = stock_model(case)
    return stock, make_removable(stock_model(case)).eval()


@pytest.mark.parametrize("case", ["gpt2", "llama", "neox"])
def test_embed_is_the_residual_streams_first_term(case):
    _, model = _stock_and_removable_of(case)
    x = ids(2, 9, seed=4)
    with torch.no_grad():
        first = model(x, output_hidden_states=True).hidden_states[0]  # HF's own embedding output (eval: no dropout)
        assert torch.equal(model.family.embed(model, x), first)


def test_gpt2_embed_builds_its_positions_on_the_device_of_the_ids():
    # the "meta" device stands in for a GPU: positions made on the CPU would not meet a GPU model's wpe there
    _, model = _stock_and_removable_of("gpt2")
    model = model.to("meta")
    seen = []
    hook = model.transformer.wpe.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.family.embed(model, ids(2, 9).to("meta"))
    hook.remove()
    assert [(p.device.type, tuple(p.shape)) for p in seen] == [("meta", (9,))]


@pytest.mark.parametrize("case", ["gpt2", "llama", "llama_tied", "neox", "neox_tied"])
def test_non_embedding_params_leave_out_the_embeddings_and_an_untied_unembedding(case):
    from lnfree.model import non_embedding_params

    if case == "neox_tied":
        stock = GPTNeoXForCausalLM(GPTNeoXConfig(**{**SMALL, "tie_word_embeddings": True}, **NEOX))
        model = make_removable(stock)
    else:
        model = _stock_and_removable_of(case)[1]
    emb = {model.get_input_embeddings(), model.get_output_embeddings()}
    if case == "gpt2":
        emb.add(model.transformer.wpe)  # learned positions are embeddings too
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (case in ("gpt2", "llama_tied", "neox_tied"))
    expected = sum(p.numel() for m in model.modules() if m not in emb for p in m.parameters(recurse=False))
    assert non_embedding_params(model) == expected


@pytest.mark.parametrize("case", ["gpt2", "llama", "neox"])
def test_the_export_record_gives_the_models_shape(case, tmp_path):
    import json

    from lnfree.model_record import EXPORT_INFO

    _, model = _stock_and_removable_of(case)
    export_hf(model, tmp_path / "hf")
    record = json.loads((tmp_path / "hf" / EXPORT_INFO).read_text())
    blocks = model.family.blocks(model)
    heads = {"gpt2": lambda b: b.attn.num_heads, "llama": lambda b: model.config.num_attention_heads,
             "neox": lambda b: b.attention.config.num_attention_heads}[case](blocks[0])
    assert record["n_layers"] == len(blocks) and record["d_model"] == model.get_input_embeddings().weight.shape[1]
    assert record["n_heads"] == heads


@pytest.mark.parametrize("case", ["gpt2", "llama", "neox"])
def test_set_dropout_reaches_the_config_a_saved_model_is_rebuilt_from(case):
    from lnfree.io import set_dropout

    _, model = _stock_and_removable_of(case)
    set_dropout(model, 0.25)
    rebuilt = type(model)(model.config)  # as a saved checkpoint or export is rebuilt
    rates = [m.p for m in rebuilt.modules() if isinstance(m, nn.Dropout)]
    rates += [m.attention_dropout for m in rebuilt.modules()
              if isinstance(getattr(m, "attention_dropout", None), float)]
    assert rates and all(r == 0.25 for r in rates), rates


@pytest.mark.parametrize("case,ctx", [("gpt2", "n_positions"), ("llama", "max_position_embeddings"),
                                      ("neox", "max_position_embeddings")])
def test_dims_read_each_familys_own_config_fields(case, ctx):
    _, model = _stock_and_removable_of(case)
    fam, dims = model.family, model.family.dims(model.config)
    assert fam.ctx_field == ctx and dims.n_ctx == getattr(model.config, ctx) == 64
    assert dims.n_layer == len(fam.blocks(model)) and dims.d_model == model.get_input_embeddings().weight.shape[1]
    assert dims.eps == fam.attn_norm(fam.blocks(model)[0]).eps == fam.final_norm(model).eps  # what install() used


@pytest.mark.parametrize("case", ["gpt2", "llama", "neox"])
def test_decay_embeddings_false_keeps_the_input_embeddings_of_each_family_out_of_weight_decay(case):
    from types import SimpleNamespace

    from lnfree.training.module import LNFreeModule

    _, model = _stock_and_removable_of(case)
    emb = [model.get_input_embeddings().weight]
    if case == "gpt2":
        emb.append(model.transformer.wpe.weight)  # learned positions are embeddings too
    others = {id(p) for p in model.parameters() if p.ndim >= 2} - {id(p) for p in emb}  # an untied lm_head among them
    for decay_embeddings in (False, True):
        optim = SimpleNamespace(weight_decay=0.1, decay_embeddings=decay_embeddings, lr=1e-3, min_lr=1e-4,
                                betas=[0.9, 0.95], eps=1e-6, warmup_steps=2, decay_steps=None)
        decay, _ = LNFreeModule(model, optim, max_steps=10).configure_optimizers()["optimizer"].param_groups
        decayed = {id(p) for p in decay["params"]}
        assert [id(p) in decayed for p in emb] == [decay_embeddings] * len(emb)
        assert decayed - {id(p) for p in emb} == others  # every other matrix decays either way


@pytest.mark.parametrize("case,field", [("gpt2", "layer_norm_epsilon"), ("llama", "rms_norm_eps"),
                                        ("neox", "layer_norm_eps")])
def test_an_export_whose_config_eps_was_edited_is_refused_naming_the_familys_eps_field(case, field, tmp_path):
    """The recorded eps is checked under each family's own config field (the hashes rewritten too, so that the
    eps check, not the file hash, is what refuses it)."""
    import json

    from conftest import rehash

    from lnfree.errors import ModelIOError

    _, model = _stock_and_removable_of(case)
    export_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg[field] != 1e-3
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, field: 1e-3}))
    rehash(tmp_path / "hf")
    with pytest.raises(ModelIOError, match=rf"config\.json has {field}=0\.001 but the export was written with"):
        load(str(tmp_path / "hf"))


def test_removable_models_compute_their_loss_without_a_transformers_warning():
    import logging

    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    hf_logging.warning_once.cache_clear()  # a warning already given in this process is not given again
    try:
        for case in ("gpt2", "llama", "neox"):
            model = _stock_and_removable_of(case)[1]
            x = ids(1, 8)
            assert torch.isfinite(model(x, labels=x).loss)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "loss_type" in r.getMessage()]


def test_family_refuses_a_config_without_model_type_and_names_every_supported_type():
    from lnfree.families import family

    with pytest.raises(UnsupportedFamily, match=r"model_type=None: .* llama \(llama/mistral/qwen2\)"):
        family(object())
    with pytest.raises(UnsupportedFamily, match=r"model_type=None"):
        family({})


def test_the_gpt2_class_refuses_another_familys_config_naming_its_type():
    from lnfree.families.gpt2 import RemovableGPT2LMHeadModel

    with pytest.raises(ValueError, match=r"model_type='llama' \(LlamaConfig\)"):
        RemovableGPT2LMHeadModel(LlamaConfig(**SMALL, **LLAMA_LIKE))


def test_the_removable_class_factory_builds_a_checked_removable_class():
    from transformers import MistralForCausalLM as Stock

    from lnfree.families.llama import LLAMA, RemovableMistralForCausalLM

    cls = RemovableMistralForCausalLM  # built by llama.py's class factory at import time
    assert cls.__name__ == cls.__qualname__ == "RemovableMistralForCausalLM" and issubclass(cls, Stock)
    model = cls(MistralConfig(**SMALL, **LLAMA_LIKE))
    assert model.family is LLAMA and len(model.sites()) == 3 * SMALL["num_hidden_layers"] + 1
    with pytest.raises(UnsupportedFamily, match="mlp_bias"):
        cls(MistralConfig(**SMALL, **LLAMA_LIKE, mlp_bias=True))


@pytest.mark.parametrize("case", ["llama", "neox"])
def test_the_folded_model_keeps_its_sources_attention_implementation(case):
    stock_cls, cfg = CASES[case]
    torch.manual_seed(0)
    model = make_removable(stock_cls(cfg.__class__.from_dict({**cfg.to_dict(), "attn_implementation": "eager"})))
    assert model.config._attn_implementation == "eager"
    model.eval().calibrate(ids(4, 32, seed=3))
    for name in list(model.sites()):
        model.remove(*_parse(name))
    assert model.family.fold(model).config._attn_implementation == "eager"


@pytest.mark.parametrize("tied", [False, True])
def test_the_folded_neox_unembedding_stays_its_own_when_transformers_ties_weights(tied):
    torch.manual_seed(0)
    model = make_removable(GPTNeoXForCausalLM(GPTNeoXConfig(**{**SMALL, "tie_word_embeddings": tied}, **NEOX)))
    model.eval().calibrate(ids(4, 32, seed=3))
    for name in list(model.sites()):
        model.remove(*_parse(name))
    folded = model.family.fold(model).eval()
    x = ids()
    before = logits(folded, x)
    folded.tie_weights()  # from_pretrained, resize_token_embeddings ... call it: the folded config must say untied
    assert not folded.config.tie_word_embeddings
    assert torch.equal(logits(folded, x), before) and rel_err(before, logits(model, x)) < 1e-5


@pytest.mark.parametrize("case", ["gpt2", "llama", "qwen2", "neox"])
def test_the_exports_value_rows_are_the_ones_the_forward_splits(case):
    """The eps trick and the fold (written once, lnfree.families.base) read each attention-input reader's value rows
    from the adapter's value_rows; the forward reads the installed reader's v_cols. They must be the same rows."""
    from conftest import stock_and_removable

    model = stock_and_removable()[1] if case == "gpt2" else removable(case)
    fam = model.family
    for block in fam.blocks(model):
        for name in fam.attn_readers:
            reader = block.get_submodule(name)
            assert torch.equal(fam.value_rows(model.config, name, reader.out_features), reader.v_cols.cpu())


def test_adapters_declare_and_the_export_math_is_written_once():
    """Installing the norms, the eps trick, the fold and the folded HF model come from Family alone: an adapter
    that redefined one would be a second copy of the math (GPT-2 builds its own plain-torch folded form, from the
    shared fold_state_dict)."""
    from lnfree.families import FAMILIES
    from lnfree.families.base import Family

    shared = ("install", "stock_state_dict", "fold_state_dict", "fold_reader", "folded_model", "blocks", "embed")
    for fam in FAMILIES:
        assert [m for m in shared if m in type(fam).__dict__] == [], fam.name
        assert (type(fam).fold is Family.fold) == (fam.name != "gpt2")
