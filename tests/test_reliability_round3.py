"""Reliability, third round (issue 40, items 5-8): sweeps that outlive a bad job, exports that refuse an edited
record and never lose a valid form, model options refused before compute or exported exactly, and one clear line
for damaged records, odd paths, FIFOs, unwritable dirs and unknown folded models. Records and the eval/analysis
CLIs: tests/test_records.py."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_RUN, calibrated_all_removed, compose_train, copy_export, ids
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from lnfree import load, resolve
from lnfree.errors import JOB_FAILURES
from lnfree.export import export_folded, export_hf
from lnfree.families import UnsupportedFamily
from lnfree.io import EXPORT_INFO, ModelIOError, record_text
from lnfree.records import RecordError
from lnfree.training.sweep_table import SweepTable, write_sweep_table

TINY_SWEEP = ["model=tiny", "model.dropout=0.0", "schedule=none", "data=builtin", "data.block_size=64",
              "data.val_blocks=2", "hardware=cpu", "hardware.precision=32-true", "hardware.micro_batch_size=2",
              "trainer.max_steps=2", "trainer.val_every=2", "trainer.ckpt_every=2", "trainer.progress_bar=false",
              "logger=csv", "optim.warmup_steps=1", "export=false"]


# -- item 5: a sweep outlives a bad job ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_bad_value_in_the_middle_of_a_sweep_fails_that_job_alone(tmp_path):
    """The issue's sweep: optim.lr=6e-4,-1,3e-4. The bad job is listed as failed with its message, the later
    valid job still runs, and the sweep exits 2."""
    out = subprocess.run([sys.executable, "-m", "lnfree.train", "-m", *TINY_SWEEP, "optim.lr=6e-4,-1,3e-4",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [r["status"] for r in rows] == ["finished", "failed", "finished"]
    assert "optim.lr=-1" in rows[1]["overrides"] and "optim.lr" in rows[1]["error"] and "> 0" in rows[1]["error"]
    assert "failed" in (tmp_path / "sweep" / "results.md").read_text()
    assert "Traceback" not in out.stderr and "1 job(s) of the sweep failed" in out.stderr


def _job(sweep, name, overrides):
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_the_sweep_table_lists_failed_jobs_and_unreadable_summaries_and_the_sweep_exits_2(tiny_run, tmp_path):
    import shutil

    _, run = tiny_run
    sweep = tmp_path / "sweep"
    _job(sweep, "0", ["seed=1"])
    shutil.copy(run / "summary.json", sweep / "0" / "summary.json")
    (sweep / "1").mkdir(parents=True)  # refused before it held its dir: no .hydra/, only the failure record
    (sweep / JOB_FAILURES).mkdir()
    (sweep / JOB_FAILURES / "1.json").write_text(json.dumps(
        {"job": "1", "error": "LimitError: optim.lr=-1.0 (must be > 0)", "overrides": ["seed=2"]}))
    _job(sweep, "2", ["seed=3"])
    (sweep / "2" / "summary.json").write_text((run / "summary.json").read_text()[:300])  # half-written
    md, path = write_sweep_table(sweep)
    rows = list(csv.DictReader(open(path)))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "finished"), ("1", "failed"), ("2", "bad summary")]
    assert rows[1]["overrides"] == "seed=2" and rows[1]["error"].startswith("LimitError: optim.lr=-1.0")
    assert "2/summary.json:" in rows[2]["error"] and "not valid JSON" in rows[2]["error"]
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as e:
        SweepTable().on_multirun_end(config)
    assert e.value.code == 2


# -- item 6: exports ---------------------------------------------------------------------------------------
def _edit_row(f, name, row):
    w = load_file(f)
    w[name][row] += 1.0
    save_file(w, f, metadata={"format": "pt"})


def test_the_folded_fingerprint_covers_every_embedding_row(tiny_run, tmp_path):
    """Even with the whole-file hashes gone (and the older-export argument given), an embedding row that no
    fingerprint id reads is caught by the fingerprint's embedding hashes."""
    folded = copy_export(tiny_run, tmp_path, "folded")
    record = json.loads((folded / EXPORT_INFO).read_text())
    row = next(i for i in range(4096) if i not in set(record["fingerprint"]["ids"]))
    del record["files"]
    (folded / EXPORT_INFO).write_text(record_text(record))
    with pytest.warns(UserWarning, match="predates whole-file hashes"):
        load(str(folded), unhashed_ok=True)  # untouched: loads
    _edit_row(folded / "folded.safetensors", "wte.weight", row)
    with pytest.raises(ModelIOError, match=r"\['wte'\] differ from the record's hashes"):
        with pytest.warns(UserWarning):
            load(str(folded), unhashed_ok=True)


