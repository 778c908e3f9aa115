"""The depth-and-width family: model options, pretraining that keeps the validation minimum and resumes, the
restore-from-repo path, the fixed fine-tuning grid (no early stopping), the LR rule and the family record
(lnfree/analysis/family.py), its convergence criterion included."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from lnfree.analysis.family import (
    collect,
    converged,
    late_gain,
    pair,
    replicates_needed,
    val_by_step,
    verdict,
    window_gain,
)
from lnfree.io import load, model_from_checkpoint, read_checkpoint
from lnfree.model import non_embedding_params
from lnfree.references import builtin_dir
from lnfree.sweeps import lr_probe as probe
from lnfree.sweeps import pretrain_depth as fam
from lnfree.sweeps import run_missing as rm
from lnfree.training.loggers import read_metrics
from lnfree.training.pretrain_run import pretrain, resume_point, validation_blocks
from lnfree.training.tail_average import average_checkpoints, validation_ce, windows


def _compose(name, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_model_options_select_a_replicate_that_is_the_pretraining_seed():
    cfg = _compose("train", "model=builtin_l3w96", "model.replicate=2")
    assert cfg.model.name == "builtin_l3w96_s2" and cfg.model.source == "builtin:l3w96_s2"
    assert dict(cfg.model.shape) == {"n_layer": 3, "n_head": 3, "n_embd": 96, "n_positions": 256}
    pre = _compose("pretrain_depth", "model=builtin_l3w96", "model.replicate=2")
    assert pre.seed == 2 and pre.data.seed == 2 and pre.model.pretrain_keep == "tail_average"
    assert pre.trainer.ckpt_every == pre.trainer.val_every
    assert _compose("pretrain", "model=builtin_w48").seed == 0  # the width family's one model: replicate 0


def test_family_design_meets_the_issue():
    """>= 4 sizes, >= 3 depths, >= 30x in non-embedding parameters, >= 2 replicates per size."""
    members = fam.members()
    shapes, nonemb = {}, {}
    for option, _, _ in members:
        s = _compose("train", f"model={option}").model.shape
        shapes[option] = (s.n_layer, s.n_embd)
        nonemb[option] = non_embedding_params(GPT2LMHeadModel(GPT2Config(vocab_size=4096, **s)))
    assert len(shapes) >= 4 and len({L for L, _ in shapes.values()}) >= 3
    assert max(nonemb.values()) / min(nonemb.values()) >= 30
    assert all(sum(o == opt for o, _, _ in members) >= 2 for opt in shapes)
    assert len({n for _, _, n in members}) == len(members)


def _tiny_pretrain(tmp_path, *extra, keep="val_min"):
    cfg = _compose("pretrain_depth", "model=builtin_l1w32", "model.replicate=2", "model.pretrain_steps=4",
                   "data.block_size=32", "data.val_blocks=2", "hardware.micro_batch_size=2",
                   "trainer.progress_bar=false", "trainer.val_every=2", "trainer.ckpt_every=2",
                   f"model.pretrain_keep={keep}",
                   f"paths.output_dir={tmp_path}/runs/l1w32_s2", f"paths.cache_dir={tmp_path}/cache", *extra)
    return cfg, pretrain(cfg)


@pytest.mark.slow
def test_pretrain_keeps_the_validation_minimum_and_resumes(tmp_path):
    cfg, dest = _tiny_pretrain(tmp_path)
    run = tmp_path / "runs" / "l1w32_s2"
    assert dest == builtin_dir("l1w32_s2", tmp_path / "cache")
    info = json.loads((dest / "pretrain_info.json").read_text())
    assert info["seed"] == 2 and info["kept"] == "val_min" and info["steps"] == 4
    # a later validation minimum at step 2 (logged at batch index 1): the run is exported again, not retrained,
    # and the kept weights are the step-2 checkpoint's, not the last
    (run / "csv" / "zz").mkdir()  # read after the run's own log, so its value wins
    (run / "csv" / "zz" / "metrics.csv").write_text("step,val/ce\n1,0.5\n")
    dest = pretrain(cfg)
    info = json.loads((dest / "pretrain_info.json").read_text())
    assert (info["kept_step"], info["val_ce"]) == (2, 0.5) and info["val_ce_last"] > 0.5
    kept = load_file(dest / "model.safetensors")
    step2 = model_from_checkpoint(read_checkpoint(run / "checkpoints/step000002.ckpt")).state_dict()
    last = model_from_checkpoint(read_checkpoint(run / "checkpoints/last.ckpt")).state_dict()
    w = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(kept[w], step2[w]) and not torch.equal(kept[w], last[w])
    # a killed run (checkpoints, no summary) resumes from its last checkpoint; a finished one does not
    assert resume_point(run, cfg) is None
    (run / "summary.json").unlink()
    assert resume_point(run, cfg) == str(run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_family_record_groups_replicates_with_their_kept_ce_and_flag(tmp_path):
    _tiny_pretrain(tmp_path)
    res = collect(tmp_path / "runs", tmp_path / "out", tol=0.003, keep="val_min")
    (size,) = res["sizes"]
    assert (size["name"], size["n_layer"], size["n_embd"], size["non_embedding_params"]) == ("l1w32", 1, 32, 12768)
    (rep,) = size["pretrained"]
    info = json.loads((builtin_dir("l1w32_s2", tmp_path / "cache") / "pretrain_info.json").read_text())
    assert (rep["seed"], rep["replicate"], rep["kept"]) == (2, 2, f"step {info['kept_step']}")
    assert rep["val_ce"] == pytest.approx(info["val_ce"]) and rep["converged"] == rep["convergence"]["met"]
    assert "| l1w32 | 1 x 32 | 12,768 | 2 (2) |" in (tmp_path / "out" / "family.md").read_text()
    assert (tmp_path / "out" / rep["curve"]).exists()


NON_EMBEDDING = {"l1w32": 12768, "l2w64": 100096}  # the record orders sizes by these


def _committed_record(out, *members, keep="tail_average", tol=0.003):
    """A family.json as committed, one converged replicate per (size, name), val CE 9.0, with its curve."""
    (out / "curves").mkdir(parents=True, exist_ok=True)
    sizes = []
    for size, name in members:
        (out / "curves" / f"{name}.csv").write_text("step,train_ce,val_ce\n1,9.0,9.0\n")
        n = int(size[1:size.index("w")])
        rep = {"name": name, "seed": 1, "replicate": 1, "val_ce": 9.0, "kept": "steps 1-2 (mean)", "val_ce_last": 9.0,
               "converged": True, "curve": f"curves/{name}.csv",
               "convergence": {"val_min": {"late_gain": 0.0}, "tail_average": {
                   "window_gain": 0.0, "averaged_weights_gain": 0.0, "halves_diff": 0.0}}}
        sizes.append({"name": size, "n_layer": n, "n_embd": 32 * n, "n_head": n, "all_converged": True,
                      "non_embedding_params": NON_EMBEDDING[size], "params": 2 * NON_EMBEDDING[size],
                      "pretrained": [rep]})
    (out / "family.json").write_text(json.dumps({"criterion": "c", "keep": keep, "tol": tol, "sizes": sizes}))


def test_members_without_a_run_dir_keep_their_committed_record(tmp_path):
    """A machine that restored members from the repo has no run dirs for them: the record keeps their entries."""
    (tmp_path / "runs").mkdir()
    _committed_record(tmp_path / "out", ("l1w32", "builtin_l1w32_s1"), ("l2w64", "builtin_l2w64_s1"))
    res = collect(tmp_path / "runs", tmp_path / "out", tol=0.003, keep="tail_average")
    assert [(x["name"], [r["name"] for r in x["pretrained"]], x["all_converged"]) for x in res["sizes"]] == [
        ("l1w32", ["builtin_l1w32_s1"], True), ("l2w64", ["builtin_l2w64_s1"], True)]
    assert json.loads((tmp_path / "out" / "family.json").read_text())["sizes"] == res["sizes"]
    md = (tmp_path / "out" / "family.md").read_text()
    assert "| l2w64 | 2 x 64 | 100,096 | 1 (1) | steps 1-2 (mean) | 9.0000 |" in md
    with pytest.raises(ValueError, match="keep=tail_average, tol=0.003"):  # another criterion is not mixed in
        collect(tmp_path / "runs", tmp_path / "out", tol=0.002, keep="tail_average")


def test_val_min_needs_a_checkpoint_at_every_validation(tmp_path):
    with pytest.raises(ValueError, match="ckpt_every"):
        _tiny_pretrain(tmp_path, "trainer.ckpt_every=4")
    with pytest.raises(ValueError, match="keep_at_end=all"):  # the checkpoints must outlive training
        _tiny_pretrain(tmp_path, "trainer.keep_at_end=last", keep="tail_average")


@pytest.mark.slow
def test_pretrain_keeps_the_mean_of_the_last_window_and_records_both_windows(tmp_path):
    # 20 steps, a checkpoint and a validation at each: the last 10% is steps 19-20, the 10% before 17-18
    cfg, dest = _tiny_pretrain(tmp_path, "model.pretrain_steps=20", "trainer.val_every=1", "trainer.ckpt_every=1",
                               keep="tail_average")
    run = tmp_path / "runs" / "l1w32_s2"
    ckpt = {s: run / "checkpoints" / f"step{s:06d}.ckpt" for s in range(17, 21)}
    val = validation_blocks(cfg)
    # the evaluation is training's validation: one checkpoint gives the CE logged at its step
    logged = val_by_step(read_metrics(run)["val/ce"], 20)
    for s in (17, 20):
        m = model_from_checkpoint(read_checkpoint(ckpt[s]))
        assert validation_ce(m, val, 2) == pytest.approx(logged[s], abs=1e-5)
    # the exported weights are the mean of steps 19 and 20's, and its CE is the one recorded
    w = "transformer.h.0.mlp.c_fc.weight"
    a, b = (model_from_checkpoint(read_checkpoint(ckpt[s])).state_dict()[w] for s in (19, 20))
    kept = load_file(dest / "model.safetensors")[w]
    assert torch.allclose(kept, (a + b) / 2, atol=1e-7) and not torch.allclose(kept, b)
    info = json.loads((dest / "pretrain_info.json").read_text())
    record = json.loads((run / "tail_average.json").read_text())
    assert info["kept"] == "tail_average" and info["kept_step"] == record["window"] == [19, 20]
    assert info["tail_average"] == record
    assert info["val_ce"] == record["val_ce"] == pytest.approx(validation_ce(load(str(dest))[0], val, 2), abs=1e-5)
    prev = average_checkpoints([ckpt[17], ckpt[18]])
    assert record["val_ce_previous"] == pytest.approx(validation_ce(prev, val, 2), abs=1e-6)
    assert record["previous_window"] == [17, 18] and record["val_ce_halves"][0] == pytest.approx(logged[19], abs=1e-5)
    assert record["checkpoints_val_ce"] == {"last": pytest.approx((logged[19] + logged[20]) / 2),
                                            "previous": pytest.approx((logged[17] + logged[18]) / 2)}
    # a committed record: its entry for this member is replaced by the run dir's, a member without one kept
    _committed_record(tmp_path / "out", ("l1w32", "builtin_l1w32_s2"), ("l2w64", "builtin_l2w64_s1"))
    # the family record decides convergence by the window gain and keeps the val_min late gain beside it
    res = collect(tmp_path / "runs", tmp_path / "out", tol=0.003, keep="tail_average")
    assert [r["name"] for x in res["sizes"] for r in x["pretrained"]] == ["builtin_l1w32_s2", "builtin_l2w64_s1"]
    assert res["sizes"][1]["pretrained"][0]["val_ce"] == 9.0
    (rep,) = res["sizes"][0]["pretrained"]
    gain = record["checkpoints_val_ce"]["previous"] - record["checkpoints_val_ce"]["last"]
    assert rep["convergence"]["tail_average"]["window_gain"] == pytest.approx(gain)
    assert rep["converged"] == (gain <= 0.003) and rep["val_ce"] == record["val_ce"]
    assert "late_gain" in rep["convergence"]["val_min"] and res["keep"] == "tail_average"
    assert "| l1w32 | 1 x 32 | 12,768 | 2 (2) | steps 19-20 (mean) |" in (tmp_path / "out" / "family.md").read_text()
    # the kept weights are chosen after training: the finished run is exported again under val_min, not retrained
    mtime = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    _, dest = _tiny_pretrain(tmp_path, "model.pretrain_steps=20", "trainer.val_every=1", "trainer.ckpt_every=1")
    info = json.loads((dest / "pretrain_info.json").read_text())
    assert info["kept"] == "val_min" and info["kept_step"] == min(logged, key=lambda s: (logged[s], s))
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == mtime


def _ckpt(path, step):
    torch.save({"global_step": step, "state_dict": {"model.w": torch.full((2,), float(step))},
                "optimizer_states": [{"m": torch.zeros(2)}], "lr_schedulers": [{}]}, path)


def test_an_unsettled_member_snapshots_into_the_repo_and_resumes_from_there(tmp_path):
    """An unfinished run: the newest last*.ckpt whole, the current target's two tail-average windows weights-only,
    the logs and config; restored into a missing run dir only."""
    run, runs, cache = tmp_path / "runs" / "l2w64_s1", tmp_path / "runs", tmp_path / "cache"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("trainer: {max_steps: 1000, val_every: 100}\noptim: {}\n")
    (run / "csv" / "resumed-1").mkdir(parents=True)
    (run / "csv" / "resumed-1" / "metrics.csv").write_text("step,val/ce\n799,4.5\n")
    (run / "train.log").write_text("log")
    for s in (700, 800, 900):
        _ckpt(run / "checkpoints" / f"step{s:06d}.ckpt", s)
    _ckpt(run / "checkpoints" / "last.ckpt", 850)
    _ckpt(run / "checkpoints" / "last-v1.ckpt", 900)  # Lightning's name after a restore: the newer one
    partial = tmp_path / "partial"
    assert fam.snapshot("l2w64_s1", runs, cache, partial)
    snap = partial / "l2w64_s1"
    # the windows of 1000 steps are steps 901-1000 and 801-900: of those saved so far, only 900 is in one
    assert sorted(p.name for p in (snap / "checkpoints").iterdir()) == ["last.ckpt", "step000900.ckpt"]
    last, window = (torch.load(snap / "checkpoints" / f, weights_only=True) for f in ("last.ckpt", "step000900.ckpt"))
    assert last["global_step"] == 900 and "optimizer_states" in last
    assert set(window) == {"global_step", "state_dict"} and torch.equal(window["state_dict"]["model.w"],
                                                                      torch.full((2,), 900.0))
    assert (snap / "csv" / "resumed-1" / "metrics.csv").exists() and (snap / "train.log").read_text() == "log"
    assert not fam.snapshot("l2w64_s2", runs, cache, partial)  # nothing there
    runs2 = tmp_path / "runs2"
    assert fam.restore_partial("l2w64_s1", runs2, partial) and (runs2 / "l2w64_s1/checkpoints/last.ckpt").exists()
    assert not fam.restore_partial("l2w64_s1", runs2, partial)  # never over an existing run dir
    # finished: snapshotted only while recipe 3 still continues it (not converged, steps left), with its summary
    (run / "summary.json").write_text(json.dumps({"steps": 1000, "config": {"optim": {}}}))
    (run / "export" / "hf").mkdir(parents=True)  # its export, which exporting it again starts from
    info = builtin_dir("l2w64_s1", cache, shipped=False) / "pretrain_info.json"
    info.parent.mkdir(parents=True)
    for gain, expected in ((0.01, True), (0.001, False)):
        info.write_text(json.dumps({"steps": 1000, "tail_average": _tail_record(gain)}))
        assert fam.snapshot("l2w64_s1", runs, cache, partial) is expected
        assert (verdict("l2w64_s1", cache) is None) is expected
        if expected:  # and it is not saved as a finished member: it goes on
            assert not fam.save("l2w64_s1", cache, tmp_path / "repo", partial) and (partial / "l2w64_s1").exists()
    assert (snap / "summary.json").exists() and (snap / "export" / "hf").is_dir()


def _tail_record(gain):
    return {"window": [900, 1000], "val_ce": 4.0, "val_ce_previous": 4.0, "val_ce_halves": [4.0, 4.0],
            "checkpoints_val_ce": {"last": 4.0, "previous": 4.0 + gain}}


def test_a_size_adds_replicates_until_two_converge():
    need = replicates_needed
    assert need({}) == [1, 2] and need({1: True, 2: None}) == [1, 2] and need({1: True, 2: True}) == [1, 2]
    assert need({1: True, 2: False}) == [1, 2, 3] and need({1: True, 2: False, 3: True}) == [1, 2, 3]
    assert need({1: False, 2: True, 3: False}) == [1, 2, 3, 4] and need({1: True, 2: False, 3: False, 4: False}) == [
        1, 2, 3, 4]  # at most 4
    assert need({1: False, 2: False}) == [1, 2]  # both first replicates unconverged: a longer recipe, not more seeds


def test_extra_replicates_follow_the_verdicts_in_the_cache(tmp_path):
    def member(name, gain):
        d = builtin_dir(name, tmp_path, shipped=False)
        d.mkdir(parents=True)
        rec = {"window": [7300, 8000], "val_ce": 4.5, "val_ce_previous": 4.5, "val_ce_halves": [4.5, 4.5],
               "checkpoints_val_ce": {"previous": 4.5 + gain, "last": 4.5}}
        # 16,000 steps: continued as far as recipe 3 goes, so a "not converged" is settled
        (d / "pretrain_info.json").write_text(json.dumps({"kept": "tail_average", "tail_average": rec,
                                                          "steps": 16_000}))
    base = [("builtin_l1w32", 1, "l1w32_s1"), ("builtin_l1w32", 2, "l1w32_s2"), ("builtin_l2w64", 1, "l2w64_s1"),
            ("builtin_l2w64", 2, "l2w64_s2")]
    member("l1w32_s1", -0.008)
    member("l1w32_s2", 0.013)  # not converged: replicate 3 joins
    member("l2w64_s1", 0.001)
    assert fam.with_extra_replicates(base, tmp_path) == base[:2] + [("builtin_l1w32", 3, "l1w32_s3")] + base[2:]
    assert verdict("l1w32_s2", tmp_path) is False and verdict("l2w64_s2", tmp_path) is None
    # the grid's pair: none until two converge, then the two of lowest seed, on the grid's jobs
    assert pair("l1w32", tmp_path) is None and pair("l2w64", tmp_path) is None
    member("l1w32_s3", 0.002)
    member("l2w64_s2", -0.001)
    assert pair("l1w32", tmp_path) == [1, 3] and pair("l2w64", tmp_path) == [1, 2]
    g = rm.depth_grid(cache_dir=tmp_path, settled=True)
    assert g["pairs"]["builtin_l1w32"] == [1, 3] and g["pairs"]["builtin_l3w96"] is None
    lrs = {m: {"lr": 3e-4} for m in g["models"]}
    jobs = rm.depth_jobs([], lrs, g)
    assert {(m, rep) for _, m, rep, *_ in jobs} == {("builtin_l1w32", 1), ("builtin_l1w32", 3),
                                                     ("builtin_l2w64", 1), ("builtin_l2w64", 2)}
    assert {rep for _, m, rep, arm, *_ in jobs if arm == "builtin"} == {1}
    assert {j[2] for j in probe.probe_jobs([], g)} == {1}  # first of each settled pair; none for l3w96, l4w128


@pytest.mark.slow
def test_a_finished_pretraining_continues_at_its_final_learning_rate(tmp_path):
    """Recipe 3: a member not converged goes on from its last checkpoint for more steps, at min_lr (past the cosine
    horizon), and its windows keep the recipe's width; another recipe or horizon is refused before any compute."""
    base = ("trainer.val_every=1", "trainer.ckpt_every=1", "trainer.log_every=1", "optim.warmup_steps=5")
    _tiny_pretrain(tmp_path, "model.pretrain_steps=20", *base, keep="tail_average")
    run = tmp_path / "runs" / "l1w32_s2"
    with pytest.raises(ValueError, match="optim.decay_steps=20"):
        _tiny_pretrain(tmp_path, "model.pretrain_steps=24", *base, keep="tail_average")  # horizon would move
    with pytest.raises(ValueError, match="optim.lr"):
        _tiny_pretrain(tmp_path, "model.pretrain_steps=24", "optim.decay_steps=20", "optim.lr=1e-3", *base,
                       keep="tail_average")
    cfg, dest = _tiny_pretrain(tmp_path, "model.pretrain_steps=24", "optim.decay_steps=20", *base,
                               keep="tail_average")
    assert json.loads((run / "summary.json").read_text())["steps"] == 24
    assert json.loads((run / "summary_step000020.json").read_text())["steps"] == 20
    lrs = dict(read_metrics(run)["train/lr"])
    assert all(lrs[s] == pytest.approx(cfg.optim.min_lr) for s in lrs if s >= 20) and any(s >= 20 for s in lrs)
    record = json.loads((run / "tail_average.json").read_text())
    assert record["window"] == [23, 24] and record["previous_window"] == [21, 22]
    assert json.loads((dest / "pretrain_info.json").read_text())["steps"] == 24
    # asked again for the same 24 steps: exported again, not trained
    mtime = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    _tiny_pretrain(tmp_path, "model.pretrain_steps=24", "optim.decay_steps=20", *base, keep="tail_average")
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == mtime
    # on another machine: a member still to be continued (made so here) goes on from its snapshot, whose window
    # checkpoints hold weights only: exported again to the same weights and record, then continued
    info = json.loads((dest / "pretrain_info.json").read_text())
    info["tail_average"]["checkpoints_val_ce"]["previous"] = info["tail_average"]["checkpoints_val_ce"]["last"] + 1
    (dest / "pretrain_info.json").write_text(json.dumps(info))
    partial, weights = tmp_path / "partial", load_file(dest / "model.safetensors")
    (run / ".hydra").mkdir()  # as the Hydra app writes it (pretrain() alone does not)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    assert fam.snapshot("l1w32_s2", tmp_path / "runs", tmp_path / "cache", partial)
    assert all("optimizer_states" not in torch.load(p, weights_only=True)
               for p in (partial / "l1w32_s2" / "checkpoints").glob("step*.ckpt"))
    shutil.rmtree(run)
    shutil.rmtree(dest)
    assert fam.restore_partial("l1w32_s2", tmp_path / "runs", partial)
    _, dest = _tiny_pretrain(tmp_path, "model.pretrain_steps=24", "optim.decay_steps=20", *base, keep="tail_average")
    assert all(torch.equal(v, weights[k]) for k, v in load_file(dest / "model.safetensors").items())
    assert json.loads((run / "tail_average.json").read_text()) == record
    _tiny_pretrain(tmp_path, "model.pretrain_steps=26", "optim.decay_steps=20", *base, keep="tail_average")
    assert json.loads((run / "tail_average.json").read_text())["previous_window"] == [23, 24]


