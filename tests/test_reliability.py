"""Reliability, second round: exports verified whole, tokenizer and model checked together, exit codes that tell
the truth, one run per directory, no half-written leftovers, clear errors before compute. One test per case of
the review that found them; all offline, on the tiny configs."""

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    ROOT,
    TINY_RUN,
    calibrated_all_removed,
    compose_train,
    copy_export,
    eval_cfg,
    rehash,
    tiny_config,
    write_lock,
)
from safetensors.torch import load_file, save_file

from lnfree import load, resolve
from lnfree.data import corpus
from lnfree.data.streams import DataError, open_stream
from lnfree.io import EXPORT_INFO, ModelIOError
from lnfree.training import safety
from lnfree.training.callbacks import LNRemovalCallback
from lnfree.training.config import LimitError
from lnfree.training.safety import LOCK_FILE, RunDirError, RunInterrupted
from lnfree.training.train import train


def small_tokenizer(d, n=44):
    """A tokenizer of another vocabulary: n words, end-of-text = id 0 (as the built-in one)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>"] + [f"w{i}" for i in range(n - 1)]
    t = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    t.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token=words[0], bos_token=words[0])
    tok.save_pretrained(d)
    return tok


def edit_tensor(f, name, row):
    w = load_file(f)
    w[name][row] += 1.0
    save_file(w, f, metadata={"format": "pt"})


# -- 1. exports verified whole ---------------------------------------------------------------------------
def test_edit_outside_the_fingerprint_is_refused_naming_the_file(tiny_run, tmp_path):
    """The fingerprint sees token ids at positions 0-31 only; the file hashes see everything else."""
    hf = copy_export(tiny_run, tmp_path)
    edit_tensor(hf / "model.safetensors", "transformer.wpe.weight", 40)  # a position the fingerprint never reaches
    with pytest.raises(ModelIOError, match=r"model\.safetensors is not the file that was exported"):
        load(str(hf))
    folded = copy_export(tiny_run, tmp_path, "folded")
    seen = set(json.loads((folded / EXPORT_INFO).read_text())["fingerprint"]["ids"])
    row = next(i for i in range(4096) if i not in seen)  # folded wte is untied: a row no fingerprint id reads
    edit_tensor(folded / "folded.safetensors", "wte.weight", row)
    with pytest.raises(ModelIOError, match=r"folded\.safetensors is not the file that was exported"):
        load(str(folded))


def test_tokenizer_of_another_vocabulary_beside_an_export_is_refused(tiny_run, tmp_path):
    hf = copy_export(tiny_run, tmp_path)
    for f in hf.glob("tokenizer*"):
        f.unlink()
    small_tokenizer(hf)
    with pytest.raises(ModelIOError, match=r"tokenizer(_config)?\.json is not the file that was exported"):
        load(str(hf))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_weights_are_named(tiny_run, tmp_path, damage):
    """In an export (its hash differs) and in a plain HF dir without a record (its header does not parse)."""
    from transformers import GPT2LMHeadModel

    plain = tmp_path / "plain"
    GPT2LMHeadModel(tiny_config()).save_pretrained(plain)
    for d in (copy_export(tiny_run, tmp_path), plain):
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
        with pytest.raises(ModelIOError, match=r"model\.safetensors (is damaged|is not the file that was exported)"):
            load(str(d))


def test_builtin_models_are_checked_whole_too(tmp_path):
    from lnfree.io import file_sha256, model_file
    from lnfree.paths import SHIPPED_DIR

    shipped = sorted(p for p in SHIPPED_DIR.iterdir() if (p / EXPORT_INFO).exists())
    assert shipped
    for d in shipped:  # every weights and tokenizer file recorded, and the record holds for the files as shipped
        record = json.loads((d / EXPORT_INFO).read_text())
        files = record["files"]
        assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(files), d
        # (tokenizer.json: the built-in tokenizer's, which the shipped models share)
        assert all(file_sha256(model_file(d, name, record)) == digest for name, digest in files.items()), d
    copy = tmp_path / "w48"
    shutil.copytree(SHIPPED_DIR / "w48", copy)
    load(str(copy))  # as shipped: loads
    edit_tensor(copy / "model.safetensors", "transformer.wpe.weight", 100)
    with pytest.raises(ModelIOError, match=r"model\.safetensors"):
        load(str(copy))


def test_a_record_without_hashes_is_refused_unless_asked_for(tiny_run, tmp_path):
    """A record whose "files" were deleted (weights edited outside the fingerprint's 32 ids would pass) is refused;
    unhashed_ok=True loads an export from before file hashes on its fingerprint, with a warning that says so."""
    from lnfree.io import record_text

    hf = copy_export(tiny_run, tmp_path)
    record = json.loads((hf / EXPORT_INFO).read_text())
    del record["files"]
    (hf / EXPORT_INFO).write_text(record_text(record))
    with pytest.raises(ModelIOError, match="no whole-file hashes"):
        load(str(hf))
    with pytest.warns(UserWarning, match="predates whole-file hashes"):
        model, _ = load(str(hf), unhashed_ok=True)
    assert model is not None


def test_nothing_loads_from_a_temporary_name(tiny_run, tmp_path):
    from lnfree.training.safety import ResumeError

    _, run = tiny_run
    half = tmp_path / "run" / ".export.tmp" / "hf"
    shutil.copytree(run / "export" / "hf", half)
    with pytest.raises(ModelIOError, match="temporary name"):
        resolve(str(half))
    ckpt = tmp_path / "run" / "checkpoints" / ".step000012.ckpt.tmp-4242"  # a checkpoint still being written
    ckpt.parent.mkdir()
    shutil.copy(run / "checkpoints" / "step000012.ckpt", ckpt)
    with pytest.raises(ResumeError, match="temporary name"):
        train(compose_train(tmp_path / "run", *TINY_RUN, f"ckpt_path={ckpt}"))


# -- 2. tokenizer and model checked together -------------------------------------------------------------
def test_training_with_a_tokenizer_of_another_vocabulary_is_refused_before_compute(tmp_path, monkeypatch):
    import lnfree.training.train as tr

    small_tokenizer(tmp_path / "tok44")
    monkeypatch.setattr(tr, "load_model", lambda *a, **k: pytest.fail("the model's weights were loaded"))
    with pytest.raises(ModelIOError, match=r"44 tokens but the model's vocabulary has 4096|not the one recorded"):
        train(compose_train(tmp_path / "run", *[o for o in TINY_RUN if not o.startswith("model=")], "model=builtin_w48",
                            f"model.tokenizer={tmp_path / 'tok44'}", "trainer.max_steps=2"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_with_a_model_smaller_than_the_tokenizer_is_a_clear_error(tmp_path):
    from transformers import GPT2LMHeadModel

    from lnfree.analysis.evaluate import evaluate

    GPT2LMHeadModel(tiny_config()).save_pretrained(tmp_path / "v97")  # vocab 97, no tokenizer of its own
    cfg = eval_cfg(tmp_path, [{"name": "small", "path": str(tmp_path / "v97")}], [{"name": "d", "source": "builtin"}],
                   tokenizer=str(corpus.TOKENIZER_DIR))
    with pytest.raises(ModelIOError, match=r"model 'small'.*ids up to 4095 but the model has vocab_size=97"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


def test_a_swapped_tokenizer_is_refused_by_its_recorded_identity(tiny_run, tmp_path):
    """Even with the file hashes rewritten to match, the record's tokenizer_sha256 names the one that belongs."""
    hf = copy_export(tiny_run, tmp_path)
    for f in hf.glob("tokenizer*"):
        f.unlink()
    small_tokenizer(hf, n=4096)  # as many tokens as the model's vocabulary: the size alone cannot tell
    rehash(hf)
    with pytest.raises(ModelIOError, match="not the one recorded with the model"):
        load(str(hf))


def test_check_tokenizer_rule():
    from transformers import GPT2Config

    from lnfree.io import check_tokenizer, tokenizer_sha256

    tok = corpus.load_tokenizer()  # 4096 tokens, end-of-text 0
    check_tokenizer(GPT2Config(vocab_size=4096, eos_token_id=0, bos_token_id=0), tok)
    check_tokenizer(GPT2Config(vocab_size=4096 + 64, eos_token_id=0, bos_token_id=0), tok)  # padded rows: fine
    with pytest.raises(ModelIOError, match="ids up to 4095 but the model has vocab_size=4000"):
        check_tokenizer(GPT2Config(vocab_size=4000, eos_token_id=0, bos_token_id=0), tok)
    with pytest.raises(ModelIOError, match="4096 tokens but the model's vocabulary has 8192 rows"):
        check_tokenizer(GPT2Config(vocab_size=8192, eos_token_id=0, bos_token_id=0), tok)
    padded = corpus.load_tokenizer()
    padded.add_special_tokens({"pad_token": "<pad>"})  # a special token added without resizing the model
    with pytest.raises(ModelIOError, match="ids up to 4096 but the model has vocab_size=4096"):
        check_tokenizer(GPT2Config(vocab_size=4096, eos_token_id=0, bos_token_id=0), padded)
    # a model trained on a small tokenizer on purpose: its record names that tokenizer, and then it belongs
    check_tokenizer(GPT2Config(vocab_size=8192, eos_token_id=0, bos_token_id=0), tok,
                    {"tokenizer_sha256": tokenizer_sha256(tok)})
    # a random-init model was trained with no tokenizer: a larger vocabulary is fine, ids past it are not
    check_tokenizer(GPT2Config(vocab_size=50257, eos_token_id=0, bos_token_id=0), tok, untrained=True)
    with pytest.raises(ModelIOError, match="ids up to 4095"):
        check_tokenizer(GPT2Config(vocab_size=4000, eos_token_id=0, bos_token_id=0), tok, untrained=True)


def test_bridges_refuse_a_tokenizer_that_does_not_fit(tiny_run, tmp_path):
    from lnfree.bridges import stock_model

    _, run = tiny_run
    with pytest.raises(ModelIOError, match="tokenizer and model do not match"):
        stock_model(str(run / "export" / "hf"), tokenizer=small_tokenizer(tmp_path / "tok"))


# -- 3. exit codes that tell the truth ------------------------------------------------------------------
def signal_at_step(monkeypatch, sig, step=12):
    original = LNRemovalCallback.on_train_batch_end

    def send(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == step and not getattr(self, "_sent", False):
            self._sent = True
            if sig == signal.SIGINT:
                raise KeyboardInterrupt  # what Python makes of SIGINT
            os.kill(os.getpid(), sig)  # Lightning's handler notes it; the loop stops at the next check

    monkeypatch.setattr(LNRemovalCallback, "on_train_batch_end", send)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_prints_the_resume_command_and_exits_non_zero(tmp_path, monkeypatch, capsys, sig, code):
    signal_at_step(monkeypatch, sig)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RunInterrupted) as stopped:
            train(compose_train(tmp_path, *TINY_RUN))
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert stopped.value.code == code
    err = capsys.readouterr().err
    ckpt = tmp_path / "checkpoints" / "on_exception_step000012.ckpt"
    assert ckpt.exists() and f"ckpt_path={ckpt.resolve()}" in err and f"exit code {code}" in err
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / LOCK_FILE).exists()