def test_a_failed_export_form_leaves_the_other_valid_one(tmp_path, monkeypatch):
    from lnfree.errors import ExportError
    from lnfree.training import train as train_module

    _, model = calibrated_all_removed()

    def broken(*args, **kwargs):
        raise ExportError("folded export differs from the model")

    monkeypatch.setattr(train_module, "export_folded", broken)  # the only way to make a verified export fail
    exports, error = train_module._export(model, None, tmp_path, SimpleNamespace(val_data=ids(4, 32)))
    assert set(exports) == {"hf"} and "folded export: ExportError" in error
    assert (tmp_path / "export" / "hf" / EXPORT_INFO).exists() and not (tmp_path / "export" / "folded").exists()
    assert load(str(tmp_path / "export" / "hf"))[0] is not None


# -- item 7: model options refused before compute, or exported exactly ----------------------------------------
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
    from lnfree.training.train import check_config

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


# -- item 8: paths and records ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a,b", "runs/ünïcode", "it's here", "sp ace=x"])
def test_the_resume_command_runs_as_printed_for_any_path(tmp_path, name):
    """Split as the shell does, each override parses in Hydra to exactly the path (a comma would make a sweep,
    a non-ASCII letter or a quote would not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lnfree.training.safety import resume_command

    out = tmp_path / name
    cmd = resume_command(out, out / "checkpoints" / "last.ckpt")
    parser = OverridesParser.create()
    parsed = {o.key_or_group: o for o in parser.parse_overrides(shlex.split(cmd)[3:])}
    assert parsed["hydra.run.dir"].value() == str(out.resolve())
    assert parsed["ckpt_path"].value() == str((out / "checkpoints" / "last.ckpt").resolve())
    assert not parsed["hydra.run.dir"].is_sweep_override()


def test_a_fifo_in_data_files_is_refused_in_one_line(tmp_path):
    from lnfree.data.streams import DataError, open_stream

    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "hello there"}\n')
    os.mkfifo(tmp_path / "b.jsonl")  # reading it would block forever
    with pytest.raises(DataError, match=r"b\.jsonl.*not regular files \(a FIFO"):
        open_stream("files", "train", files=[str(tmp_path / "*.jsonl")])


def test_an_unwritable_run_dir_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "a_file").write_text("x")
    run_dir = tmp_path / "a_file" / "run"
    out = subprocess.run([sys.executable, "-m", "lnfree.train", *TINY_RUN, f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "cannot write the run dir" in out.stderr and "a_file is not a directory" in out.stderr


def test_a_folded_config_of_an_unknown_model_type_is_refused_before_loading(tiny_run, tmp_path):
    folded = copy_export(tiny_run, tmp_path, "folded")
    (folded / "folded_config.json").write_text(json.dumps({"hf_config": {"model_type": "mamba"}, "identity": [],
                                                           "lm_head_bias": True}))
    with pytest.raises(ModelIOError, match="model_type='mamba'.*supported"):
        resolve(str(folded))


def test_a_folder_named_like_a_temporary_file_is_not_refused(tiny_run, tmp_path):
    for folder in ("job.tmp", ".cache.tmp"):  # a user's folders, not one of the run's own temp files
        hf = copy_export(tiny_run, tmp_path / folder)
        assert resolve(str(hf)).kind == "hf_lnfree"


def test_skip_if_done_on_a_half_written_summary_names_the_file(tiny_run, tmp_path):
    import shutil

    from lnfree.training.train import train

    _, run = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    (dst / "summary.json").write_text((run / "summary.json").read_text()[:500])
    with pytest.raises(RecordError, match=r"summary.json:\d+: not valid JSON"):
        train(compose_train(dst, *TINY_RUN, "skip_if_done=true"))
