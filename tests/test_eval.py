import json

import numpy as np
import pytest
import torch
from conftest import ROOT, docs_file, eval_cfg, tiny_config
from transformers import GPT2LMHeadModel

from lnfree.analysis.compare import evaluate
from lnfree.analysis.eval_config import EvalError
from lnfree.analysis.eval_data import keep_seen, seen_tokens
from lnfree.analysis.tables import markdown_table
from lnfree.data import corpus
from lnfree.errors import ModelIOError


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


def test_eval_evaluates_and_records_each_seeds_model_and_pair(tmp_path):
    """A {seed} model and pair, written out over `seeds`: each seed's model evaluated under its own name, the pair
    compared seed by seed, and results.json's config listing them as a hand-written config would."""
    tok = corpus.load_tokenizer()
    GPT2LMHeadModel(tiny_config(vocab_size=len(tok), n_positions=64)).eval().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    models = [{"name": "ref", "path": str(tmp_path / "m")}, {"name": "m_s{seed}", "path": str(tmp_path / "m")}]
    cfg = eval_cfg(tmp_path, models, [{"name": "d", "source": "files", "files": [str(docs_file(tmp_path))]}],
                   pairs=[{"name": "m_minus_ref", "a": ["m_s{seed}"], "b": ["ref"]}], seeds=[4, 5])
    assert list(evaluate(cfg)["d"]) == ["ref", "m_s4", "m_s5"]
    record = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [m["name"] for m in record["config"]["models"]] == ["ref", "m_s4", "m_s5"]
    assert "seeds" not in record["config"]
    assert record["config"]["pairs"] == [{"name": "m_minus_ref", "a": ["m_s4", "m_s5"], "b": ["ref", "ref"]}]
    gap = record["paired"]["d"]["m_minus_ref"]
    assert gap["a"] == ["m_s4", "m_s5"] and len(gap["per_seed"]) == 2 and abs(gap["per_seed"][1]["gap"]) < 1e-6


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
    import lnfree.analysis.compare as ev

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

    import lnfree.downstream.harness  # noqa: F401  (the schema downstream.yaml extends)
    from lnfree.analysis.eval_config import seeds_written_out  # (registers eval_schema)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        default, moved = (seeds_written_out(compose(name, overrides=o)) for o in ([], ["runs=/x"]))
    trained = [m.path for m in moved.models if not m.path.startswith("builtin:")]
    assert len(trained) == len(moved.models) - 1 and all(p.startswith("/x/") for p in trained)
    assert [m.path.replace(default.runs, "/x") for m in default.models] == [m.path for m in moved.models]


def test_make_eval_evaluates_the_runs_it_trains(tmp_path):
    import shutil
    import subprocess

    from hydra import compose, initialize_config_dir

    from lnfree.analysis.interp.cli import default_models

    if shutil.which("make") is None:
        pytest.skip("no make")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        seeds = ",".join(str(s) for s in compose("eval").seeds)  # conf/runs.yaml's
    for runs in ("/x", None):  # RUNS given, and its default (conf/runs.yaml)
        cmd = ["make", "-n", "eval", f"VENV={tmp_path}"] + ([f"RUNS={runs}"] if runs else [])
        text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        runs = runs or "outputs/builtin"
        # one multirun per arm over conf/runs.yaml's seeds into <runs>/<arm>_s<seed>, each trained only if missing
        for arm in ("vanilla", "lnfree"):
            train = next(line for line in text.splitlines() if f"'hydra.sweep.subdir={arm}_s${{seed}}'" in line)
            assert f"lnfree.train -m seed={seeds} " in train and f"hydra.sweep.dir={runs} " in train
            assert "skip_if_done=true" in train
        assert f"lnfree.eval runs={runs} output_dir=experiments/builtin_eval 'seeds=[{seeds}]'" in text
    assert default_models("/x") == ["original=builtin:w128", "vanilla=/x/vanilla_s1", "lnfree=/x/lnfree_s1"]


# git HEAD's lists (with runs=R) from before the seeds were written once, in conf/runs.yaml: each shipped config,
# its {seed} models and pairs written out, names and evaluates the same models and pairs in the same order
V, L = ["vanilla_s1", "vanilla_s2", "vanilla_s3"], ["lnfree_s1", "lnfree_s2", "lnfree_s3"]
LV, LL = ["lora_vanilla_s1", "lora_vanilla_s2", "lora_vanilla_s3"], ["lora_lnfree_s1", "lora_lnfree_s2",
                                                                     "lora_lnfree_s3"]
B, NA = ["builtin_s1", "builtin_s2", "builtin_s3"], ["noaux_s1", "noaux_s2", "noaux_s3"]
GR, SP = ["gradual_s1", "gradual_s2", "gradual_s3"], ["special_s1", "special_s2", "special_s3"]
BUILTIN_PAIRS = [("lnfree_minus_vanilla", L, V), ("vanilla_minus_original", V, ["original", "original", "original"])]
PER_SEED_RUNS = ["vanilla_s1=R/vanilla_s1", "vanilla_s2=R/vanilla_s2", "vanilla_s3=R/vanilla_s3",
                 "lnfree_s1=R/lnfree_s1", "lnfree_s2=R/lnfree_s2", "lnfree_s3=R/lnfree_s3"]
