import json

import numpy as np
import pytest
import torch
from conftest import ROOT, docs_file, eval_cfg, tiny_config
from transformers import GPT2LMHeadModel

from lnfree.analysis.eval_config import EvalError
from lnfree.analysis.eval_data import keep_seen, seen_tokens
from lnfree.analysis.evaluate import evaluate
from lnfree.analysis.tables import markdown_table
from lnfree.data import corpus
from lnfree.io import ModelIOError


def test_ce_equals_hand_computation(tmp_path):
    tok = corpus.load_tokenizer()
    model = GPT2LMHeadModel(tiny_config(vocab_size=len(tok), n_positions=64)).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    f = tmp_path / "one.jsonl"
    text = "To be, or not to be, that is the question. " * 20
    f.write_text(json.dumps({"text": text}) + "\n")
    cfg = eval_cfg(tmp_path, [{"name": "m", "path": str(tmp_path / "m")}],
                   [{"name": "d", "source": "files", "files": [str(f)]}], tokens=2 * 32)
    res = evaluate(cfg)["d"]["m"]
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    total, n = 0.0, 0
    with torch.no_grad():
        for c in range(2):  # two chunks of 32 tokens, 31 predictions each
            chunk = torch.tensor(ids[c * 32:(c + 1) * 32])
            logits = model(chunk[None]).logits[0]
            for t in range(31):
                total -= torch.log_softmax(logits[t], -1)[chunk[t + 1]].item()
                n += 1
    assert res["n_tokens"] == n
    assert res["mean"] == pytest.approx(total / n, abs=1e-5)
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["results"]["d"]["m"]["mean"] == res["mean"]
    assert f"| m | {res['mean']:.4f} (best) |" in (tmp_path / "eval" / "table.md").read_text()
    assert (tmp_path / "eval" / "ce_hist.png").stat().st_size > 1000


def test_filter_drops_exactly_chunks_with_unseen_tokens():
    chunks = torch.tensor([[1, 2, 3], [1, 4, 2], [3, 3, 3], [5, 1, 1]])
    seen = torch.zeros(8, dtype=torch.bool)
    seen[[1, 2, 3]] = True
    kept = list(keep_seen(iter(chunks), seen))
    assert [k.tolist() for k in kept] == [[1, 2, 3], [3, 3, 3]]
    tok = corpus.load_tokenizer()
    mask = seen_tokens(iter(["hello world", "goodbye"]), tok, len(tok), max_docs=1)
    ids = tok("hello world")["input_ids"]
    assert mask[ids].all() and mask.sum() == len(set(ids))  # only the first document counted


def test_table_marks_gap_to_best():
    res = {"d": {"a": {"mean": 3.0}, "b": {"mean": 3.25}}}
    table = markdown_table(res)
    assert "| a | 3.0000 (best) |" in table and "| b | 3.2500 (+0.2500) |" in table


@pytest.mark.slow
def test_every_model_form_gives_the_same_ce(tmp_path, tiny_run):
    _, run = tiny_run
    forms = {"run_dir": run, "hf_export": run / "export" / "hf", "folded": run / "export" / "folded",
             "checkpoint": run / "checkpoints" / "last.ckpt"}
    f = docs_file(tmp_path)
    cfg = eval_cfg(tmp_path, [{"name": k, "path": str(v)} for k, v in forms.items()],
                   [{"name": "d", "source": "files", "files": [str(f)]}])
    res = evaluate(cfg)["d"]
    means = [r["mean"] for r in res.values()]
    assert max(means) - min(means) < 1e-4, res
    assert all(r["jsd_to_reference"] < 1e-6 for name, r in res.items() if name != "run_dir")
    assert (tmp_path / "eval" / "training_curves.png").exists()


@pytest.mark.slow
def test_paired_gaps_are_reported_per_seed_and_over_seeds(tmp_path, tiny_run):
    _, run = tiny_run
    f = docs_file(tmp_path)
    models = [{"name": "hf", "path": str(run / "export" / "hf")},
              {"name": "folded", "path": str(run / "export" / "folded")},
              {"name": "ckpt", "path": str(run / "checkpoints" / "step000012.ckpt")}]
    pairs = [{"name": "same", "a": ["hf", "hf"], "b": ["folded", "folded"]},
             {"name": "later_minus_earlier", "a": ["hf"], "b": ["ckpt"]}]
    cfg = eval_cfg(tmp_path, models, [{"name": "d", "source": "files", "files": [str(f)]}], pairs=pairs)
    res = evaluate(cfg)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())["paired"]["d"]
    same = saved["same"]
    assert abs(same["per_seed"][0]["gap"]) < 1e-4 and same["gap_over_seeds"]["n"] == 2  # two forms of one model
    later = saved["later_minus_earlier"]["per_seed"][0]
    assert later["gap"] == pytest.approx(res["d"]["hf"]["mean"] - res["d"]["ckpt"]["mean"], abs=1e-5)
    assert later["ci95"][0] <= later["gap"] <= later["ci95"][1]
    assert "Paired gaps" in (tmp_path / "eval" / "table.md").read_text()
    ce = np.load(tmp_path / "eval" / "per_token_ce.npz")
    assert ce["d/hf"].shape == ce["d/ckpt"].shape == (4, 31)  # per-token CE kept for later paired tests
    with pytest.raises(EvalError, match="unknown"):
        evaluate(eval_cfg(tmp_path, models, [{"name": "d", "source": "builtin"}],
                          pairs=[{"name": "x", "a": ["nope"], "b": ["hf"]}]))


