"""What a new user meets in their first hour (issue 42): names that fit W&B, a closed config schema, a Python API
without mode traps, defaults that fit each other, quiet-but-alive runs, records that noise does not rewrite, the
published LN-free checkpoints' form, and `python -m lnfree.eval <dir>`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_RUN, compose_train, ids, save_own_gpt2, stock_and_removable, tiny_config
from transformers import GPT2LMHeadModel

from lnfree import load, make_removable
from lnfree.errors import NotRemovableError
from lnfree.io import ModelIOError


# -- 1. names: the real model's, within W&B's limits ------------------------------------------------------
def test_a_custom_model_is_named_by_its_dir_and_names_fit_wandb(tmp_path):
    from lnfree.training.loggers import WANDB_NAME_MAX, artifact_name, run_name
    from lnfree.training.model_source import model_label

    long_dir = tmp_path / ("very_long_parent_" * 8) / ("my_gpt2_" + "x" * 80)
    long_dir.mkdir(parents=True)
    label = model_label({"name": "builtin_w128", "source": str(long_dir)})
    assert label.startswith("my_gpt2_") and len(label) <= 48
    assert label == model_label({"name": "builtin_w128", "source": str(long_dir)})  # stable
    assert label != model_label({"name": "builtin_w128", "source": str(long_dir) + "y"})  # the hash tells apart
    assert model_label({"name": "builtin_w128", "source": str(tmp_path)}) == tmp_path.name
    # an option's own source keeps its name; another source is named by itself
    assert model_label({"name": "gpt2_medium", "source": "gpt2-medium"}) == "gpt2_medium"
    assert model_label({"name": "builtin_w128", "source": "builtin:w128"}) == "builtin_w128"
    assert model_label({"name": "builtin_w128", "source": "builtin:w64"}) == "builtin_w64"
    assert model_label({"name": "builtin_w128", "source": "openai-community/gpt2"}) == "openai-community/gpt2"
    run = run_name(label, "builtin", 1234, "full", "trainer.max_steps=10," + "data.files=[/x/" + "y" * 200 + "]")
    assert len(run) <= WANDB_NAME_MAX and run.startswith(label)
    for suffix in ("-summary", "-export"):
        name = artifact_name(run, suffix)
        assert len(name) <= WANDB_NAME_MAX and name.endswith(suffix)
        assert all(c.isalnum() or c in "-_." for c in name)


def _own_gpt2(d):
    """A user's own GPT-2 dir: 2 layers, 128 positions, the built-in tokenizer saved with it."""
    from lnfree.io import load_tokenizer

    return save_own_gpt2(d, load_tokenizer("builtin"), n_layer=2)