def test_a_member_not_converged_is_continued_one_segment_at_a_time(tmp_path):
    cache, runs = tmp_path / "cache", tmp_path / "runs"

    def member(name, steps, gain, horizon=None):
        d = builtin_dir(name, cache, shipped=False)
        d.mkdir(parents=True)
        rec = {"window": [steps - 700, steps], "val_ce": 4.5, "val_ce_previous": 4.5, "val_ce_halves": [4.5, 4.5],
               "checkpoints_val_ce": {"previous": 4.5 + gain, "last": 4.5}}
        (d / "pretrain_info.json").write_text(json.dumps({"kept": "tail_average", "tail_average": rec,
                                                          "steps": steps}))
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({"steps": steps,
                                                              "config": {"optim": {"decay_steps": horizon}}}))
    member("l1w32_s1", 8000, 0.007)  # not converged after the recipe's 8000 steps: 800 more at the final LR
    assert fam.continuation("l1w32_s1", cache, runs) == ("model.pretrain_steps=8800", "optim.decay_steps=8000")
    assert verdict("l1w32_s1", cache) is None  # not settled while it can go on
    assert fam.steps_args("l1w32_s1", runs) == ()  # never continued: the recipe's own steps
    member("l1w32_s2", 8800, 0.005, horizon=8000)  # continued once, still improving: again
    assert fam.continuation("l1w32_s2", cache, runs) == ("model.pretrain_steps=9600", "optim.decay_steps=8000")
    assert fam.steps_args("l1w32_s2", runs) == ("model.pretrain_steps=8800", "optim.decay_steps=8000")
    member("l2w64_s1", 8800, 0.001, horizon=8000)  # converged: done
    assert fam.continuation("l2w64_s1", cache, runs) is None and verdict("l2w64_s1", cache) is True
    member("l2w64_s2", 16000, 0.01, horizon=8000)  # at recipe 3's limit: settled as not converged
    assert fam.continuation("l2w64_s2", cache, runs) is None and verdict("l2w64_s2", cache) is False