LORA_RUNS = ["lora_vanilla_s1=R/lora_vanilla_s1", "lora_vanilla_s2=R/lora_vanilla_s2",
             "lora_vanilla_s3=R/lora_vanilla_s3", "lora_lnfree_s1=R/lora_lnfree_s1", "lora_lnfree_s2=R/lora_lnfree_s2",
             "lora_lnfree_s3=R/lora_lnfree_s3"]
TODAYS_MODELS_AND_PAIRS = {
    "eval": (["original=builtin:w128", *PER_SEED_RUNS, "removed_no_finetune=R/no_finetune"], BUILTIN_PAIRS),
    "eval_llama": (["original=builtin:llama_w128", *PER_SEED_RUNS], BUILTIN_PAIRS),
    "eval_neox": (["original=builtin:neox_w128", *PER_SEED_RUNS], BUILTIN_PAIRS),
    "eval_shift": (["original=builtin:w128", *PER_SEED_RUNS], BUILTIN_PAIRS),
    "eval_lora": (["original=builtin:w128", *PER_SEED_RUNS, *LORA_RUNS],
                  [("lora_lnfree_minus_lora_vanilla", LL, LV), ("lnfree_minus_vanilla", L, V),
                   ("lora_lnfree_minus_lnfree", LL, L), ("lora_vanilla_minus_vanilla", LV, V)]),
    "eval_ablations": (
        ["original=builtin:w128", "vanilla_s1=R/vanilla_s1", "vanilla_s2=R/vanilla_s2", "vanilla_s3=R/vanilla_s3",
         "builtin_s1=R/lnfree_s1", "builtin_s2=R/lnfree_s2", "builtin_s3=R/lnfree_s3",
         "noaux_s1=R/builtin_noaux_s1", "noaux_s2=R/builtin_noaux_s2", "noaux_s3=R/builtin_noaux_s3",
         "gradual_s1=R/builtin_gradual_s1", "gradual_s2=R/builtin_gradual_s2", "gradual_s3=R/builtin_gradual_s3",
         "special_s1=R/builtin_special_s1", "special_s2=R/builtin_special_s2", "special_s3=R/builtin_special_s3"],
        [("builtin_minus_vanilla", B, V), ("noaux_minus_vanilla", NA, V), ("gradual_minus_vanilla", GR, V),
         ("special_minus_vanilla", SP, V), ("noaux_minus_builtin", NA, B), ("gradual_minus_builtin", GR, B),
         ("special_minus_builtin", SP, B)]),
    "eval_smollm2": (  # listed by hand, seed 1 only: still works
        ["original=~/.cache/lnfree/real/smollm2_135m_q4", "vanilla_s1=R/vanilla_s1", "lnfree_s1=R/lnfree_s1"],
        [("lnfree_minus_vanilla", ["lnfree_s1"], ["vanilla_s1"]),
         ("vanilla_minus_original", ["vanilla_s1"], ["original"])]),
    "downstream": (["original=builtin:w128", *PER_SEED_RUNS, *LORA_RUNS], None),
}


@pytest.mark.parametrize("name", TODAYS_MODELS_AND_PAIRS)
def test_each_shipped_config_written_out_over_the_seeds_names_todays_models_and_pairs(name):
    from hydra import compose, initialize_config_dir

    import lnfree.downstream.harness  # noqa: F401  (downstream_schema)
    from lnfree.analysis.eval_config import seeds_written_out

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        composed = compose(name, overrides=["runs=R"])
    cfg = seeds_written_out(composed)
    models, pairs = TODAYS_MODELS_AND_PAIRS[name]
    assert [f"{m.name}={m.path}" for m in cfg.models] == models
    if pairs is not None:
        assert [(p.name, list(p.a), list(p.b)) for p in cfg.pairs] == pairs
    # the record saves the config as a hand-written list would give it: no `seeds` key, every other key as composed
    assert "seeds" not in cfg and set(cfg) == set(composed) - {"seeds"}


def test_seed_templates_follow_the_seeds_and_refuse_what_cannot_be_written_out():
    from hydra import compose, initialize_config_dir

    from lnfree.analysis.eval_config import seeds_written_out

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        one = seeds_written_out(compose("eval", overrides=["runs=R", "seeds=[7]"]))  # make eval SEEDS=7
        assert [m.name for m in one.models] == ["original", "vanilla_s7", "lnfree_s7", "removed_no_finetune"]
        assert [(list(p.a), list(p.b)) for p in one.pairs] == [(["lnfree_s7"], ["vanilla_s7"]),
                                                               (["vanilla_s7"], ["original"])]
        with pytest.raises(EvalError, match="one model on each side"):
            seeds_written_out(compose("eval", overrides=["pairs=[{name: x, a: ['lnfree_s{seed}', original], "
                                                         "b: ['vanilla_s{seed}', original]}]"]))
        with pytest.raises(EvalError, match="in its path but not in its name"):
            seeds_written_out(compose("eval", overrides=["models=[{name: v, path: 'R/vanilla_s{seed}'}]"]))


def test_eval_pairs_write_the_controls_ce_into_the_lnfree_runs_cards(tmp_path, tiny_run):
    import shutil

    from lnfree.analysis.compare import update_model_cards

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