def test_unknown_model_or_dataset_fails_before_loading(tmp_path, monkeypatch):
    import lnfree.analysis.evaluate as ev

    monkeypatch.setattr(ev, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    good = {"name": "d", "source": "builtin"}
    with pytest.raises(ModelIOError, match="does not exist"):
        evaluate(eval_cfg(tmp_path, [{"name": "x", "path": "/no/such/model"}], [good]))
    with pytest.raises(ModelIOError, match="hub is offline"):
        evaluate(eval_cfg(tmp_path, [{"name": "x", "path": "gpt2-nonexistent"}], [good]))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(EvalError, match="unknown source"):
        evaluate(eval_cfg(tmp_path, [{"name": "x", "path": str(tmp_path / "m")}],
                          [{"name": "d", "source": "nope"}]))
    with pytest.raises(EvalError, match="offline"):
        evaluate(eval_cfg(tmp_path, [{"name": "x", "path": str(tmp_path / "m")}],
                          [{"name": "pile", "source": "hf", "path": "monology/pile-uncopyrighted"}]))


@pytest.mark.parametrize("name,overrides", [("eval", []), ("eval_paper", ["models.1.path=/r/v", "models.2.path=/r/l"])])
def test_eval_configs_compose(name, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    assert len(cfg.models) >= 3 and cfg.models[0].name == "original"
    assert all(d.source in ("builtin", "hf", "files", "owt_nanogpt") for d in cfg.datasets)
    if name == "eval_paper":
        assert cfg.datasets[2].filter.docs == 1_000_000 and cfg.context == 1024


@pytest.mark.parametrize("name", ["eval", "eval_ablations", "eval_lora", "downstream"])
def test_runs_moves_every_trained_model_of_a_config(name):
    from hydra import compose, initialize_config_dir

    import lnfree.analysis.eval_config  # noqa: F401  (the schemas these configs extend)
    import lnfree.downstream.harness  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        default, moved = compose(name), compose(name, overrides=["runs=/x"])
    trained = [m.path for m in moved.models if not m.path.startswith("builtin:")]
    assert len(trained) == len(moved.models) - 1 and all(p.startswith("/x/") for p in trained)
    assert [m.path.replace(default.runs, "/x") for m in default.models] == [m.path for m in moved.models]


def test_make_eval_evaluates_the_runs_it_trains(tmp_path):
    import shutil
    import subprocess

    from lnfree.analysis.interp.cli import default_models

    if shutil.which("make") is None:
        pytest.skip("no make")
    for runs in ("/x", None):  # RUNS given, and its default (conf/runs.yaml)
        cmd = ["make", "-n", "eval", f"VENV={tmp_path}"] + ([f"RUNS={runs}"] if runs else [])
        text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        runs = runs or "outputs/builtin"
        assert f"lnfree.eval runs={runs}" in text and f"hydra.run.dir={runs}/lnfree_s$s" in text
    assert default_models("/x") == ["original=builtin:w128", "vanilla=/x/vanilla_s1", "lnfree=/x/lnfree_s1"]


def test_eval_pairs_write_the_controls_ce_into_the_lnfree_runs_cards(tmp_path, tiny_run):
    import shutil

    from lnfree.analysis.evaluate import update_model_cards

    _, run = tiny_run
    lnfree, vanilla = tmp_path / "lnfree", tmp_path / "vanilla"
    for d in (lnfree, vanilla):
        shutil.copytree(run / "export", d / "export")
        shutil.copy(run / "summary.json", d / "summary.json")
    control = json.loads((vanilla / "summary.json").read_text())
    control.update(removed_sites=[], val_ce=9.87654)  # what a vanilla control's summary says
    (vanilla / "summary.json").write_text(json.dumps(control))
    models = [{"name": "a", "path": str(lnfree)}, {"name": "b", "path": str(vanilla)}]
    cfg = eval_cfg(tmp_path, models, [{"name": "d", "source": "builtin"}],
                   pairs=[{"name": "a_minus_b", "a": ["a"], "b": ["b"]}, {"name": "b_minus_a", "a": ["b"], "b": ["a"]}])
    written = update_model_cards(cfg)
    assert sorted(p.parent.name for p in written) == ["folded", "hf"]  # a's cards only: a is not a control
    assert all(p.is_relative_to(lnfree) and "| vanilla control | 9.8765 |" in p.read_text() for p in written)