@pytest.mark.slow
def test_wandb_offline_run_of_a_custom_model_in_a_long_path_finishes_named_after_it(tmp_path):
    """The documented own-model command (docs/reference/training.md) with logger=wandb, from the command line (W&B
    offline: this machine has no network, and tests never go online): it exits 0, and the run, its artifacts, its
    model card and its figure's legend are named after the model's dir."""
    from lnfree.data import corpus

    model_dir = _own_gpt2(tmp_path / ("a_rather_long_directory_name_" * 4) / "my_own_gpt2")
    text = next(iter(corpus.iter_texts("validation")))
    data = tmp_path / "docs.jsonl"  # 60 documents of 1,000 characters
    data.write_text("".join(json.dumps({"text": text[i:i + 1000]}) + "\n" for i in range(0, 60_000, 1000)))
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    args = [f"model.source={model_dir}", "data=local_text", f"data.files=[{data}]", "logger=wandb",
            "logger.mode=offline", f"hydra.run.dir={run}",
            "trainer.max_steps=10", "trainer.val_every=10", "trainer.ckpt_every=10", "schedule.fit_fraction=0.5",
            "data.val_blocks=2", "hardware.micro_batch_size=2", "trainer.progress_bar=false",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    p = subprocess.run([sys.executable, "-m", "lnfree.train", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "my_own_gpt2"
    assert summary["config"]["data"]["block_size"] == 128  # the model's context, not the data option's
    assert (run / "export" / "hf" / "README.md").read_text().startswith("---") and \
        "# my_own_gpt2 LN-free" in (run / "export" / "hf" / "README.md").read_text()
    assert "builtin_w128" not in (run / "export" / "hf" / "README.md").read_text()
    assert (run / "training_curves.png").exists()
    import time

    deadline = time.time() + 120  # wandb's service process may still be writing the run's log
    while True:
        log = next((run / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
        if b"-export" in log or time.time() > deadline:
            break
        time.sleep(1)
    import re

    assert b"my_own_gpt2-builtin-s1234-data=local_text," in log  # the run: model-schedule-seed-overrides
    for suffix in (b"summary", b"export"):  # its artifacts, within W&B's 128 characters
        assert re.search(rb"my_own_gpt2-builtin-s1234-data_local_text_[\w.-]{0,90}-" + suffix, log)
    assert "[lnfree] progress: step 10/10" in p.stdout  # progress bars off: plain lines


# -- 2. a closed schema ---------------------------------------------------------------------------------------
def test_a_key_the_schema_does_not_define_is_refused_before_compute_even_with_plus(tmp_path):
    from lnfree.training.config import UnknownKeyError, unknown_keys
    from lnfree.training.train import train

    run = tmp_path / "run"
    with pytest.raises(UnknownKeyError, match=r"trainer\.max_step \(did you mean trainer\.max_steps\?\)"):
        train(compose_train(run, *TINY_RUN, "+trainer.max_step=10"))
    assert not run.exists()
    with pytest.raises(UnknownKeyError, match=r"schedule\.pre_mlp\.strat \(did you mean schedule\.pre_mlp\.start\?\)"):
        train(compose_train(run, *TINY_RUN, "+schedule.pre_mlp.strat=3"))
    with pytest.raises(UnknownKeyError, match="foo"):
        train(compose_train(run, *TINY_RUN, "+foo=1"))
    from omegaconf import OmegaConf

    # the documented free-key extension point (model.shape: HF config fields) takes any key
    cfg = compose_train(run, *TINY_RUN, "+model.shape.layer_norm_epsilon=1e-6")
    assert unknown_keys(OmegaConf.to_container(cfg, resolve=False)) == []


# -- 3. the Python API ----------------------------------------------------------------------------------------
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


def test_make_removable_refuses_an_lnfree_export_as_load_does(tiny_run):
    _, run = tiny_run
    with pytest.raises(ModelIOError) as by_load:
        load(str(run / "export" / "hf"), removable=True)
    stock, _ = load(str(run / "export" / "hf"))
    with pytest.raises(NotRemovableError) as by_make:
        make_removable(stock)
    tail = lambda e: str(e.value).split(" is an LN-free export")[1]  # noqa: E731  (the subject differs)
    assert tail(by_make) == tail(by_load)


# -- 4. defaults that fit ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_positions,overrides,block", [
    (256, [], 256), (128, [], 128), (128, ["data.block_size=64"], 64), (2048, [], 1024)])
def test_the_data_block_follows_the_models_context_unless_set(tmp_path, n_positions, overrides, block):
    from lnfree.training.train import check_config

    cfg = compose_train(tmp_path, *TINY_RUN, "data=local_text", "data.files=[/nowhere/*.jsonl]",
                        f"model.shape.n_positions={n_positions}", "data.block_size=null", *overrides)
    check_config(cfg)  # reads no data
    assert cfg.data.block_size == block


def test_a_data_error_comes_before_a_run_dir_exists(tmp_path):
    from lnfree.data.streams import DataError
    from lnfree.training.train import train

    run = tmp_path / "run"
    with pytest.raises(DataError, match="matched no file"):
        train(compose_train(run, *TINY_RUN, "data=local_text", "data.files=[/nonexistent/*.jsonl]",
                            "data.block_size=64"))
    assert not run.exists()


def test_a_dir_holding_a_run_suggests_only_what_works_there(tmp_path):
    from lnfree.training.safety import RunDirError, check_output_dir

    finished = tmp_path / "finished"
    (finished / "export").mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    with pytest.raises(RunDirError) as e:
        check_output_dir(finished, None, overwrite=False)
    assert "skip_if_done=true" in str(e.value) and "overwrite=true" in str(e.value)
    assert "ckpt_path" not in str(e.value)  # keep_at_end=none: no checkpoint to resume from
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "checkpoints" / "step000012.ckpt").write_bytes(b"")
    with pytest.raises(RunDirError, match=r"ckpt_path=.*step000012\.ckpt") as e:
        check_output_dir(killed, None, overwrite=False)
    assert "last.ckpt" not in str(e.value) and "skip_if_done" not in str(e.value)


# -- 5. progress lines, records left alone ----------------------------------------------------------------------
def test_with_bars_off_a_run_prints_a_line_at_least_every_tenth_of_its_steps(tiny_run):
    import re

    _, run = tiny_run  # TINY_RUN: 24 steps, trainer.progress_bar=false
    steps = [int(m) for m in re.findall(r"\[lnfree\] progress: step (\d+)/24 ", (run / "train.log").read_text())]
    assert steps[-1] == 24 and max(b - a for a, b in zip([0, *steps], steps)) <= 24 // 10 + 1


def test_an_evaluation_that_reproduces_its_record_leaves_it_untouched(tmp_path, capsys):
    from omegaconf import OmegaConf

    from lnfree.analysis.metrics import summarize
    from lnfree.analysis.tables import REPRO_TOL, write_outputs

    cfg = OmegaConf.create({"models": [{"name": "a", "path": str(tmp_path / "nowhere")}]})
    g = torch.Generator().manual_seed(0)
    per_token = {("d", "a"): {"ce": torch.rand(8, 31, generator=g).numpy() * 5,
                              "entropy": torch.rand(8, 31, generator=g).numpy(),
                              "correct": (torch.rand(8, 31, generator=g) > 0.7).float().numpy(),
                              "maxprob": torch.rand(8, 31, generator=g).numpy()}}
    results = {"d": {"a": summarize(per_token[("d", "a")], 50, 0)}}
    out = tmp_path / "eval"
    out.mkdir()
    write_outputs(results, per_token, cfg, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    noisy = {"d": {"a": {**results["d"]["a"], "mean": results["d"]["a"]["mean"] + REPRO_TOL / 10}}}
    write_outputs(noisy, per_token, cfg, out)
    assert "reproduces the record" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert json.loads((out / "results.json").read_text())["results"] == results
    moved = {"d": {"a": {**results["d"]["a"], "mean": results["d"]["a"]["mean"] + 10 * REPRO_TOL}}}
    write_outputs(moved, per_token, cfg, out)
    assert json.loads((out / "results.json").read_text())["results"] == moved


# -- 7. the published LN-free checkpoints' form; python -m lnfree.eval <dir> -------------------------------------
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
    from lnfree.io import resolve

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


def test_eval_with_a_path_answers_with_the_form_that_works(tmp_path):
    from hydra import compose, initialize_config_dir

    from lnfree.analysis.evaluate import positional_hint

    hint = positional_hint(["outputs/my run"])
    assert "python -m lnfree.eval" in hint
    override = hint.split('python -m lnfree.eval "')[1].split('"')[0]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[override])
    assert [m.path for m in cfg.models] == ["outputs/my run"]
    assert positional_hint(["--config-name", "eval_llama", "runs=x"]) is None
