"""lnfree.downstream: the shipped lm-eval tasks, run offline on a run's export (lm-eval 0.4.x)."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lnfree.downstream import build_tasks
from lnfree.downstream.harness import TASKS_DIR, DownstreamError, check, own_token_ce, run
from lnfree.errors import ModelIOError
from lnfree.io import load
from lnfree.references import resolve

pytest.importorskip("lm_eval")


def ds_cfg(tmp_path, models, **kw):
    from conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        base = compose("downstream")
    return OmegaConf.merge(base, {"models": models, "limit": 8, "batch_size": 4,
                                  "output_dir": str(tmp_path / "ds"), "cache_dir": str(tmp_path / "cache"), **kw})


def test_shipped_task_data_is_what_the_builder_makes():
    fresh = build_tasks.build()
    for name, rows in fresh.items():
        shipped = [json.loads(line) for line in (build_tasks.TASK_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == rows, f"{name}.jsonl is stale: python -m lnfree.downstream.build_tasks"
    cloze = fresh["cloze"]
    assert len(cloze) == build_tasks.N_CLOZE and {len(r["choices"]) for r in cloze} == {4}
    golds = [r["gold"] for r in cloze]
    assert all(golds.count(g) > len(golds) / 8 for g in range(4))  # the answer is not always in one place
    assert all(r["choices"][r["gold"]] not in r["context"][-40:] for r in cloze[:50])
    assert all(r["n_tokens"] <= build_tasks.MAX_TOKENS for r in fresh["ppl"])


@pytest.mark.slow
def test_harness_ce_matches_lnfree_ce_on_the_same_text(tiny_run, tmp_path):
    _, run_dir = tiny_run
    cfg = ds_cfg(tmp_path, [{"name": "lnfree", "path": str(run_dir / "export" / "hf")},
                            {"name": "ckpt", "path": str(run_dir / "checkpoints" / "last.ckpt")}])
    res = run(cfg)
    for name in ("lnfree", "ckpt"):
        ppl = res["models"][name]["metrics"]["lnfree_builtin_ppl"]
        assert abs(ppl["token_ce"] - ppl["lnfree_token_ce"]) < 1e-3
        assert 0 <= res["models"][name]["metrics"]["lnfree_builtin_cloze"]["acc"] <= 1
    # the export and the removable checkpoint are the same function
    a = res["models"]["lnfree"]["metrics"]["lnfree_builtin_ppl"]["token_ce"]
    assert a == pytest.approx(res["models"]["ckpt"]["metrics"]["lnfree_builtin_ppl"]["token_ce"], abs=1e-4)
    assert (tmp_path / "ds" / "table.md").read_text().count("|") > 8
    # own_token_ce is lnfree's CE: a wrong model gives a different number
    model, tok = load(str(run_dir / "export" / "hf"))
    lines = (TASKS_DIR / "lnfree_builtin" / "ppl.jsonl").read_text().splitlines()[:8]
    texts = [json.loads(line)["text"] for line in lines]
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    assert abs(own_token_ce(model, tok, texts) - a) > 1e-2


@pytest.mark.slow
def test_shipped_tasks_run_through_lm_evals_own_cli(tiny_run, tmp_path):
    _, run_dir = tiny_run
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={run_dir / 'export' / 'hf'}", "--include_path", str(TASKS_DIR), "--tasks",
                    "lnfree_builtin_ppl", "--limit", "8", "--output_path", str(out)], check=True, capture_output=True,
                   timeout=600)
    result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["lnfree_builtin_ppl"]
    cfg = ds_cfg(tmp_path, [{"name": "m", "path": str(run_dir / "export" / "hf")}], tasks=["lnfree_builtin_ppl"])
    ours = run(cfg)["models"]["m"]["metrics"]["lnfree_builtin_ppl"]["lnfree_token_ce"]
    assert abs(result["token_ce,none"] - ours) < 1e-3


@pytest.mark.slow
def test_fp16_folded_and_unknown_tasks_are_refused_before_loading(tiny_run, tmp_path):
    _, run_dir = tiny_run
    hf = [{"name": "m", "path": str(run_dir / "export" / "hf")}]
    with pytest.raises(ModelIOError, match="float16"):
        check(ds_cfg(tmp_path, hf, dtype="float16"))
    with pytest.raises(ModelIOError, match="fp16"):
        load(str(run_dir / "export" / "hf"), dtype=torch.float16)
    with pytest.raises(DownstreamError, match="folded"):
        check(ds_cfg(tmp_path, [{"name": "f", "path": str(run_dir / "export" / "folded")}]))
    with pytest.raises(DownstreamError, match="unknown lm-eval task"):
        check(ds_cfg(tmp_path, hf, tasks=["lnfree_builtin_nope"]))
    assert not (tmp_path / "ds").exists()


BUILTIN_FAMILIES = {"w128": "gpt2", "llama_w128": "llama", "neox_w128": "gpt_neox"}  # one shipped member each


@pytest.mark.parametrize("name", BUILTIN_FAMILIES)
def test_lm_eval_wraps_a_member_of_each_family_at_its_context_length(name, tmp_path):
    """The harness asks the family for the context length (GPT-2's n_positions, Llama's and NeoX's
    max_position_embeddings): reading a GPT-2 field failed on the other families."""
    from lnfree.downstream.harness import load_lm

    cfg = ds_cfg(tmp_path, [{"name": name, "path": f"builtin:{name}"}])
    lm, model, _ = load_lm(resolve(f"builtin:{name}", cfg.cache_dir), cfg)
    assert model.config.model_type == BUILTIN_FAMILIES[name]
    assert lm.max_length == 256  # every built-in member is trained on 256-token blocks


@pytest.mark.slow
def test_downstream_runs_on_a_member_of_each_family(tmp_path):
    models = [{"name": name, "path": f"builtin:{name}"} for name in BUILTIN_FAMILIES]
    res = run(ds_cfg(tmp_path, models, limit=4, tasks=["lnfree_builtin_ppl"]))
    for name in BUILTIN_FAMILIES:
        ppl = res["models"][name]["metrics"]["lnfree_builtin_ppl"]
        assert abs(ppl["token_ce"] - ppl["lnfree_token_ce"]) < 1e-3  # lm-eval's CE is lnfree's, in every family


def test_fp16_really_breaks_the_lnfree_export(tiny_run):
    """Why the refusal exists: stock transformers loads the LN-free export in fp16 without complaint, and it
    computes garbage (the 1e6 / sigma weights overflow fp16)."""
    from transformers import GPT2LMHeadModel

    _, run_dir = tiny_run
    m = GPT2LMHeadModel.from_pretrained(run_dir / "export" / "hf", dtype=torch.float16)
    assert not torch.isfinite(m.transformer.h[0].ln_1.weight).all()
