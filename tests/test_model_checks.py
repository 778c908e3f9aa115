"""Model files are checked before they are used: an export's and a shipped model's files against the whole-file
hashes of their record (an edit anywhere, damaged weights, a swapped tokenizer), the tokenizer against the model it is
paired with (in training, evaluation, the bridges), and nothing loaded from a temporary name or an unknown folded
config. All offline, on the tiny configs; tampered fingerprints and unsafe formats: tests/test_io.py."""

import json
import shutil

import pytest
from conftest import TINY_RUN, compose_train, copy_export, eval_cfg, rehash, tiny_config
from safetensors.torch import load_file, save_file

from lnfree import load, resolve
from lnfree.data import corpus
from lnfree.errors import ModelIOError
from lnfree.model_record import EXPORT_INFO, record_text
from lnfree.training.run import train


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


# -- exports and shipped models verified whole ---------------------------------------------------------------------
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
    from lnfree.model_record import file_sha256, model_file
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
    from lnfree.model_record import record_text

    hf = copy_export(tiny_run, tmp_path)
    record = json.loads((hf / EXPORT_INFO).read_text())
    del record["files"]
    (hf / EXPORT_INFO).write_text(record_text(record))
    with pytest.raises(ModelIOError, match="no whole-file hashes"):
        load(str(hf))
    with pytest.warns(UserWarning, match="predates whole-file hashes"):
        model, _ = load(str(hf), unhashed_ok=True)
    assert model is not None


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
    edit_tensor(folded / "folded.safetensors", "wte.weight", row)
    with pytest.raises(ModelIOError, match=r"\['wte'\] differ from the record's hashes"):
        with pytest.warns(UserWarning):
            load(str(folded), unhashed_ok=True)


def test_nothing_loads_from_a_temporary_name(tiny_run, tmp_path):
    from lnfree.training.resume import ResumeError

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


def test_a_folder_named_like_a_temporary_file_is_not_refused(tiny_run, tmp_path):
    for folder in ("job.tmp", ".cache.tmp"):  # a user's folders, not one of the run's own temp files
        hf = copy_export(tiny_run, tmp_path / folder)
        assert resolve(str(hf)).kind == "hf_lnfree"


def test_a_folded_config_of_an_unknown_model_type_is_refused_before_loading(tiny_run, tmp_path):
    folded = copy_export(tiny_run, tmp_path, "folded")
    (folded / "folded_config.json").write_text(json.dumps({"hf_config": {"model_type": "mamba"}, "identity": [],
                                                           "lm_head_bias": True}))
    with pytest.raises(ModelIOError, match="model_type='mamba'.*supported"):
        resolve(str(folded))


# -- tokenizer and model checked together --------------------------------------------------------------------------
def test_training_with_a_tokenizer_of_another_vocabulary_is_refused_before_compute(tmp_path, monkeypatch):
    import lnfree.training.run as tr

    small_tokenizer(tmp_path / "tok44")
    monkeypatch.setattr(tr, "load_model", lambda *a, **k: pytest.fail("the model's weights were loaded"))
    with pytest.raises(ModelIOError, match=r"44 tokens but the model's vocabulary has 4096|not the one recorded"):
        train(compose_train(tmp_path / "run", *[o for o in TINY_RUN if not o.startswith("model=")], "model=builtin_w48",
                            f"model.tokenizer={tmp_path / 'tok44'}", "trainer.max_steps=2"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_with_a_model_smaller_than_the_tokenizer_is_a_clear_error(tmp_path):
    from transformers import GPT2LMHeadModel

    from lnfree.analysis.compare import evaluate

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

    from lnfree.model_record import check_tokenizer, tokenizer_sha256

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
