"""Tests run offline: no hub, no W&B network. Tiny GPT-2 configs are built here."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from lnfree.model import NORM_KINDS, make_removable  # noqa: E402


def pytest_configure(config):
    # a slow test that `make mutation` still runs ([tool.mutmut] selects "not slow or mutation"): the only test
    # of a code path that no fast test can reach (two real processes for the cross-rank collectives)
    config.addinivalue_line("markers", "mutation: slow, but the only test of its code path; the mutation run keeps it")


def pytest_collection_modifyitems(items):
    """Under `make mutation` only: run the cheapest tests first, so that a mutant dies at the first cheap test
    that catches it instead of after a tiny training run. Cost: tests sharing a module or session fixture (a
    training run; its time is not in the test's own duration) last, then mutmut's recorded duration. Order only:
    what each test checks is unchanged, and outside mutmut the order is pytest's."""
    stats = Path("mutmut-stats.json")
    if not os.environ.get("MUTANT_UNDER_TEST") or not stats.exists():
        return
    duration = json.loads(stats.read_text()).get("duration_by_test", {})
    here = Path(__file__).resolve().parent

    def cost(item):
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        shared = any(d.scope != "function" and here in Path(d.func.__code__.co_filename).parents  # ours, not pytest's
                     for ds in defs.values() for d in ds)
        return shared, duration.get(item.nodeid, float("inf"))

    items.sort(key=cost)


def tiny_config(**kw) -> GPT2Config:
    base = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64, bos_token_id=96,
                eos_token_id=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base.update(kw)
    return GPT2Config(**base)


# -- tiny models shared by the model, export and interp tests --------------------------------------------
def stock_and_removable(**kw):
    stock = GPT2LMHeadModel(tiny_config(**kw))
    with torch.no_grad():  # non-trivial gamma/beta so that a wrong formula shows
        for m in stock.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return stock.eval(), make_removable(stock).eval()


def remove_all(model):
    L = model.config.n_layer
    for kind in NORM_KINDS[:3]:
        for i in range(L):
            model.remove(kind, i)
    model.remove("lnf")


def calibrated_all_removed(**kw):
    stock, model = stock_and_removable(**kw)
    model.calibrate(torch.randint(0, 97, (4, 32)))
    remove_all(model)
    return stock, model


def ids(b=2, t=16, seed=1):
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_cfg():
    return tiny_config()


def needs(module: str, extra: str):
    """Mark a test that needs an optional extra's module: skipped, not failed, where that extra is not installed
    (`pip install -e '.[dev]'` alone runs everything else)."""
    import importlib.util

    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs {module}: pip install -e '.[{extra}]'")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = Path(__file__).resolve().parents[1]

# A few-second CPU run: random 2-layer model, built-in corpus, every site removed by step 18 of 24.
TINY_RUN = [
    "model=tiny", "model.dropout=0.0", "schedule=builtin", "data=builtin", "data.block_size=64",
    "data.val_blocks=4", "hardware=cpu", "hardware.precision=32-true", "hardware.micro_batch_size=4",
    "trainer.max_steps=24", "trainer.val_every=12", "trainer.ckpt_every=12", "trainer.progress_bar=false",
    "logger=csv", "optim.warmup_steps=2", "optim.lr=3e-3",
]


def compose_train(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}",
                                           f"paths.cache_dir={tmp_path}/cache", *overrides])


class SimulatedCrash(RuntimeError):
    pass


