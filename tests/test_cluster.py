"""cluster=slurm|local: multiruns through hydra-submitit-launcher. Here submitit's local launcher runs a 2-job
multirun end to end (the same submission path as SLURM, as processes on this machine)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RUN, compose_train

import lnfree.training.config  # noqa: F401  (registers the schemas)

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_slurm_launcher_takes_nodes_gpus_time_and_partition_from_config_groups(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["cluster=slurm", "hardware=multinode", "cluster.partition=gpu",
                                          "cluster.time_min=90"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == \
        (cfg.hardware.num_nodes, cfg.hardware.devices, cfg.hardware.devices)
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 90)
    assert compose_train(tmp_path).cluster.name == "none"  # the default: Hydra's basic launcher


@pytest.mark.slow
def test_local_submitit_multirun_runs_both_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lnfree.train", "-m", "cluster=local", *TINY_RUN, "seed=1,2",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path}/cache"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (sweep / ".submitit").is_dir()  # submitted through submitit, not run in this process
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert sorted(s["config"]["seed"] for s in summaries) == [1, 2]
    assert all(s["all_removed"] for s in summaries)