def test_windows_are_the_last_two_tenths_of_the_checkpoints():
    last, prev = windows(8000, 100)
    assert last == list(range(7300, 8001, 100)) and prev == list(range(6500, 7201, 100))
    assert windows(20, 1) == ([19, 20], [17, 18])
    assert windows(8800, 100, horizon=8000) == (list(range(8100, 8801, 100)), list(range(7300, 8001, 100)))
    with pytest.raises(ValueError, match="needs checkpoints"):
        windows(100, 50)  # one checkpoint at 100, none in 80-90


def test_window_gain_decides_by_the_checkpoints_not_the_averaged_weights():
    # l2w64_s1's numbers: its checkpoints still improve by 0.0089 between the windows, while the earlier window's
    # averaged weights (higher LR, more to gain from averaging) look better: not converged
    rec = {"window": [7300, 8000], "val_ce": 4.1963, "val_ce_previous": 4.1899, "val_ce_halves": [4.1968, 4.1990],
           "checkpoints_val_ce": {"previous": 4.2176, "last": 4.2088}}
    r = window_gain(rec, 0.003)
    assert not r["met"] and r["window_gain"] == pytest.approx(0.0088) and r["halves_diff"] == pytest.approx(0.0022)
    assert r["averaged_weights_gain"] == pytest.approx(-0.0064)
    flat = {**rec, "checkpoints_val_ce": {"previous": 4.2110, "last": 4.2088}}  # improved by 0.0022 <= 0.003
    assert window_gain(flat, 0.003)["met"] and not window_gain(flat, 0.003)["overfit"]
    rising = window_gain({**rec, "checkpoints_val_ce": {"previous": 4.20, "last": 4.21}}, 0.003)
    assert rising["met"] and rising["overfit"]  # passed its minimum: converged, flagged
    assert window_gain({**rec, "val_ce_halves": [4.5, None]}, 0.003)["halves_diff"] is None


