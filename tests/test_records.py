"""Result records: committed results are never overwritten by a documented command, `make tables` writes all pages
or none, damaged records are refused naming the file and line, and an evaluation that reproduces its record leaves
it untouched. All offline, seconds each."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from lnfree.analysis import scaling
from lnfree.records import RecordError, append_jsonl, job_output_dir, read_jsonl
from tools import doc_tables

RECORDS = ROOT / "experiments" / "data_scaling" / "runs.jsonl"
QUICK = ["--bootstrap", "0", "--simulations", "0"]


def _snapshot(d):
    """The result files under d (code and READMEs aside: others may edit those meanwhile)."""
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.suffix != ".py" and p.name != "README.md"}


# -- nothing documented writes over experiments/ unless told to ------------------------------------------------------
def test_scaling_cli_without_out_writes_a_new_dir_not_the_committed_one(tmp_path, monkeypatch):
    committed = _snapshot(ROOT / "experiments" / "data_scaling")
    monkeypatch.chdir(tmp_path)
    scaling.main([str(RECORDS), *QUICK])
    made = list((tmp_path / "outputs" / "scaling").iterdir())
    assert len(made) == 1 and (made[0] / "scaling.json").exists() and (made[0] / "scaling.md").exists()
    scaling.main([str(RECORDS), *QUICK])  # a second run: another new dir, the first left as it was
    assert len(list((tmp_path / "outputs" / "scaling").iterdir())) == 2
    assert _snapshot(ROOT / "experiments" / "data_scaling") == committed


def test_records_only_grow_deduplicated_and_a_conflicting_duplicate_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = tmp_path / "runs.jsonl"
    records.write_bytes(RECORDS.read_bytes())
    n = len(read_jsonl(records))
    lines = RECORDS.read_text().splitlines()
    some = tmp_path / "some.jsonl"  # a few runs already in the records (the issue: 261 records cut to 54)
    some.write_text("\n".join(lines[:54]) + "\n")
    scaling.main([str(some), "--records", str(records), "--out", str(tmp_path / "a"), *QUICK])
    assert len(read_jsonl(records)) == n and records.read_bytes() == RECORDS.read_bytes()
    other = json.loads(lines[0]) | {"val_ce": json.loads(lines[0])["val_ce"] + 0.5}  # the same run, another result
    some.write_text("\n".join([json.dumps(other), *lines[1:54]]) + "\n")
    with pytest.raises(SystemExit) as e:
        scaling.main([str(some), "--records", str(records), "--out", str(tmp_path / "b"), *QUICK])
    assert e.value.code == 2 and records.read_bytes() == RECORDS.read_bytes() and not (tmp_path / "b").exists()
    with pytest.raises(RecordError, match="differs in val_ce"):
        append_jsonl(records, [other], scaling.run_key)
    new = other | {"seed": 99}  # a new run is appended, every old one kept
    assert append_jsonl(records, [new], scaling.run_key) == 1 and len(read_jsonl(records)) == n + 1


def test_eval_cli_without_output_dir_writes_the_jobs_own_dir(tmp_path):
    committed = _snapshot(ROOT / "experiments" / "builtin_eval")
    out = subprocess.run([sys.executable, "-m", "lnfree.eval", "models=[{name: a, path: 'builtin:w48'}]", "pairs=[]",
                          "tokens=128", "context=32", "batch=2", "bootstrap=10", f"hydra.run.dir={tmp_path / 'job'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "job" / "results.json").exists() and (tmp_path / "job" / "table.md").exists()
    assert _snapshot(ROOT / "experiments" / "builtin_eval") == committed


def test_a_config_file_never_points_eval_into_experiments(tmp_path):
    """output_dir inside experiments/ only when named on the command line (as the Makefile does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from lnfree.analysis import eval_config  # noqa: F401  (the schemas the configs name)
    from lnfree.downstream import harness  # noqa: F401

    target = str(ROOT / "experiments" / "builtin_eval")
    for name in sorted(p.stem for p in (ROOT / "conf").glob("*.yaml") if p.stem.startswith(("eval", "downstream"))):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            assert compose(name).output_dir is None, name
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            HydraConfig.instance().set_config(compose("eval", overrides=["tokens=8"], return_hydra_config=True))
        with pytest.raises(RecordError, match="not named on the command line"):
            job_output_dir(target, "eval")  # e.g. a user's config file that names experiments/
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            HydraConfig.instance().set_config(compose("eval", overrides=[f"output_dir={target}"],
                                                      return_hydra_config=True))
        assert str(job_output_dir(target, "eval")) == target
    finally:
        HydraConfig.instance().cfg = None


def test_every_makefile_target_names_the_committed_dir_it_writes():
    """The eval and analysis commands default to a new dir, so each Makefile target that makes a committed record
    must name it."""
    make = (ROOT / "Makefile").read_text()
    for named in ["lnfree.eval runs=$(RUNS) output_dir=experiments/builtin_eval",
                  "eval_ablations runs=$(RUNS) output_dir=experiments/ablations",
                  "eval_lora runs=$(RUNS) output_dir=experiments/lora",
                  "eval_shift runs=$(RUNS) output_dir=experiments/shift",
                  "--config-name eval_$$f output_dir=experiments/families/$$f",
                  "lnfree.downstream runs=$(RUNS) output_dir=experiments/downstream",
                  "interp.dla --out experiments/interp\n", "interp.neurons --out experiments/interp/builtin\n",
                  "interp.residual --out experiments/interp/builtin\n", "--out experiments/families/$$f",
                  "controls_cli --replicates $(CONTROL_REPLICATES) --runs $(CONTROL) --out experiments/interp\n"]:
        assert named in make, named


# -- make tables: all pages or none ----------------------------------------------------------------------------------
def _tables_checkout(tmp_path):
    for rel in ("experiments/builtin_eval/results.json", "experiments/ablations/results.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((ROOT / rel).read_bytes())
    (tmp_path / "docs").mkdir()
    readme = f"<!-- table:eval_models -->\n{doc_tables.TABLES['eval_models'](ROOT)}\n<!-- /table -->\n"
    (tmp_path / "README.md").write_text(readme.replace("4.4792", "4.4793"))  # stale: make tables would fix it
    (tmp_path / "docs" / "results.md").write_text(
        f"<!-- table:ablations -->\n{doc_tables.TABLES['ablations'](ROOT)}\n<!-- /table -->\n".replace("+", "-"))
    return _snapshot(tmp_path)


def test_make_tables_with_a_half_written_record_writes_no_page(tmp_path):
    before = _tables_checkout(tmp_path)
    rec = tmp_path / "experiments/ablations/results.json"
    rec.write_text(rec.read_text()[: len(rec.read_text()) // 2])  # killed while writing
    with pytest.raises(RecordError, match=r"experiments/ablations/results.json:\d+: not valid JSON"):
        doc_tables.write(tmp_path)
    assert _snapshot(tmp_path) == {**before, rec.relative_to(tmp_path): rec.read_bytes()}


def test_make_tables_with_a_record_missing_its_results_names_the_table(tmp_path):
    before = _tables_checkout(tmp_path)
    rec = tmp_path / "experiments/ablations/results.json"
    rec.write_text(json.dumps(json.loads(rec.read_text()) | {"paired": {}}))  # the StopIteration
    with pytest.raises(RecordError, match="table 'ablations'"):
        doc_tables.write(tmp_path)
    assert _snapshot(tmp_path) == {**before, rec.relative_to(tmp_path): rec.read_bytes()}


# -- damaged records refused with file and line ----------------------------------------------------------------------
@pytest.mark.parametrize("case,expect", [
    ("half", r"some.jsonl:3: not valid JSON"),
    ("no_tokens", r"some.jsonl:2: record without 'tokens'"),
    ("nan", r"some.jsonl:1: val_ce=nan is not a finite number"),
    ("duplicate", r"two different results for .*val_ce"),
])
def test_scaling_refuses_damaged_records_naming_file_and_line(tmp_path, case, expect):
    lines = RECORDS.read_text().splitlines()[:4]
    if case == "half":
        lines[2] = lines[2][:40]
    elif case == "no_tokens":
        lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "tokens"})
    elif case == "nan":
        lines[0] = lines[0].replace(str(json.loads(lines[0])["val_ce"]), "NaN")
    else:
        lines.append(json.dumps(json.loads(lines[0]) | {"val_ce": 9.0}))
    (tmp_path / "some.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=expect):
        scaling.load_sources([tmp_path / "some.jsonl"])


def test_scaling_refuses_a_half_written_summary(tmp_path):
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / "summary.json").write_text('{"config": {"model": ')
    with pytest.raises(RecordError, match=r"0/summary.json:1: not valid JSON"):
        scaling.load_runs(tmp_path / "sweep")


def test_two_processes_appending_at_once_keep_every_record(tmp_path):
    """Two sweep processes share one runs.jsonl: each append reads, adds and rewrites the file, so without the lock
    one writer's rewrite could drop the other's records."""
    out = tmp_path / "runs.jsonl"
    code = ("import sys; from lnfree.records import append_jsonl\n"
            "for i in range(40):\n"
            "    append_jsonl(sys.argv[1], [{'w': sys.argv[2], 'i': i}], key=lambda r: (r['w'], r['i']))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), w], cwd=ROOT) for w in "ab"]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert sorted((r["w"], r["i"]) for r in read_jsonl(out)) == [(w, i) for w in "ab" for i in range(40)]


# -- an evaluation's record left alone -------------------------------------------------------------------------------
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
