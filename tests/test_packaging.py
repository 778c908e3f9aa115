"""The wheel is what users install: built here, installed (not editable) into a fresh virtualenv, and run from
another directory, where nothing of the checkout can stand in for what the wheel lacks."""

import shutil
import site
import subprocess
import sys
import venv
import zipfile

import pytest
from conftest import ROOT

from lnfree.paths import CONF_DIR


@pytest.mark.slow
def test_the_wheel_installs_and_trains_and_evaluates_from_another_directory(tmp_path):
    src, dist = tmp_path / "src", tmp_path / "dist"  # built from a copy: the build leaves build/ in its source
    for part in ("lnfree", "conf"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / part, src / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                   check=True, capture_output=True, timeout=600)
    wheel, = dist.glob("lnfree-*.whl")
    # it ships the built-in default and the Llama and NeoX members, not the study's other members
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/")[2] for n in names if n.startswith("lnfree/pretrained/")}
    assert shipped == {"w128", "llama_w128", "neox_w128"} and wheel.stat().st_size < 15e6, (shipped, wheel.stat())
    # one tokenizer.json, the built-in tokenizer's, which the shipped models read (lnfree.model_record.model_file)
    assert [n for n in names if n.endswith("/tokenizer.json")] == ["lnfree/data/corpus_data/tokenizer/tokenizer.json"]
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # the dependencies come from this environment's site-packages (a path, not a site dir: its editable lnfree
    # finder is not loaded), so that nothing is downloaded; lnfree itself only from the wheel
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / "venv_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (tmp_path / "venv_deps.pth").rename(f"{purelib}/lnfree_test_deps.pth")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import lnfree, lnfree.paths as p; print(lnfree.__file__); print(p.CONF_DIR)"
    where = subprocess.run([str(py), "-c", code], cwd=elsewhere, check=True, capture_output=True,
                           text=True).stdout.split()
    assert where[0].startswith(str(env_dir)) and where[1].startswith(str(env_dir)), where  # the wheel's, not ours
    script = subprocess.run([str(env_dir / "bin" / "lnfree"), "--help"], cwd=elsewhere, capture_output=True,
                            text=True, timeout=300)  # the console script the wheel installs
    assert script.returncode == 0 and "\n  train " in script.stdout, script.stdout + script.stderr
    missing = subprocess.run([str(py), "-c", f"import lnfree; lnfree.resolve('builtin:w48', {str(tmp_path)!r})"],
                             cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert "not pretrained yet" in missing.stderr and "lnfree.pretrain model=builtin_w48" in missing.stderr, \
        missing.stderr[-2000:]  # a member the wheel leaves out names the command that makes it
    shipped_tok = subprocess.run([str(py), "-c", "import lnfree; print(len(lnfree.load('builtin:llama_w128')[1]))"],
                                 cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert shipped_tok.stdout.split()[-1:] == ["4096"], shipped_tok.stderr[-2000:]  # its tokenizer, from the wheel
    run = elsewhere / "run"
    train = subprocess.run([str(py), "-m", "lnfree.train", "model=tiny", "data.block_size=64", "data.val_blocks=2",
                            "hardware.micro_batch_size=2", "trainer.max_steps=2", "trainer.val_every=2",
                            "trainer.ckpt_every=2", "schedule.fit_fraction=0.5", "trainer.progress_bar=false",
                            f"hydra.run.dir={run}"], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert (run / "export" / "folded").is_dir()
    ev = subprocess.run([str(py), "-m", "lnfree.eval", f"models=[{{name: run, path: {run}}}]", "tokens=512",
                         "pairs=[]", f"output_dir={elsewhere / 'eval'}", f"hydra.run.dir={elsewhere / 'eval_run'}"],
                        cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    assert (elsewhere / "eval" / "results.json").exists()


def test_a_source_checkout_reads_the_repository_configs():
    assert CONF_DIR == ROOT / "conf" and (CONF_DIR / "train.yaml").exists()


def test_every_package_of_the_source_tree_is_listed_for_the_wheel():
    """pyproject lists its packages explicitly (conf/ maps to lnfree.conf): a new subpackage missing from the list
    would be left out of the wheel and `import lnfree` would fail there (fast check; the slow test installs one)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lnfree").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_repository_tooling_is_not_in_the_wheel_and_the_package_never_imports_it():
    """tools/ (make tables, make paper, the mutation report) rewrites this repository's docs: the wheel ships only
    lnfree, and no lnfree module imports tools (an installed lnfree would fail there)."""
    import ast

    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert all(p.split(".")[0] == "lnfree" for p in listed), listed
    found = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in (ROOT / "lnfree").rglob("*.py")
             for n in ast.walk(ast.parse(p.read_text()))
             if (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "tools" for a in n.names))
             or (isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").split(".")[0] == "tools")]
    assert found == []


# `pip install lnfree` without extras: a tiny GPT-2 made removable, every site removed, exported and loaded back
CORE_ONLY = """
import sys, tempfile, torch
from transformers import GPT2Config, GPT2LMHeadModel
from lnfree import export_hf, load, make_removable
from lnfree.model import parse_site_name
model = make_removable(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                                  bos_token_id=63, eos_token_id=63))).eval()
ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
model.calibrate(ids)
for name in model.sites():
    model.remove(*parse_site_name(name))
out = tempfile.mkdtemp()
export_hf(model, out)
loaded, _ = load(out)
assert type(loaded) is GPT2LMHeadModel and torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)
print("core ok")
"""


def extras_only_modules(kept: tuple[str, ...] = ()) -> set[str]:
    """The top-level modules, as installed here, of the distributions that only pyproject's extras bring: every
    extra's requirements and theirs, less everything the core's requirements and the `kept` extras' install
    (transitively)."""
    import re
    from importlib import metadata

    import tomllib
    from packaging.requirements import Requirement

    def canon(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    installed = {canon(d.metadata["Name"]): d for d in metadata.distributions()}

    def closure(names):
        seen, todo = set(), [canon(n) for n in names]
        while todo:
            if (name := todo.pop()) in seen or name == "lnfree" or name not in installed:
                continue  # (an extra's package not installed here: nothing of it to hide)
            seen.add(name)
            reqs = [Requirement(r) for r in installed[name].requires or []]
            todo += [canon(r.name) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
        return seen

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {e: [Requirement(r) for r in reqs] for e, reqs in project["optional-dependencies"].items()}

    def of(extra):  # an extra's requirements, lnfree[other] expanded
        return [q for r in extras[extra] for q in ([q for e in r.extras for q in of(e)] if r.name == "lnfree" else [r])]

    core = closure([Requirement(r).name for r in project["dependencies"]] + [r.name for e in kept for r in of(e)])
    only = closure(r.name for e in extras for r in of(e)) - core
    return {m for m, dists in metadata.packages_distributions().items() if {canon(d) for d in dists} <= only}


def test_the_core_runs_without_any_extra(tmp_path):
    """What `pip install lnfree` promises (README): lnfree.load, make_removable and export_hf with none of the
    extras' packages importable (each hidden from the import system of a fresh interpreter, as if not installed)."""
    hidden = extras_only_modules()
    assert {"lightning", "hydra", "omegaconf", "wandb", "datasets", "scipy", "matplotlib"} <= hidden
    hide = f"import sys\nsys.modules.update(dict.fromkeys({sorted(hidden)!r}))\n"
    run = subprocess.run([sys.executable, "-c", hide + CORE_ONLY], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "core ok" in run.stdout, run.stderr[-3000:]


def test_lnfree_eval_and_the_analyses_need_only_the_analysis_extra(tmp_path):
    """`pip install 'lnfree[analysis]'`: lnfree eval and every command that lnfree.cli.NEEDS gives to [analysis]
    import without the training stack (Lightning, W&B hidden), and eval of a model that is not a training run draws
    no training curves (the only part of it that reads Lightning's logs)."""
    hidden = extras_only_modules(kept=("analysis",))
    assert {"lightning", "wandb"} <= hidden and not {"hydra", "scipy", "matplotlib"} & hidden
    script = """
import importlib, tempfile
from pathlib import Path
from lnfree import cli
from lnfree.analysis.plots import plot_training_curves
flat = [([n], c) for n, c in cli.COMMANDS.items() if isinstance(c, cli.Command)]
flat += [([g, n], c) for g, t in cli.COMMANDS.items() if isinstance(t, dict) for n, c in t.items()]
modules = ["lnfree.eval", *(c.module for words, c in flat if cli.needs(words) == "analysis")]
for m in modules:
    importlib.import_module(m)
assert plot_training_curves({"a": "builtin:w128"}, Path(tempfile.mkdtemp()) / "c.png") is False
print("analysis ok", modules)
"""
    hide = f"import sys\nsys.modules.update(dict.fromkeys({sorted(hidden)!r}))\n"
    run = subprocess.run([sys.executable, "-c", hide + script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "lnfree.analysis.scaling" in run.stdout, run.stderr[-3000:]