def test_convergence_criterion_is_the_late_gain_of_the_best_validation():
    flat = {100 * i: 5.0 - 0.1 * min(i, 5) for i in range(1, 11)}  # minimum reached at 50%: converged
    assert late_gain(flat, 1000, 0.003)["met"] and late_gain(flat, 1000, 0.003)["kept_step"] == 500
    falling = {100 * i: 5.0 - 0.01 * i for i in range(1, 11)}  # best 4.92 at step 800, 4.90 at the end
    r = late_gain(falling, 1000, 0.003)
    assert not r["met"] and r["late_gain"] == pytest.approx(0.02)
    overfit = {**flat, 900: 4.6, 1000: 4.7}  # passed its minimum: converged, flagged as overfitting
    assert late_gain(overfit, 1000, 0.003)["met"] and late_gain(overfit, 1000, 0.003)["overfit"]
    assert val_by_step([(0, 9.0), (99, 5.0), (199, 4.0), (200, 4.0)], 200) == {100: 5.0, 200: 4.0}


def test_a_committed_member_restores_as_a_whole_hf_dir_with_the_builtin_tokenizer(tmp_path):
    """Committed without tokenizer.json (the repo holds the built-in tokenizer's once), restored with it: stock
    transformers loads the cache copy whole, and lnfree's file check finds every file recorded, none extra."""
    from transformers import AutoTokenizer

    from lnfree.io import load_tokenizer
    from lnfree.model_record import SHARED_TOKENIZER_FILE, file_sha256

    assert not (fam.REPO_MODELS / "l1w32_s1" / "tokenizer.json").exists()
    assert fam.restore("l1w32_s1", tmp_path)
    d = builtin_dir("l1w32_s1", tmp_path, shipped=False)
    assert file_sha256(d / "tokenizer.json") == file_sha256(SHARED_TOKENIZER_FILE)
    text = "Restored whole, read by stock transformers."
    assert AutoTokenizer.from_pretrained(d)(text).input_ids == load_tokenizer("builtin")(text).input_ids
    assert GPT2LMHeadModel.from_pretrained(d).config.n_layer == 1
    assert load("builtin:l1w32_s1", cache_dir=tmp_path)[1] is not None