def test_sigterm_before_training_starts_releases_the_lock_and_exits_143(tmp_path, monkeypatch):
    """Outside trainer.fit (here: while the data is read) no Lightning handler is installed: the run stops the same
    way instead of dying with its lock in place."""
    from lnfree.data.datamodule import TextDataModule

    def setup(self, stage=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
        pytest.fail("SIGTERM did not stop the run")

    monkeypatch.setattr(TextDataModule, "setup", setup)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as stopped:
        train(compose_train(tmp_path / "run", *TINY_RUN))
    assert stopped.value.code == 143 and not (tmp_path / "run" / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_143(tmp_path):
    """What a scheduler sees: the process, sent SIGTERM mid-run, leaves its checkpoint and exits 143."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    args = [a for a in TINY_RUN if not a.startswith("trainer.max_steps")]
    proc = subprocess.Popen([sys.executable, "-m", "lnfree.train", *args, "trainer.max_steps=100000",
                             "trainer.ckpt_every=4", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path}/cache"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step000004.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-3000:]
    assert list((run / "checkpoints").glob("on_exception_step*.ckpt")) and "resume with" in out
    assert not (run / "summary.json").exists() and not (run / LOCK_FILE).exists()


# -- 4. one run per directory ---------------------------------------------------------------------------
def test_a_second_run_on_a_locked_dir_is_refused_naming_the_holder(tmp_path):
    """Two runs started together: the first holds the lock on a still-empty dir (so both would pass the output-dir
    check); the second is refused with the holder named, and nothing of the first is touched."""
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = write_lock(tmp_path / "run", holder.pid)
        before = lock.read_text()
        with pytest.raises(RunDirError, match=rf"in use by another run: pid {holder.pid} on host "
                                              rf"{socket.gethostname()}"):
            train(compose_train(tmp_path / "run", *TINY_RUN))
        assert lock.read_text() == before and sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_two_runs_in_one_process_cannot_share_a_dir(tmp_path):
    lock = safety.acquire_run_lock(tmp_path / "run")  # what the first run did
    try:
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            train(compose_train(tmp_path / "run", *TINY_RUN))
        assert lock.exists()  # the refused run released nothing of the first one's
    finally:
        safety.release_run_locks()
    assert not lock.exists()


def test_a_stale_lock_is_reported_not_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = write_lock(tmp_path / "run", dead.pid)
    with pytest.raises(RunDirError, match=rf"stale lock: pid {dead.pid}.*no longer running.*rm {lock}"):
        train(compose_train(tmp_path / "run", *TINY_RUN))
    assert lock.exists()
    lock.unlink()  # what the message says to do


def test_the_lock_is_held_during_the_run_and_released_when_it_ends(tiny_run, tmp_path, monkeypatch):
    from lnfree.data.datamodule import TextDataModule

    held = []

    def setup(self, stage=None):  # the run reads its data: the lock must be there, naming this process
        held.append(json.loads((tmp_path / "run" / LOCK_FILE).read_text()))
        raise DataError("stopped here")

    monkeypatch.setattr(TextDataModule, "setup", setup)
    with pytest.raises(DataError, match="stopped here"):
        train(compose_train(tmp_path / "run", *TINY_RUN))
    assert held[0]["pid"] == os.getpid() and held[0]["host"] == socket.gethostname()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released by the failed run
    lock = safety.acquire_run_lock(tmp_path / "new")
    assert lock.exists()
    safety.release_run_locks()
    assert not (tmp_path / "new").exists()  # a dir the lock made and nothing used is not left behind
    _, run = tiny_run
    assert not (run / LOCK_FILE).exists()  # and by a finished one


def test_only_the_first_process_of_a_distributed_run_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank re-running train() on the same dir
    assert safety.acquire_run_lock(tmp_path) is None and not (tmp_path / LOCK_FILE).exists()


# -- 5. no half-written artefacts -----------------------------------------------------------------------
class _Data:
    def __init__(self, ids):
        self.val_data = ids


def test_a_file_size_limit_during_export_leaves_no_half_export_and_is_named(tmp_path):
    from lnfree.training.train import _export

    _, model = calibrated_all_removed()
    data = _Data(torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0)))
    _export(model, None, tmp_path / "whole", data)  # measure: the limit lets the hf form through, not folded/
    hf_size = (tmp_path / "whole" / "export" / "hf" / "model.safetensors").stat().st_size
    folded_size = (tmp_path / "whole" / "export" / "folded" / "folded.safetensors").stat().st_size
    assert hf_size < folded_size
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    (out / "export" / "keep").write_text("the previous export")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((hf_size + folded_size) // 2, hard))
    try:
        with pytest.raises(OSError, match=r"EFBIG") as err:
            _export(model, None, out, data)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG and ".export.tmp" in str(err.value)
    assert not (out / ".export.tmp").exists() and (out / "export" / "keep").exists()


def test_a_full_disk_while_checkpointing_is_named(tmp_path, monkeypatch):
    def full(obj, f, *a, **k):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # torch.save turns the file's OSError into its own RuntimeError
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(safety.torch, "save", full)
    with pytest.raises(OSError, match=r"checkpoint .*step000006\.ckpt not written: the disk is full \(ENOSPC\)"):
        safety.SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "step000006.ckpt")
    assert not list(tmp_path.iterdir())


def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    (run / ".export.tmp" / "hf").mkdir(parents=True)
    (run / ".export.tmp" / "hf" / "model.safetensors").write_bytes(b"half")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".step000012.ckpt.tmp-12345").write_bytes(b"half")
    with pytest.raises(DataError):  # the next start gets past the lock and the dir check, then fails on data
        train(compose_train(run, *TINY_RUN, "data=local_text", f"data.files=[{tmp_path}/none*.txt]"))
    assert not (run / ".export.tmp").exists() and not (run / "checkpoints").exists()


# -- 6. clear errors before compute ---------------------------------------------------------------------
def test_a_data_glob_matching_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "sub.jsonl").mkdir()
    with pytest.raises(DataError, match=r"match directories .*sub\.jsonl"):
        open_stream("files", "train", files=[str(tmp_path / "*.jsonl")])


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_preflight_finds_an_unreadable_file_before_compute(tmp_path, monkeypatch, policy):
    import lnfree.training.train as tr

    texts = [t[:400] for t, _ in zip(corpus.iter_texts("train"), range(60))]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b"{not json at all\n" * 50)  # a file the stream would reach only after all of a.jsonl
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in corpus.iter_texts("validation")))
    monkeypatch.setattr(tr, "load_model", lambda *a, **k: pytest.fail("the model's weights were loaded"))
    cfg = compose_train(tmp_path / "run", *TINY_RUN, "data=local_text", f"data.files=[{tmp_path}/a.jsonl,{bad}]",
                        f"data.val_files=[{val}]", "data.block_size=64", "data.val_blocks=4",
                        f"data.on_bad_row={policy}")
    if policy == "fail":
        with pytest.raises(DataError, match=rf"{bad}, row 0: line 1 is not JSON"):
            train(cfg)
    else:  # skip: named and recorded at the start, before the model exists
        with pytest.raises(pytest.fail.Exception):
            train(cfg)
    faults = [json.loads(line) for line in (tmp_path / "run" / "data_faults.jsonl").read_text().splitlines()]
    assert faults[0]["where"] == str(bad) and faults[0]["action"] == policy


@pytest.mark.parametrize("override", ["optim.lr=inf", "trainer.max_loss=inf", "schedule.aux_weight=nan",
                                      "+model.shape.layer_norm_epsilon=inf"])
def test_non_finite_numbers_are_refused_by_the_limit_check(tmp_path, monkeypatch, override):
    import lnfree.training.train as tr

    monkeypatch.setattr(tr, "open_source", lambda *a, **k: pytest.fail("the model was looked up"))
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(LimitError, match=rf"{key}=(inf|nan) \(must be a finite number\)"):
        train(compose_train(tmp_path, *TINY_RUN, override))


def test_push_to_hub_ids_go_through_the_hubs_own_validator(tmp_path, monkeypatch):
    import lnfree.training.train as tr
    from lnfree.hub import HubPushError, check_push

    with pytest.raises(HubPushError, match="not a valid repo id"):
        check_push("user/re--po")
    monkeypatch.setattr(tr, "load_model", lambda *a, **k: pytest.fail("the model's weights were loaded"))
    with pytest.raises(HubPushError, match=r"'bad repo/na me!!' is not a valid repo id"):
        train(compose_train(tmp_path, *TINY_RUN, "push_to_hub='bad repo/na me!!'"))
