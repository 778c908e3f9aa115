"""What runs, their artifacts and their model cards are called: a custom model by its dir (not by the model option
it came through), every name within W&B's limits, and a W&B offline run of such a model named after it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, save_own_gpt2


def test_a_custom_model_is_named_by_its_dir_and_names_fit_wandb(tmp_path):
    from lnfree.training.loggers import WANDB_NAME_MAX, artifact_name, run_name
    from lnfree.training.model_source import model_label

    long_dir = tmp_path / ("very_long_parent_" * 8) / ("my_gpt2_" + "x" * 80)
    long_dir.mkdir(parents=True)
    label = model_label({"name": "builtin_w128", "source": str(long_dir)})
    assert label.startswith("my_gpt2_") and len(label) <= 48
    assert label == model_label({"name": "builtin_w128", "source": str(long_dir)})  # stable
    assert label != model_label({"name": "builtin_w128", "source": str(long_dir) + "y"})  # the hash tells apart
    assert model_label({"name": "builtin_w128", "source": str(tmp_path)}) == tmp_path.name
    # an option's own source keeps its name; another source is named by itself
    assert model_label({"name": "gpt2_medium", "source": "gpt2-medium"}) == "gpt2_medium"
    assert model_label({"name": "builtin_w128", "source": "builtin:w128"}) == "builtin_w128"
    assert model_label({"name": "builtin_w128", "source": "builtin:w64"}) == "builtin_w64"
    assert model_label({"name": "builtin_w128", "source": "openai-community/gpt2"}) == "openai-community/gpt2"
    run = run_name(label, "builtin", 1234, "full", "trainer.max_steps=10," + "data.files=[/x/" + "y" * 200 + "]")
    assert len(run) <= WANDB_NAME_MAX and run.startswith(label)
    for suffix in ("-summary", "-export"):
        name = artifact_name(run, suffix)
        assert len(name) <= WANDB_NAME_MAX and name.endswith(suffix)
        assert all(c.isalnum() or c in "-_." for c in name)


def _own_gpt2(d):
    """A user's own GPT-2 dir: 2 layers, 128 positions, the built-in tokenizer saved with it."""
    from lnfree.io import load_tokenizer

    return save_own_gpt2(d, load_tokenizer("builtin"), n_layer=2)


@pytest.mark.slow
def test_wandb_offline_run_of_a_custom_model_in_a_long_path_finishes_named_after_it(tmp_path):
    """The documented own-model command (docs/reference/training.md) with logger=wandb, from the command line (W&B
    offline: this machine has no network, and tests never go online): it exits 0, and the run, its artifacts, its
    model card and its figure's legend are named after the model's dir."""
    from lnfree.data import corpus

    model_dir = _own_gpt2(tmp_path / ("a_rather_long_directory_name_" * 4) / "my_own_gpt2")
    text = next(iter(corpus.iter_texts("validation")))
    data = tmp_path / "docs.jsonl"  # 60 documents of 1,000 characters
    data.write_text("".join(json.dumps({"text": text[i:i + 1000]}) + "\n" for i in range(0, 60_000, 1000)))
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    args = [f"model.source={model_dir}", "data=local_text", f"data.files=[{data}]", "logger=wandb",
            "logger.mode=offline", f"hydra.run.dir={run}",
            "trainer.max_steps=10", "trainer.val_every=10", "trainer.ckpt_every=10", "schedule.fit_fraction=0.5",
            "data.val_blocks=2", "hardware.micro_batch_size=2", "trainer.progress_bar=false",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    p = subprocess.run([sys.executable, "-m", "lnfree.train", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "my_own_gpt2"
    assert summary["config"]["data"]["block_size"] == 128  # the model's context, not the data option's
    assert (run / "export" / "hf" / "README.md").read_text().startswith("---") and \
        "# my_own_gpt2 LN-free" in (run / "export" / "hf" / "README.md").read_text()
    assert "builtin_w128" not in (run / "export" / "hf" / "README.md").read_text()
    assert (run / "training_curves.png").exists()
    import time

    deadline = time.time() + 120  # wandb's service process may still be writing the run's log
    while True:
        log = next((run / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
        if b"-export" in log or time.time() > deadline:
            break
        time.sleep(1)
    import re

    assert b"my_own_gpt2-builtin-s1234-data=local_text," in log  # the run: model-schedule-seed-overrides
    for suffix in (b"summary", b"export"):  # its artifacts, within W&B's 128 characters
        assert re.search(rb"my_own_gpt2-builtin-s1234-data_local_text_[\w.-]{0,90}-" + suffix, log)
    assert "[lnfree] progress: step 10/10" in p.stdout  # progress bars off: plain lines