@pytest.mark.slow
def test_members_restore_from_the_repo_into_the_cache(tmp_path):
    _, dest = _tiny_pretrain(tmp_path)
    repo = tmp_path / "repo_models"
    partial = tmp_path / "partial"
    (partial / "l1w32_s2").mkdir(parents=True)  # its resume state from an earlier machine
    assert fam.save("l1w32_s2", tmp_path / "cache", repo, partial) and not (partial / "l1w32_s2").exists()
    assert not fam.save("l1w32_s1", tmp_path / "cache", repo, partial)  # not pretrained: nothing to save
    assert sorted(p.name for p in (repo / "l1w32_s2").iterdir()) == sorted(fam.KEEP_FILES)
    assert "tokenizer.json" not in fam.KEEP_FILES  # the built-in tokenizer's, read from its one copy
    # the recipe's kept weights decide whether a cached member is current
    runs = tmp_path / "runs"
    assert fam.recipe_keep() == "tail_average" and fam.cached_state("l1w32_s1", tmp_path / "cache", runs, "x") is None
    assert fam.cached_state("l1w32_s2", tmp_path / "cache", runs, "val_min") == "ok"
    assert fam.cached_state("l1w32_s2", tmp_path / "cache", runs, "tail_average") == "export again"
    assert fam.cached_state("l1w32_s2", tmp_path / "cache", tmp_path / "none", "tail_average") == "stale"
    assert fam.restore("l1w32_s2", tmp_path / "cache2", repo)
    assert not fam.restore("l1w32_s1", tmp_path / "cache2", repo)
    assert (builtin_dir("l1w32_s2", tmp_path / "cache2", shipped=False) / "tokenizer.json").is_file()
    model, tok = load("builtin:l1w32_s2", cache_dir=tmp_path / "cache2")
    ref, _ = load("builtin:l1w32_s2", cache_dir=tmp_path / "cache")
    assert tok is not None and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                     ref.state_dict().values()))


