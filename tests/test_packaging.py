"""The wheel is what users install: built here, installed (not editable) into a fresh virtualenv, and run from
another directory, where nothing of the checkout can stand in for what the wheel lacks."""

import shutil
import site
import subprocess
import sys
import venv

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
