"""Training runs (lnfree/training/run.py) on the tiny configs: every config option composes, runs remove every
site and export, resume exactly, log, refuse bad inputs before compute, and print progress lines with bars off.
Resume checks: tests/test_resume.py; sweeps: tests/test_sweeps.py."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_RUN, compose_train, save_own_gpt2, train_until_crash
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from lnfree.data.streams import DataError
from lnfree.errors import ModelIOError
from lnfree.io import read_checkpoint
from lnfree.schedule import ScheduleError, build_events
from lnfree.training.callbacks import LNRemovalCallback
from lnfree.training.hardware import HardwareError, grad_accumulation, make_strategy
from lnfree.training.run import ConfigError, train

GROUPS = ["model", "schedule", "data", "hardware", "logger", "optim", "trainer", "paths", "experiment", "finetune"]
PAPER = {  # experiment -> (n_layer, lnf step, max_steps) from the paper's published schedules (Baroni et al. 2025)
    "gpt2_small_paper": (12, 104, 300), "gpt2_medium_paper": (24, 188, 500),
    "gpt2_large_paper": (36, 534, 600), "gpt2_xl_paper": (48, 722, 800),
}


def options(group):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes(tmp_path, group, option):
    extra = ["data.files=[x.jsonl]"] if option == "local_text" else []
    cfg = compose_train(tmp_path, f"{group}={option}", *extra)
    OmegaConf.to_container(cfg.schedule, resolve=True)
    OmegaConf.to_container(cfg.data, resolve=True)
    assert cfg.data.micro_batch_size == cfg.hardware.micro_batch_size
    build_events(cfg.schedule, 12, cfg.trainer.max_steps)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_experiments_reproduce_published_schedules(tmp_path, name):
    n_layer, lnf, max_steps = PAPER[name]
    cfg = compose_train(tmp_path, f"experiment={name}")
    events = build_events(cfg.schedule, n_layer)
    assert events[-1].name == "final" and events[-1].step == lnf
    assert cfg.trainer.max_steps == max_steps and events[-1].step < max_steps
    # ~2^19 tokens per optimizer step from the hardware's micro-batch, by accumulation
    accum = grad_accumulation(cfg.optim.tokens_per_step, cfg.data.micro_batch_size, cfg.data.block_size, 1)
    assert accum * cfg.data.micro_batch_size * 1024 == 2**19


def _set_keys(node, prefix=""):
    """(dotted key, value) for every leaf an experiment file sets, its defaults list and hydra settings aside."""
    for k, v in node.items():
        if not prefix and k in ("defaults", "hydra"):
            continue
        if isinstance(v, dict):
            yield from _set_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs_apply_every_key_they_set(tmp_path, name):
    """An experiment's own values win over train.yaml's and the groups' (a sweep of it writes where it says,
    exports and skips as it says), and every group it overrides is the one the job gets."""
    from hydra import compose, initialize_config_dir

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    keys = dict(_set_keys(raw))
    assert keys, f"experiment {name} sets no key"
    for key, value in keys.items():
        assert OmegaConf.select(cfg, key) == value, f"experiment={name} sets {key}={value!r}, the job sees " \
                                                    f"{OmegaConf.select(cfg, key)!r}"
    for entry in raw["defaults"]:
        (group, option), = entry.items()
        group = group.removeprefix("override /")
        chosen = cfg.hydra.runtime.choices[group]
        assert chosen == option, f"experiment={name} asks {group}={option}, the job has {chosen}"


def test_typos_and_unknown_options_fail_at_compose(tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose_train(tmp_path, "trainer.max_step=5")
    with pytest.raises(ConfigCompositionException):
        compose_train(tmp_path, "trainer.max_steps=abc")
    for group in ("model", "schedule", "data"):
        with pytest.raises(MissingConfigException, match=f"{group}/nope"):
            compose_train(tmp_path, f"{group}=nope")


def test_fsdp_is_fsdp2_on_gpus_and_cpu_processes_with_fp32_master_weights(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lnfree.training.module import fsdp_policy

    gpu = make_strategy(compose_train(tmp_path, "hardware=gpu_fsdp", "hardware.devices=4").hardware)
    cpu = make_strategy(compose_train(tmp_path, "hardware=cpu_fsdp").hardware)
    assert isinstance(gpu, ModelParallelStrategy) and isinstance(cpu, ModelParallelStrategy)  # one code path
    assert (gpu._data_parallel_size, cpu._data_parallel_size) == (4, 2)
    assert cpu._process_group_backend == "gloo" and gpu._process_group_backend is None
    mp = fsdp_policy("bf16-mixed")
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)  # fp32 master weights + reduction
    assert fsdp_policy("32-true") is None
    with pytest.raises(HardwareError, match="not a multiple"):
        grad_accumulation(1000, 4, 64, 1)


def test_end_to_end_tiny_run_removes_everything_and_exports(tiny_run):
    summary, tmp_path = tiny_run
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["all_removed"] and len(saved["removed_sites"]) == 7
    assert [e["site"] for e in saved["events"]] == ["ln2.0", "ln2.1", "ln1qk.0", "ln1qk.1", "ln1v.0",
                                                    "ln1v.1", "lnf"]
    assert all(e["sigma"] > 0 for e in saved["events"])
    assert saved["val_ce"] < saved["val_ce_before"]  # it trained
    assert saved["tokens_seen"] == 24 * 4 * 64
    assert summary["val_ce"] == saved["val_ce"]
    assert saved["exports"]["hf"]["relative_error"] <= 1e-4
    assert saved["exports"]["folded"]["relative_error"] <= 1e-5
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export" / "hf")
    assert hf.config.layer_norm_epsilon == 1e12
    assert (tmp_path / "export" / "folded" / "folded.safetensors").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "checkpoints" / "step000012.ckpt").exists()
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "lnfree/sigma/lnf" in metrics and "val/ce" in metrics and "train/aux" in metrics


@pytest.mark.slow
def test_resume_mid_schedule_matches_uninterrupted_run(tmp_path, monkeypatch, tiny_run):
    full, _ = tiny_run
    ckpt = train_until_crash(compose_train(tmp_path / "part", *TINY_RUN), monkeypatch, step=12)
    assert ckpt.exists()
    state = read_checkpoint(ckpt)
    assert state["global_step"] == 12
    done = [a["site"] for a in state["callbacks"]["LNRemovalCallback"]["applied"]]
    assert done == ["ln2.0", "ln2.1", "ln1qk.0", "ln1qk.1", "ln1v.0"]  # mid-schedule

    resumed = train(compose_train(tmp_path / "part", *TINY_RUN, f"ckpt_path={ckpt}"))
    assert [(e["site"], e["step"]) for e in resumed["events"]] == [(e["site"], e["step"]) for e in full["events"]]
    assert resumed["sigmas"] == pytest.approx(full["sigmas"], rel=1e-5)
    assert resumed["val_ce"] == pytest.approx(full["val_ce"], abs=1e-4)


def test_callback_is_idempotent(tmp_path):
    from types import SimpleNamespace

    from conftest import tiny_config

    from lnfree.model import make_removable

    model = make_removable(tiny_config())
    model.calibrate(torch.randint(0, 97, (2, 16)))
    cb = LNRemovalCallback(build_events({"pre_mlp": {"start": 0, "gap": 1}, "attn_qk": {"gap": 1},
                                         "attn_v": {"gap": 1}, "final": {}}, 2), momentum=0.9)
    trainer = SimpleNamespace(global_step=3, loggers=[])
    module = SimpleNamespace(model=model)
    first = cb.apply_due(trainer, module)  # steps 0..3 all due at once (as after a resume)
    assert [r["site"] for r in first] == ["ln2.0", "ln2.1", "ln1qk.0", "ln1qk.1"]
    assert cb.apply_due(trainer, module) == []
    sig = model.sigmas()
    trainer.global_step = 10
    second = cb.apply_due(trainer, module)
    assert [r["site"] for r in second] == ["ln1v.0", "ln1v.1", "lnf"]
    assert {k: v for k, v in model.sigmas().items() if sig[k] is not None} == {k: v for k, v in sig.items() if v}


@pytest.mark.slow
def test_offline_wandb_run_writes_run_files_name_and_artifacts(tmp_path):
    cfg = compose_train(tmp_path, *TINY_RUN, "logger=wandb", "logger.mode=offline", "seed=7")
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    import time

    import wandb

    assert wandb.run is None  # train() ended the run it started
    name = "tiny-builtin-s7"  # model-schedule-seed (+ the overrides of the run that are not those)
    deadline = time.time() + 120  # wandb's service process may still be writing the run's log after finish()
    while True:
        log = next(runs[0].glob("*.wandb")).read_bytes()
        if b"-export" in log or time.time() > deadline:
            break
        time.sleep(1)
    assert name.encode() in log
    for artifact in (b"-summary", b"-export"):  # summary.json and the exports, logged as artifacts
        assert artifact in log
    assert b"trainer/epoch" in log and b"train/lr" in log  # every metric namespaced


def test_metrics_are_namespaced_and_run_names_say_what_the_run_is(tiny_run):
    import csv

    from lnfree.training.loggers import run_name

    _, run = tiny_run
    header = next(csv.reader((run / "csv" / "metrics.csv").open()))
    assert "train/lr" in header and "trainer/epoch" in header
    assert [h for h in header if "/" not in h] == ["step"]
    assert run_name("gpt2_medium", "fast", 3) == "gpt2_medium-fast-s3"
    assert run_name("builtin_w128", "none", 1, "lora", "trainer.max_steps=64") == \
        "builtin_w128-none-lora-s1-trainer.max_steps=64"


@pytest.mark.slow
def test_progress_bar_counts_optimizer_steps_to_max_steps(tmp_path, capfd):
    train(compose_train(tmp_path, *TINY_RUN, "trainer.progress_bar=true", "export=false",
                        "optim.tokens_per_step=512"))  # 2 micro-batches per optimizer step
    cap = capfd.readouterr()
    err = (cap.out + cap.err).replace("\r", "\n")
    lines = [line for line in err.splitlines() if line.startswith("train (steps)")]
    assert lines and "24/24" in lines[-1] and "removed=7/7" in lines[-1] and "tok/s=" in lines[-1]
    assert "Epoch 0/-2" not in err and "/48 " not in err  # steps, not micro-batches


@pytest.mark.parametrize("overrides,error,match", [
    (["model=gpt2"], ModelIOError, "offline"),
    (["data.block_size=512"], ConfigError, "exceeds the model's context"),
    (["trainer.max_steps=10"], ScheduleError, "max_steps=10"),
    (["data=local_text", "data.files=[/nonexistent/*.jsonl]"], DataError, "matched no file"),
    (["optim.tokens_per_step=1000"], HardwareError, "not a multiple"),
    (["ckpt_path=/nonexistent.ckpt"], ConfigError, "does not exist"),
])
def test_bad_inputs_rejected_before_compute(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train(compose_train(tmp_path, *TINY_RUN, *overrides))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("model", ["builtin_w48", "tiny"])  # a shipped model dir; random init
def test_a_run_resolves_its_model_reference_once_and_loads_what_was_checked(tmp_path, monkeypatch, model):
    import lnfree.io as io
    import lnfree.training.model_source as model_source
    from lnfree.training.run import check_config

    seen = []

    def counting(reference, *a, **k):
        seen.append(reference)
        return resolve(reference, *a, **k)

    resolve = io.resolve
    monkeypatch.setattr(io, "resolve", counting)
    monkeypatch.setattr(model_source, "resolve", counting)
    cfg = compose_train(tmp_path, *TINY_RUN, f"model={model}")
    plan = check_config(cfg)
    loaded = model_source.load_model(plan.source, cfg.model)
    assert seen == [cfg.model.source]  # io's other functions were handed the resolved reference, never the string
    assert loaded.config.n_layer == plan.source.config.n_layer and loaded.training
    assert loaded.config.vocab_size == plan.source.config.vocab_size == len(plan.source.tokenizer)


def test_dataset_without_text_field_rejected(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"body": f"doc {i} " * 50}) + "\n" for i in range(5)))
    with pytest.raises(DataError, match="no field 'text'"):
        train(compose_train(tmp_path, *TINY_RUN, "data=local_text", f"data.files=[{f}]", "data.block_size=64"))


@pytest.mark.slow
def test_multirun_runs_one_job_per_schedule(tmp_path):
    args = [a for a in TINY_RUN if not a.startswith("schedule=")]
    cmd = [sys.executable, "-m", "lnfree.train", "-m", "schedule=none,fast", *args, "trainer.max_steps=20",
           f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    by_schedule = {json.loads(p.read_text())["config"]["schedule"]["name"]: json.loads(p.read_text())
                   for p in summaries}
    assert by_schedule["none"]["removed_sites"] == [] and by_schedule["fast"]["all_removed"]


@pytest.mark.slow
def test_seed_sets_the_data_order_and_the_same_seed_reproduces_a_run(tmp_path, tiny_run):
    from lnfree.data import corpus
    from lnfree.training.config import data_module

    def first_batch(seed):
        dm = data_module(corpus.load_tokenizer(), "builtin", block_size=64, micro_batch_size=4, val_blocks=2,
                         shuffle_buffer=64, seed=seed)
        dm.setup()
        return dm.calibration_batch()

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))
    summary, _ = tiny_run  # seed 1234
    again = train(compose_train(tmp_path / "again", *TINY_RUN))
    assert again["val_ce"] == summary["val_ce"] and again["sigmas"] == summary["sigmas"]
    other = train(compose_train(tmp_path / "other", *TINY_RUN, "seed=7"))
    assert other["val_ce"] != summary["val_ce"]


@pytest.mark.slow
def test_compiled_forward_equals_eager_before_and_after_removal():
    """model.compile=true: the module's compiled forward gives the eager logits with every site real, and again
    after every site is removed (a removal event recompiles); checkpoints keep the plain parameter names."""
    from conftest import remove_all, stock_and_removable

    from lnfree.training.module import LNFreeModule

    _, model = stock_and_removable()
    x = torch.randint(0, 97, (2, 32))
    model.calibrate(x)
    module = LNFreeModule(model, optim=None, compile=True).eval()
    with torch.no_grad():
        assert torch.allclose(module(x), model(input_ids=x).logits, atol=1e-5)
        remove_all(model)
        assert torch.allclose(module(x), model(input_ids=x).logits, atol=1e-5)
    assert module._compiled and all(not k.startswith("_orig_mod") for k in module.state_dict())


def test_push_to_hub_fails_fast_before_any_compute(tmp_path, monkeypatch):
    import time

    from lnfree.hub import HubPushError

    t0 = time.time()
    with pytest.raises(HubPushError, match="offline"):  # the tests run with HF_HUB_OFFLINE=1
        train(compose_train(tmp_path, *TINY_RUN, "push_to_hub=someone/lnfree-tiny"))
    with pytest.raises(HubPushError, match="expected <user"):
        train(compose_train(tmp_path, *TINY_RUN, "push_to_hub=no-slash"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(HubPushError, match="does not answer"):
        train(compose_train(tmp_path, *TINY_RUN, "push_to_hub=someone/lnfree-tiny"))
    with pytest.raises(ConfigError, match="export=true"):
        train(compose_train(tmp_path, *TINY_RUN, "push_to_hub=someone/lnfree-tiny", "export=false"))
    assert time.time() - t0 < 30 and not (tmp_path / "checkpoints").exists()


def test_a_run_logs_its_console_to_train_log_and_ends_naming_its_results(tiny_run):
    summary, run = tiny_run
    lines = (run / "train.log").read_text().splitlines()
    assert lines[0].startswith("[lnfree] writing to")
    events = [ln for ln in lines if ln.startswith("[lnfree] step ")]
    assert len(events) == len(summary["events"]) and all(ln.endswith("sites removed)") for ln in events)
    assert not any("\r" in ln or "\x1b" in ln for ln in lines)  # the bar's redraws are not in the log
    last = lines[-1]
    assert last.startswith("[lnfree] done:")
    for part in (run / "summary.json", run / "export" / "hf", run / "export" / "folded"):
        assert str(part) in last
    assert (run / "training_curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_headline_command_without_the_hub_fails_fast_and_clearly(tmp_path):
    """No network (an endpoint that refuses): one ModelIOError naming model.source and the ways forward, exit
    status 2, no traceback, no run dir, in seconds rather than huggingface_hub's retries."""
    import os
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    run = tmp_path / "run"
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "lnfree.train", "model=gpt2_medium", "schedule=fast",
                          f"hydra.run.dir={run}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    elapsed = time.time() - t0
    assert out.returncode == 2, out.stderr
    assert "ModelIOError" in out.stderr and "model.source='gpt2-medium'" in out.stderr
    assert "model.source=/path/to/dir" in out.stderr and "gpt2_medium_random" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not run.exists()
    assert elapsed < 40, f"took {elapsed:.0f} s"  # about 8 s on an idle 2-core machine, imports included


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only the user's errors lose their traceback (and the job dir Hydra made for them, when it holds nothing
    else); anything else is raised as it is."""
    from hydra.core.hydra_config import HydraConfig

    from lnfree.errors import UserError, remove_unused_dir, user_errors_as_messages

    with pytest.raises(KeyError):
        with user_errors_as_messages():
            raise KeyError("a bug")
    with pytest.raises(SystemExit) as e:
        with user_errors_as_messages():
            raise UserError("bad value")
    assert e.value.code == 2 and not HydraConfig.initialized()
    (tmp_path / "x" / ".hydra").mkdir(parents=True)
    remove_unused_dir(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "summary.json").write_text("{}")  # another run's dir is never removed
    remove_unused_dir(tmp_path / "y")
    assert (tmp_path / "y" / "summary.json").exists()


@pytest.mark.slow
def test_keep_at_end_frees_the_checkpoints_of_a_finished_run(tmp_path, capsys):
    """trainer.keep_at_end=none keeps only the exports (which hold the final weights), =last only last.ckpt;
    keeping no weights at all is refused before compute; the run says what a checkpoint costs."""
    from lnfree.io import load
    from lnfree.training.config import LimitError
    from lnfree.training.run import apply_keep_at_end

    summary = train(compose_train(tmp_path, *TINY_RUN, "trainer.keep_at_end=none"))
    assert not (tmp_path / "checkpoints").exists() and summary["all_removed"]
    assert load(str(tmp_path / "export" / "folded"))[0] is not None
    printed = capsys.readouterr().out
    assert "each checkpoint about 4.5 MB" in printed  # 378,624 parameters x (4 + 8) bytes
    assert "trainer.keep_at_end=none: removed" in printed
    ckpts = tmp_path / "c"
    ckpts.mkdir()
    for name in ("step000012.ckpt", "step000024.ckpt", "last.ckpt"):
        (ckpts / name).write_bytes(b"x" * 10)
    apply_keep_at_end(ckpts, "last")
    assert [f.name for f in ckpts.iterdir()] == ["last.ckpt"]
    apply_keep_at_end(ckpts, "all")
    assert [f.name for f in ckpts.iterdir()] == ["last.ckpt"]
    with pytest.raises(LimitError, match="no weights at all"):
        train(compose_train(tmp_path / "x", *TINY_RUN, "trainer.keep_at_end=none", "export=false"))
    with pytest.raises(LimitError, match="keep_at_end='some'"):
        train(compose_train(tmp_path / "x", *TINY_RUN, "trainer.keep_at_end=some"))


def _own_gpt2(d, vocab_size=512):
    """A user's own GPT-2 dir: 3 layers, its own BPE (trained here on the built-in text), as save_pretrained
    writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lnfree.data import corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [t for t, _ in zip(corpus.iter_texts("train"), range(200))]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    return save_own_gpt2(d, tok, n_layer=3)