def _record(pre, steps, schedule, seed, lr, val_ce=4.0, pre_ce=4.0):
    return {"pretrained": pre, "steps": steps, "schedule": schedule, "seed": seed, "lr": lr, "val_ce": val_ce,
            "pretrained_val_ce": pre_ce}


def test_depth_grid_runs_every_budget_no_early_stopping():
    g = rm.depth_grid()
    assert len(g["budgets"]) >= 6 and all(b == 2 * a for a, b in zip(g["budgets"], g["budgets"][1:]))
    assert g["seeds"] == [1, 2, 3] and {"none", "scaled"} <= set(g["schedules"])
    lrs = {m: {"lr": 3e-4} for m in g["models"]}
    m, size = g["models"][0], rm.size_of(g["models"][0])
    # every seed of both arms of replicate 1 at the smallest budget, with a gap within 0.5%: nothing skipped
    rec = [_record(f"{size}_s1", g["budgets"][0], arm, s, 3e-4, 4.0 + 0.01 * (arm == "scaled"))
           for arm in ("none", "scaled") for s in g["seeds"]]
    rec.append(_record(f"{size}_s1", g["budgets"][1], "none", 1, 3e-4))
    rec.append(_record(f"{size}_s2", g["budgets"][1], "none", 1, 6e-4))  # another LR: not this grid's run
    jobs = {(b, mm, rep, arm): tuple(ss) for b, mm, rep, arm, lr, ss in rm.depth_jobs(rec, lrs, g)}
    assert (g["budgets"][0], m, 1, "none") not in jobs and (g["budgets"][0], m, 1, "scaled") not in jobs
    assert jobs[(g["budgets"][1], m, 1, "none")] == (2, 3) and jobs[(g["budgets"][1], m, 2, "none")] == (1, 2, 3)
    for mm in g["models"]:  # no early stopping: every budget of every model and replicate runs both arms
        for b in g["budgets"][1:]:
            assert all((b, mm, rep, arm) in jobs for rep in g["replicates"] for arm in ("none", "scaled"))
    variant = [(b, mm, rep) for (b, mm, rep, arm) in jobs if arm == g["variant_schedule"]]
    assert variant and {rep for _, _, rep in variant} == set(g["variant_replicates"])
    assert all(rm.fits(g["variant_schedule"], mm, b) for b, mm, _ in variant)
    deepest = g["models"][-1]  # the fixed schedule does not fit the smallest budgets of the deepest size
    assert not rm.fits(g["variant_schedule"], deepest, g["budgets"][0])
    assert (g["budgets"][0], deepest, 1, g["variant_schedule"]) not in jobs