def train_until_crash(cfg, monkeypatch, step: int) -> Path:
    """train(cfg) with the removal callback raising SimulatedCrash right after optimizer step `step`, as a crash
    would; returns the on-exception checkpoint the run left (what a resume starts from)."""
    from lnfree.training.callbacks import LNRemovalCallback
    from lnfree.training.run import train

    original = LNRemovalCallback.on_train_batch_end

    def crash(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == step:
            raise SimulatedCrash(f"simulated crash at step {step}")

    with monkeypatch.context() as m:
        m.setattr(LNRemovalCallback, "on_train_batch_end", crash)
        with pytest.raises(SimulatedCrash):
            train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / f"on_exception_step{step:06d}.ckpt"


def copy_export(tiny_run, tmp_path, form="hf"):
    """A copy of the shared tiny run's export/<form> under tmp_path/<form> (tests edit copies, never the run)."""
    import shutil

    _, run = tiny_run
    dst = tmp_path / form
    shutil.copytree(run / "export" / form, dst)
    return dst


def rehash(d):
    """Rewrite an export's recorded file hashes to match its files (what someone editing the record would do)."""
    from lnfree.model_record import EXPORT_INFO, file_sha256, model_files, record_text

    record = json.loads((d / EXPORT_INFO).read_text())
    record["files"] = {p.name: file_sha256(p) for p in model_files(d)}
    (d / EXPORT_INFO).write_text(record_text(record))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished TINY_RUN (every site removed, both exports), shared by the tests that only read a run:
    (summary dict, run dir). Tests must not write into it."""
    from lnfree.training.run import train

    run = tmp_path_factory.mktemp("tiny_run")
    return train(compose_train(run, *TINY_RUN)), run


# -- evaluation configs -------------------------------------------------------------------------------
def eval_cfg(tmp_path, models, datasets, **kw):
    """conf/eval.yaml (the single source of the values) with these models, datasets and overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        base = compose("eval")
    return OmegaConf.merge(base, {"models": models, "datasets": datasets, "pairs": [], "tokens": 4 * 32, "context": 32,
                                  "batch": 2, "precision": "fp32", "bootstrap": 50,
                                  "output_dir": str(tmp_path / "eval"), "cache_dir": str(tmp_path / "cache"), **kw})


def docs_file(tmp_path, n=20):
    from lnfree.data import corpus

    f = tmp_path / "docs.jsonl"
    texts = zip(corpus.iter_texts("validation"), range(n))
    f.write_text("".join(json.dumps({"text": t[:400]}) + "\n" for t, _ in texts))
    return f


def depth_records(gap_at, sizes=(("l1w32", 1000), ("l2w64", 8000), ("l3w96", 27000)), lrs=(1.5e-4, 3e-4),
                  steps=(8, 16, 32, 64, 128, 256, 512)):
    """Records in the depth grid's shape (experiments/depth_family/runs.jsonl): per size two pretrained replicates,
    the grid's arms at every LR of `lrs` (the probe's runs at the other LRs are vanilla only), and the variant arm
    on replicate 1. gap_at(size_index, replicate, steps) gives the LN-free arm's relative gap."""
    rec = []
    for i, (size, n) in enumerate(sizes):
        for rep in (1, 2):
            for lr in lrs:
                for st in steps:
                    for seed in (1, 2, 3):
                        base = {"model": f"builtin_{size}_s{rep}", "pretrained": f"{size}_s{rep}", "size": size,
                                "replicate": rep, "n_layer": i + 1, "n_embd": 32 * (i + 1), "seed": seed,
                                "steps": st, "tokens": 4096 * st, "lr": lr, "n_nonemb": n}
                        van = 4.0 + 0.001 * seed + (lr - lrs[0])
                        rec.append({**base, "schedule": "none", "removes": False, "val_ce": van,
                                    "all_removed": False, "fit_fraction": None})
                        if lr != lrs[0]:
                            continue
                        rec.append({**base, "schedule": "scaled", "removes": True, "all_removed": True,
                                    "val_ce": van * (1 + gap_at(i, rep, st)), "fit_fraction": 0.4})
                        if rep == 1:
                            rec.append({**base, "schedule": "builtin", "removes": True, "all_removed": True,
                                        "val_ce": van * (1 + 1.5 * gap_at(i, rep, st)), "fit_fraction": None})
    return rec


def write_lock(out, pid, host=None):
    """A run lock file in out as a run with this pid on this host (default: this one) writes it."""
    import socket

    from lnfree.training.run_dir import LOCK_FILE

    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                             "started": "2026-01-01 00:00:00", "command": "python -m lnfree.train"}))
    return out / LOCK_FILE


def digest(d):
    """Every file under d by relative path -> sha256 (a directory's contents, to compare byte for byte)."""
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def copy_run(tiny_run, dst):
    """A copy of the shared tiny run's dir at dst."""
    import shutil

    _, run = tiny_run
    shutil.copytree(run, dst)
    return dst


def weights_never_loaded(monkeypatch):
    """Fail the test if the run loads the model's weights: what it checks must come before."""
    import lnfree.training.run as tr

    monkeypatch.setattr(tr, "load_model", lambda *a, **k: pytest.fail("the model's weights were loaded"))


def local_files(tmp_path, n=40):
    """train.jsonl (n built-in training documents, 400 characters each) and val.jsonl (the built-in validation
    documents, 1,500 characters each) in tmp_path, for data=local_text."""
    from lnfree.data import corpus

    texts = [t[:400] for t, _ in zip(corpus.iter_texts("train"), range(n))]
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    val_file.write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in corpus.iter_texts("validation")))
    return train_file, val_file


@pytest.fixture(autouse=True)
def no_hydra_state_between_tests():
    """Hydra keeps the config of the last app run in this process (HydraConfig, a singleton) after it returns; in a
    real command there is one app per process, so code may ask HydraConfig whether it runs inside a Hydra job. A
    test that runs an app in-process must not make the next test's plain train(cfg) look like one."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None


def free_port() -> int:
    """A TCP port on localhost that nothing listens on, for a gloo process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(worker, out_dir) -> tuple[dict, dict]:
    """Run worker(rank, port, out_dir) as a two-rank gloo group: rank 1 in a spawned process (forking one that has
    run other tests' threads can deadlock), rank 0 here, so the functions under test run in the test's own
    process. Returns what each rank wrote to out_dir/rank<r>.json."""
    import multiprocessing

    port = free_port()
    other = multiprocessing.get_context("spawn").Process(target=worker, args=(1, port, out_dir))
    other.start()
    worker(0, port, out_dir)
    other.join(120)
    assert other.exitcode == 0
    return tuple(json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in (0, 1))


def save_own_gpt2(d, tok, n_layer: int):
    """A user's own GPT-2 dir as save_pretrained writes it: 128 positions, width 32, 2 heads, with `tok`."""
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=n_layer, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d