@pytest.mark.slow
def test_your_own_gpt2_and_data_by_the_documented_quick_path(tmp_path):
    """docs/reference/training.md "Your own model and data": model.source=<dir> with the default model group uses
    the dir's own tokenizer (a custom 512-token BPE here; the built-in one has 4,096), on the user's .jsonl, in a
    short run."""
    from conftest import docs_file

    model_dir = _own_gpt2(tmp_path / "my_gpt2")
    data = docs_file(tmp_path, n=40)
    run = tmp_path / "run"
    summary = train(compose_train(run, f"model.source={model_dir}", "data=local_text", f"data.files=[{data}]",
                                  "data.block_size=64", "data.val_blocks=2", "hardware.micro_batch_size=4",
                                  "trainer.max_steps=10", "trainer.val_every=10", "trainer.ckpt_every=10",
                                  "schedule.fit_fraction=0.5", "trainer.progress_bar=false"))
    assert summary["all_removed"] and len(summary["removed_sites"]) == 10  # 3 blocks x 3 + ln_f
    assert max(e["step"] for e in summary["events"]) <= 5
    from lnfree.io import load

    model, tok = load(str(run / "export" / "hf"))
    assert len(tok) == model.config.vocab_size == 512


def test_with_bars_off_a_run_prints_a_line_at_least_every_tenth_of_its_steps(tiny_run):
    import re

    _, run = tiny_run  # TINY_RUN: 24 steps, trainer.progress_bar=false
    steps = [int(m) for m in re.findall(r"\[lnfree\] progress: step (\d+)/24 ", (run / "train.log").read_text())]
    assert steps[-1] == 24 and max(b - a for a, b in zip([0, *steps], steps)) <= 24 // 10 + 1