def test_depth_grid_refuses_early_stopping():
    with pytest.raises(SystemExit, match="until-within"):
        rm.main(["--experiment", "data_scaling_depth", "--until-within", "0.01"])


def test_depth_record_keys(tmp_path):
    summary = {"steps": 8, "tokens_seen": 8 * 4096, "val_ce": 4.1, "n_params_non_embedding": 12768,
               "all_removed": True, "config": {
                   "model": {"name": "builtin_l1w32_s2", "source": "builtin:l1w32_s2", "replicate": 2,
                             "shape": {"n_layer": 1, "n_embd": 32}},
                   "schedule": {"name": "scaled", "remove": True, "fit_fraction": 0.4}, "seed": 3,
                   "optim": {"lr": 3e-4}, "hardware": {"name": "cpu"}, "experiment": "data_scaling_depth"}}
    r = rm.depth_record(summary, 4.0)
    assert (r["pretrained"], r["size"], r["n_layer"], r["n_embd"], r["replicate"]) == ("l1w32_s2", "l1w32", 1, 32, 2)
    assert rm.depth_key(r) == ("l1w32_s2", 8, "scaled", 3, 3e-4)
    (tmp_path / "sweep" / "s3").mkdir(parents=True)
    (tmp_path / "sweep" / "s3" / "summary.json").write_text(json.dumps(summary))
    records = tmp_path / "runs.jsonl"
    assert rm.harvest(tmp_path / "sweep", records) == 1 and rm.harvest(tmp_path / "sweep", records) == 0
    assert rm.read_records(records)[0]["val_ce"] == 4.1


def test_lr_rule_takes_the_highest_lr_whose_vanilla_control_stays_within_tolerance():
    g = {**rm.depth_grid(), "models": ["builtin_l1w32", "builtin_l2w64", "builtin_l3w96"],
         "lr_grid": [1e-4, 2e-4, 4e-4], "budgets": [8, 16], "lr_tolerance": 0.001}
    drift = {"l1w32": {1e-4: 0.0005, 2e-4: 0.0009, 4e-4: 0.002},  # 2e-4 is the highest within 0.1%
             "l2w64": {1e-4: 0.002, 2e-4: 0.003, 4e-4: 0.004},  # none within: the lowest, flagged
             "l3w96": {1e-4: -0.0002, 2e-4: 0.0005, 4e-4: -0.0015}}  # improving by more than 0.1% also fails
    rec = [_record(f"{s}_s1", b, "none", 1, lr, 4.0 * (1 + d * (b == 16)))
           for s, ds in drift.items() for lr, d in ds.items() for b in g["budgets"]]
    rec += [_record("l1w32_s1", 16, "none", 2, 4e-4, 4.0), _record("l1w32_s1", 16, "scaled", 1, 4e-4, 9.0)]
    chosen = probe.choose_lr(rec, g)
    assert chosen["builtin_l1w32"]["lr"] == 2e-4 and chosen["builtin_l1w32"]["rule_met"]
    assert chosen["builtin_l2w64"]["lr"] == 1e-4 and not chosen["builtin_l2w64"]["rule_met"]
    assert chosen["builtin_l3w96"]["lr"] == 2e-4
    incomplete = [r for r in rec if not (r["pretrained"] == "l3w96_s1" and r["steps"] == 16 and r["lr"] == 4e-4)]
    assert "builtin_l3w96" not in probe.choose_lr(incomplete, g)
    jobs = probe.probe_jobs(incomplete, {**g, "models": ["builtin_l3w96"]})
    assert jobs == [(16, "builtin_l3w96", 1, "none", 4e-4, [1])]


def test_the_probe_writes_the_lr_of_every_settled_size_while_others_wait(tmp_path, monkeypatch, capsys):
    """lr.json holds each size whose pair is settled and whose probe is complete, so the grid can start on those;
    a size still pretraining waits without failing the run; a settled size with probe runs missing fails it."""
    g = {**rm.depth_grid(), "models": ["builtin_l1w32", "builtin_l2w64", "builtin_l3w96"], "lr_grid": [1e-4, 2e-4],
         "budgets": [8, 16], "pairs": {"builtin_l1w32": [1, 2], "builtin_l2w64": [2, 3], "builtin_l3w96": None}}
    rec = [_record(f"{s}_s{r}", b, "none", 1, lr, 4.0) for s, r in (("l1w32", 1), ("l2w64", 2))
           for lr in g["lr_grid"] for b in g["budgets"]]
    records = tmp_path / "runs.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in rec))
    # (no run is started: a job left to run fails)
    monkeypatch.setattr(probe.rm, "depth_grid", lambda **_: g)
    monkeypatch.setattr(probe.rm, "harvest", lambda *_: None)
    monkeypatch.setattr(probe.rm, "run_jobs", lambda jobs, *_: int(bool(jobs)))
    monkeypatch.setattr(probe.rm, "LR_FILE", tmp_path / "lr.json")
    probe.main(["--records", str(records)])
    sizes = json.loads((tmp_path / "lr.json").read_text())["sizes"]
    assert {m: c["lr"] for m, c in sizes.items()} == {"builtin_l1w32": 2e-4, "builtin_l2w64": 2e-4}
    assert "['builtin_l3w96']: fewer than two converged" in capsys.readouterr().out
    records.write_text("".join(json.dumps(r) + "\n" for r in rec[1:]))  # l1w32's probe now incomplete
    with pytest.raises(SystemExit, match=r"incomplete \(rc=1\) for \['builtin_l1w32'\]"):
        probe.main(["--records", str(records)])
    assert list(json.loads((tmp_path / "lr.json").read_text())["sizes"]) == ["builtin_l2w64"]



