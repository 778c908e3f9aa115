"""Model IO (lnfree/references.py, lnfree/io.py): every reference resolves once, loading never trains, and the
loaders (and make_removable) refuse what they must: pickled code, non-GPT-2 models, tampered exports, fp16 LN-free
exports, LN-free exports made removable. Whole-file hashes and tokenizer pairing: tests/test_model_checks.py."""

import json
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_RUN, compose_train, copy_export, eval_cfg, rehash, tiny_config
from safetensors.torch import load_file, save_file

from lnfree import load, make_removable, resolve
from lnfree.errors import ModelIOError, NotRemovableError
from lnfree.io import read_checkpoint
from lnfree.model_record import logits
from lnfree.references import builtin_dir


class _Boom:
    """Unpickling this runs os.system: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def crafted_ckpt(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "lnfree_model_config": {}, "payload": _Boom(marker)}, f)
    return path, marker


def unsupported_dir(tmp_path):
    """A Qwen3 model (QK-norm: no adapter) whose weights file is garbage: reading it would fail differently."""
    from transformers import Qwen3Config

    d = tmp_path / "qwen3"
    Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"not weights")
    return d


def test_every_form_resolves_to_its_kind(tiny_run, tmp_path):
    _, run = tiny_run
    assert resolve(str(run)).kind == "hf_lnfree" and resolve(str(run)).run_dir == str(run)
    assert resolve(str(run / "export" / "hf")).kind == "hf_lnfree"
    assert resolve(str(run / "export" / "folded")).kind == "folded"
    assert resolve(str(run / "checkpoints" / "last.ckpt")).kind == "ckpt"
    assert resolve("builtin:w128").kind == "hf"
    ids = torch.randint(0, 4096, (2, 16))
    ref = logits(load(str(run / "checkpoints" / "last.ckpt"))[0], ids)
    for form in (run, run / "export" / "hf", run / "export" / "folded"):
        model, tok = load(str(form))
        assert tok is not None
        assert (logits(model, ids) - ref).abs().max() / ref.abs().max() < 1e-4


def test_random_is_a_reference_kind_made_for_the_tokenizer_it_is_loaded_with():
    from transformers import GPT2Config

    from lnfree.io import load_tokenizer, read_record
    from lnfree.model import RemovableGPT2LMHeadModel, make_removable

    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
    ref = resolve("random", shape=shape)
    assert ref.kind == "random" and dict(ref.shape) == shape
    assert load_tokenizer(ref) is None and read_record(ref) is None  # nothing is read: it has neither
    with pytest.raises(ModelIOError, match="needs its shape"):
        resolve("random")  # e.g. given to eval: refused, not a GPT-2 small by default
    tok = load_tokenizer("builtin")
    torch.manual_seed(0)
    model, got = load(ref, removable=True, tokenizer=tok, dropout=0.25)
    assert isinstance(model, RemovableGPT2LMHeadModel) and got is tok and not model.training  # as every form loads
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == model.config.bos_token_id == 0
    assert model.config.n_layer == 2 and model.config.attn_pdrop == 0.25
    torch.manual_seed(0)  # the same initialisation as the config made by hand
    by_hand = make_removable(GPT2Config(vocab_size=len(tok), bos_token_id=0, eos_token_id=0, attn_pdrop=0.25,
                                        resid_pdrop=0.25, embd_pdrop=0.25, **shape))
    torch.testing.assert_close(model.state_dict(), by_hand.state_dict(), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ModelIOError, match="ids up to 4095 but the model has vocab_size=97"):
        load(resolve("random", shape={**shape, "vocab_size": 97}), tokenizer=tok)  # the shape's vocabulary wins


def test_one_tokenizer_loader_names_what_it_cannot_reach(monkeypatch):
    from lnfree.data import corpus
    from lnfree.io import load_tokenizer
    from lnfree.model_record import tokenizer_sha256

    assert tokenizer_sha256(load_tokenizer("builtin")) == tokenizer_sha256(corpus.load_tokenizer())
    assert len(load_tokenizer(str(corpus.TOKENIZER_DIR))) == 4096  # a dir
    with pytest.raises(ModelIOError, match=r"tokenizer 'someone/tok' is not a local dir and the hub is offline"):
        load_tokenizer("someone/tok")  # refused at once, not after huggingface_hub's retries


COMMITTED_MODELS = sorted(p.parent for p in [*(ROOT / "lnfree/pretrained").glob("*/model.safetensors"),
                                             *(ROOT / "experiments/depth_family/models").glob("*/model.safetensors")])


def test_the_source_tree_holds_one_tokenizer_json_the_builtin_tokenizers():
    """What git would commit (tracked or not ignored, present on disk): the built-in BPE's tokenizer.json once, not a
    copy per built-in model."""
    from lnfree.model_record import SHARED_TOKENIZER_FILE

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    found = [p for p in listed.stdout.splitlines() if p.rsplit("/", 1)[-1] == "tokenizer.json" and (ROOT / p).exists()]
    assert found == [str(SHARED_TOKENIZER_FILE.relative_to(ROOT))]


@pytest.mark.parametrize("d", COMMITTED_MODELS, ids=lambda d: d.name)
def test_a_committed_builtin_model_reads_the_builtin_tokenizer_json_checked_by_its_record(d):
    from lnfree.io import load_tokenizer
    from lnfree.model_record import EXPORT_INFO, SHARED_TOKENIZER_FILE, check_files, file_sha256, tokenizer_sha256

    record = json.loads((d / EXPORT_INFO).read_text())
    assert not (d / "tokenizer.json").exists() and record["files"]["tokenizer.json"] == file_sha256(
        SHARED_TOKENIZER_FILE)
    check_files(d, record)  # every listed file verified, the shared one included
    tok, builtin = load_tokenizer(resolve(str(d))), load_tokenizer("builtin")
    assert tok is not None and tokenizer_sha256(tok) == record.get("tokenizer_sha256", tokenizer_sha256(builtin))
    text = "The quick brown fox, 1984.\n\n  Jumps<|endoftext|>over"
    assert tok(text).input_ids == builtin(text).input_ids and tok.decode(tok(text).input_ids) == text


def test_a_record_naming_another_tokenizer_json_than_the_builtin_one_is_refused(tmp_path):
    """The built-in tokenizer a committed model reads is checked against the model's record: were it changed (here:
    the record names another file), loading names the file and where it was read from."""
    import shutil

    from lnfree.model_record import EXPORT_INFO, SHARED_TOKENIZER_FILE

    d = tmp_path / "w48"
    shutil.copytree(ROOT / "lnfree/pretrained/w48", d)
    record = json.loads((d / EXPORT_INFO).read_text())
    record["files"]["tokenizer.json"] = "0" * 64
    (d / EXPORT_INFO).write_text(json.dumps(record))
    with pytest.raises(ModelIOError, match=rf"tokenizer\.json \(read from {SHARED_TOKENIZER_FILE}.*is not the file"):
        load(str(d))


def test_loading_never_trains_a_missing_builtin(tmp_path):
    with pytest.raises(ModelIOError, match=r"not pretrained yet.*python -m lnfree.pretrain model=builtin_9x9"):
        load("builtin:9x9", cache_dir=tmp_path)
    assert not builtin_dir("9x9", tmp_path).exists()


def test_crafted_pickle_checkpoint_runs_nothing_in_the_loader_eval_and_resume(tmp_path):
    path, marker = crafted_ckpt(tmp_path)
    with pytest.raises(ModelIOError, match="refused to load checkpoint"):
        read_checkpoint(path)
    with pytest.raises(ModelIOError, match="refused"):
        load(str(path))
    from lnfree.analysis.compare import evaluate

    cfg = eval_cfg(tmp_path, [{"name": "evil", "path": str(path)}], [{"name": "d", "source": "builtin"}])
    with pytest.raises(ModelIOError, match="refused"):
        evaluate(cfg)
    from lnfree.training.run import train

    with pytest.raises(ModelIOError, match="refused"):
        train(compose_train(tmp_path / "run", *TINY_RUN, f"ckpt_path={path}"))
    assert not marker.exists()  # nothing ran
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any compute


def test_unsupported_family_refused_before_weights(tmp_path):
    d = unsupported_dir(tmp_path)
    with pytest.raises(ModelIOError, match=r"model_type='qwen3'.*supported families are gpt2 .*llama .*gpt_neox"):
        load(str(d))
    from lnfree.analysis.compare import evaluate

    cfg = eval_cfg(tmp_path, [{"name": "qwen3", "path": str(d)}], [{"name": "d", "source": "builtin"}])
    with pytest.raises(ModelIOError, match="qwen3"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()  # nothing landed in a results table


@pytest.mark.parametrize("rehashed", [False, True])
def test_tampered_exports_refused_with_what_differs(tiny_run, tmp_path, rehashed):
    """Each edit is named by its file's hash; with the hashes rewritten too, the semantic checks (recorded eps,
    logits fingerprint) still refuse it."""
    hf = copy_export(tiny_run, tmp_path / "eps")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-5}))
    rehash(hf) if rehashed else None
    with pytest.raises(ModelIOError, match=r"layer_norm_epsilon=1e-05.*written with 1e\+12" if rehashed else
                       r"config\.json is not the file that was exported"):
        load(str(hf))
    hf = copy_export(tiny_run, tmp_path / "weights")
    w = load_file(hf / "model.safetensors")
    w["transformer.h.0.mlp.c_fc.weight"] = w["transformer.h.0.mlp.c_fc.weight"] * 1.5
    save_file(w, hf / "model.safetensors", metadata={"format": "pt"})
    rehash(hf) if rehashed else None
    with pytest.raises(ModelIOError, match="differ from the record" if rehashed else "model.safetensors is not"):
        load(str(hf))
    folded = copy_export(tiny_run, tmp_path / "f", form="folded")
    w = load_file(folded / "folded.safetensors")
    w["lm_head.bias"] = w["lm_head.bias"] + 1.0 * torch.arange(len(w["lm_head.bias"]))
    save_file(w, folded / "folded.safetensors")
    rehash(folded) if rehashed else None
    with pytest.raises(ModelIOError, match="differ from the record" if rehashed else "folded.safetensors is not"):
        load(str(folded))


def test_fp16_load_of_lnfree_export_refused(tiny_run):
    _, run = tiny_run
    with pytest.raises(ModelIOError, match="overflow fp16"):
        load(str(run / "export" / "hf"), dtype=torch.float16)
    model, _ = load(str(run / "export" / "hf"), dtype=torch.bfloat16)  # bf16 has fp32's range: allowed
    assert model.dtype == torch.bfloat16


def test_removable_only_from_models_with_norms(tiny_run, tmp_path):
    _, run = tiny_run
    with pytest.raises(ModelIOError, match="start from the run's checkpoint"):
        load(str(run / "export" / "hf"), removable=True)
    model, _ = load(str(run / "checkpoints" / "last.ckpt"), removable=True)
    assert not model.real_sites()  # modes and sigmas come with the checkpoint
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(tiny_config()).save_pretrained(tmp_path / "plain")
    fresh, _ = load(str(tmp_path / "plain"), removable=True, dropout=0.25)
    assert len(fresh.real_sites()) == 7 and fresh.transformer.h[0].attn.resid_dropout.p == 0.25


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tampered", "unsupported", "pickle"])
def test_eval_cli_refuses_bad_models(tiny_run, tmp_path, case):
    if case == "tampered":
        bad = copy_export(tiny_run, tmp_path)
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-5}))
        expect = "config.json is not the file that was exported"
    elif case == "unsupported":
        bad, expect = unsupported_dir(tmp_path), "supported families are"
    else:
        (bad, _), expect = crafted_ckpt(tmp_path), "refused to load checkpoint"
    out = subprocess.run([sys.executable, "-m", "lnfree.eval", f"models=[{{name: x, path: '{bad}'}}]",
                          f"output_dir={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and expect in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_a_hub_name_that_is_no_repo_is_one_clear_error(tmp_path):
    """A reachable hub that answers 404 (a local server stands in for it): one ModelIOError naming the model and
    what to check, in seconds, not transformers' OSError traceback."""
    import http.server
    import os
    import subprocess
    import sys
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def _404(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _404

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    code = ("from lnfree.io import ModelIOError, model_config\n"
            "try:\n    model_config('someone/no-such-model')\nexcept ModelIOError as e:\n    print('ERR', e)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    finally:
        server.shutdown()
    assert out.stdout.startswith("ERR cannot read the config of model 'someone/no-such-model'"), out.stdout + out.stderr
    assert "local dir" in out.stdout


def test_make_removable_refuses_an_lnfree_export_as_load_does(tiny_run):
    _, run = tiny_run
    with pytest.raises(ModelIOError) as by_load:
        load(str(run / "export" / "hf"), removable=True)
    stock, _ = load(str(run / "export" / "hf"))
    with pytest.raises(NotRemovableError) as by_make:
        make_removable(stock)
    tail = lambda e: str(e.value).split(" is an LN-free export")[1]  # noqa: E731  (the subject differs)
    assert tail(by_make) == tail(by_load)