def test_a_missing_depth_member_names_the_command_that_makes_it(tmp_path):
    from lnfree.errors import ModelIOError
    from lnfree.references import resolve

    with pytest.raises(ModelIOError, match=r"--config-name pretrain_depth model=builtin_l3w96 model\.replicate=2"):
        resolve("builtin:l3w96_s2", tmp_path)
    with pytest.raises(ModelIOError, match=r"`python -m lnfree.pretrain model=builtin_w192`"):
        resolve("builtin:w192", tmp_path)


@pytest.mark.slow
def test_members_are_pretrained_jobs_at_a_time_and_a_failure_stops_new_starts(tmp_path):
    import sys
    import time

    def cmd(code):
        return [sys.executable, "-c", code]

    t0 = time.time()
    todo = [("a", cmd("import time; time.sleep(1.5)")), ("b", cmd("import time; time.sleep(1.5)"))]
    assert fam.pretrain_all(todo, tmp_path, jobs=2) == 0
    assert time.time() - t0 < 2.9  # the two ran at once
    times = [json.loads(x) for x in (tmp_path / "times.jsonl").read_text().splitlines()]
    assert sorted(t["name"] for t in times) == ["a", "b"] and all(t["rc"] == 0 and t["jobs"] == 2 for t in times)
    marker = tmp_path / "c_ran"
    todo = [("bad", cmd("raise SystemExit(3)")), ("c", cmd(f"open({str(marker)!r}, 'w')"))]
    assert fam.pretrain_all(todo, tmp_path, jobs=1) == 3
    assert not marker.exists()  # not started after the failure
    # a member's next segment goes to the front of the queue as soon as its command succeeds
    order = tmp_path / "order"
    step = lambda tag: cmd(f"open({str(order)!r}, 'a').write({tag!r})")  # noqa: E731
    todo = [("small", step("s1")), ("large", step("L"))]
    assert fam.pretrain_all(todo, tmp_path, jobs=1, followup=lambda n: step("s2") if (
        n == "small" and "s2" not in order.read_text()) else None) == 0
    assert order.read_text() == "s1s2L"


def test_stage_two_runs_seed_one_of_every_cell_first_after_the_fixed_grid():
    """Stage 2 (protocol.yaml's stage2, run_missing --extend): after every job of the fixed grid, its per-size
    budgets for both replicates and its arms only, one seed per job, seed 1 of every cell before any seed 2;
    without --extend, the fixed grid alone; the fixed grid's largest budget is what make scaling-depth-analysis
    keeps (--print-max-budget)."""
    g = rm.depth_grid()
    s2 = g["stage2"]
    assert all(min(b) > max(g["budgets"]) for b in s2["budgets"].values())
    assert rm.depth_budgets() == g["budgets"]
    lrs = {m: {"lr": 3e-4} for m in g["models"]}
    fixed, extended = rm.depth_jobs([], lrs, g), rm.depth_jobs([], lrs, g, extend=True)
    assert {j[0] for j in fixed} == set(g["budgets"]) and extended[:len(fixed)] == fixed
    added = extended[len(fixed):]
    assert all(len(j[5]) == 1 for j in added)
    seeds = [j[5][0] for j in added]
    assert seeds == sorted(seeds, key=s2["seed_order"].index)  # seed 1 of every cell first
    cells = {(b, m, rep, arm) for b, m, rep, arm, _, _ in added}
    assert cells == {(b, m, rep, arm) for m in g["models"] for b in s2["budgets"][m] for rep in g["replicates"]
                     for arm in s2["schedules"]}
    assert "builtin" not in s2["schedules"]  # no variant arm in stage 2
    first = [j for j in added if j[5] == [1]]
    assert [j[0] for j in first] == sorted(j[0] for j in first)  # smallest budgets first within a seed
    # measured cells are not run again; the CPU hours of what remains shrink with them
    done = [{"pretrained": f"{rm.size_of(m)}_s{rep}", "steps": b, "schedule": arm, "seed": 1, "lr": 3e-4}
            for b, m, rep, arm, _, _ in first]
    rest = rm.depth_jobs(done, lrs, g, extend=True)[len(fixed):]
    assert rest == added[len(first):] and 0 < rm.cpu_hours(rest) < rm.cpu_hours(added)
    out = subprocess.run([sys.executable, "-m", "lnfree.sweeps.run_missing", "--experiment", "data_scaling_depth",
                          "--print-max-budget"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert int(out.stdout) == max(g["budgets"])


def test_convergence_criterion():
    flat = [(s, 4.0 + 0.5 * max(0, 1 - s / 800)) for s in range(0, 1001, 50)]  # flat from step 800
    assert converged(flat, 1000, tol=0.002)["met"]
    falling = [(s, 5.0 - s / 1000) for s in range(0, 1001, 50)]  # still falling 0.1 over the last 10%
    r = converged(falling, 1000, tol=0.002)
    assert not r["met"] and r["not_rising_last_20pct"] and abs(r["change_last_10pct"] - 0.1) < 1e-9
    rising = flat[:-2] + [(950, 4.01), (1000, 4.02)]
    assert not converged(rising, 1000, tol=0.002)["not_rising_last_20pct"]
