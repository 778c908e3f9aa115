"""The benchmark scripts themselves must keep working (their timings are not asserted: `make bench`)."""

import json
import logging
import os
import warnings

import pytest


@pytest.mark.slow
def test_cpu_bench_runs_and_counts_no_syncs(tmp_path):
    from lnfree.bench import cpu as bench

    out = tmp_path / "cpu.json"
    bench.main(["--reps", "1", "--shapes", "builtin_2x128", "--out", str(out)])
    res = json.loads(out.read_text())
    r = res["train_step"]["builtin_2x128"]["fp32"]["ratio_to_stock"]
    assert set(r) == {"all_real", "mid_schedule", "all_removed"} and all(v > 0 for v in r.values())
    syncs = res["host_syncs"]["builtin_2x128"]
    assert syncs["all_real"] == syncs["all_removed"] == syncs["stock"]


@pytest.mark.slow
def test_gpu_bench_dry_run_records_every_part_and_a_failing_one(tmp_path):
    """`python -m lnfree.bench.gpu --dry-run`: every part of the GPU check (bf16-mixed single device and FSDP2,
    removal on / off, save + resume, folded inference) runs on CPU, and a part that fails is recorded with its
    error while the parts after it still run."""
    from lnfree.bench import gpu as bench_gpu

    parts = bench_gpu.plan(dry_run=True, steps=8)
    broken = bench_gpu.Part("train:broken", "train", 60, [*parts[0].overrides, "data.block_size=100000"])
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--dry-run", "--out", str(out), "--tmp", str(tmp_path / "runs")], parts=[broken, *parts])
    res = json.loads(out.read_text())
    assert res["finished"] and res["mode"] == "dry-run"
    assert list(res["parts"]) == [broken.name, *(p.name for p in parts)]
    assert res["parts"]["train:broken"]["status"] == "error" and "block_size" in res["parts"]["train:broken"]["error"]
    ok = {k: v for k, v in res["parts"].items() if k != "train:broken"}
    assert all(v["status"] == "ok" and v["error"] is None for v in ok.values()), {k: v["error"] for k, v in ok.items()}
    train = {k.split(":")[1]: v["result"] for k, v in ok.items() if v["kind"] == "train"}
    assert set(train) == {"tiny-single-no_removal", "tiny-single-removal", "tiny-fsdp-no_removal", "tiny-fsdp-removal"}
    for name, r in train.items():
        assert r["precision"] == "bf16-mixed" and r["strategy"] == ("fsdp" if "fsdp" in name else "auto")
        assert r["all_removed"] == name.endswith("-removal") and r["tokens_per_s"] > 0
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / bench_gpu.PEAK_FLOPS["cpu"]["bf16"])
    resume = ok["resume"]["result"]
    assert resume["same_sigmas"] and resume["val_ce_resumed"] == pytest.approx(resume["val_ce_full"], abs=1e-3)
    folded = ok["folded:tiny"]["result"]["fp32"]
    assert set(folded["tokens_per_s"]) == {"stock", "folded"} and all(v > 0 for v in folded["tokens_per_s"].values())
    import torch.distributed as dist

    assert not dist.is_initialized()  # the FSDP parts' process group does not outlive them,
    assert "MASTER_PORT" not in os.environ  # nor its address, which child processes would try to join


def test_gpu_bench_real_plan_composes_and_passes_the_config_checks(tmp_path):
    """Every training part of the real GPU run composes (no misspelt override) and passes the checks that need
    no weights and no data; the parts' time limits fit the budget of a 15-minute device session."""
    from lnfree.bench import gpu as bench_gpu
    from lnfree.training.run import check_config

    parts = bench_gpu.plan(dry_run=False, steps=30)
    for p in parts:
        if p.kind in ("train", "resume"):
            cfg = bench_gpu.compose_part(tmp_path, p, p.overrides)
            assert cfg.hardware.accelerator == "gpu" and cfg.hardware.precision == "bf16-mixed"
            check_config(cfg)
    assert {p.name for p in parts} >= {"train:gpt2_medium-fsdp-removal", "resume", "folded:gpt2_small"}
    assert bench_gpu.BUDGET_S < 8 * 60 and all(p.timeout_s < bench_gpu.BUDGET_S for p in parts)


def test_mfu_uses_the_stated_peak_and_the_model_flops():
    from lnfree.bench.gpu import PEAK_FLOPS, flops_per_token, mfu, peak_flops

    assert peak_flops("NVIDIA H200", "bf16") == PEAK_FLOPS["H200"]["bf16"] and peak_flops("TPU", "bf16") is None
    # GPT-2 small at 1024 tokens: 6 x (85M non-embedding + 38.6M unembedding) + 12 x 12 x 1024 x 768 per token
    f = flops_per_token(12, 768, 1024, 50257, 85_056_000, training=True)
    assert f == 6 * (85_056_000 + 50257 * 768) + 12 * 12 * 1024 * 768
    assert flops_per_token(12, 768, 1024, 50257, 85_056_000, training=False) * 3 == f  # a forward: a third
    assert mfu(f, 1e5, 1e15) == f * 1e5 / 1e15 and mfu(f, None, 1e15) is None and mfu(f, 1e5, None) is None


def test_bench_models_build_without_warnings(caplog):
    """The benchmark's configs are self-consistent: bos/eos inside the vocabulary, no warning while building."""
    from lnfree.bench.cpu import SHAPES, bench_config, build_models

    logging.getLogger("transformers").addHandler(caplog.handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for s in SHAPES.values():
                c = bench_config(s["cfg"])
                assert 0 <= c.bos_token_id < c.vocab_size and 0 <= c.eos_token_id < c.vocab_size
            build_models(SHAPES["builtin_2x128"]["cfg"])
            build_models(SHAPES["builtin_2x128"]["cfg"], folded=True)
    finally:
        logging.getLogger("transformers").removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_alternate_rotates_the_order_and_paired_ratios_pair_repetitions():
    from lnfree.bench.cpu import alternate, paired_ratios

    order = []
    times = alternate({k: (lambda k=k: order.append(k)) for k in "ABC"}, reps=3, warmup=0)
    assert order == list("ABCBCACAB") and {k: len(v) for k, v in times.items()} == {"A": 3, "B": 3, "C": 3}
    spread = paired_ratios({"stock": [1.0, 2.0, 4.0, 1.0], "x": [1.5, 2.0, 4.0, 3.0]})["x"]
    assert spread["n"] == 4 and (spread["min"], spread["max"]) == (1.0, 3.0)  # per repetition: 1.5, 1, 1, 3
    assert spread["median"] == 1.25 and spread["ratio_of_medians"] == 2.5 / 1.5  # medians 2.5 and 1.5


def test_passes_agree_when_each_median_is_inside_the_others_quartiles():
    from lnfree.bench.cpu import passes_agree

    a, b = {"q25": 0.90, "median": 0.95, "q75": 1.00}, {"q25": 0.93, "median": 0.97, "q75": 0.99}
    assert passes_agree([a, b]) and passes_agree([a])
    assert not passes_agree([a, {"q25": 0.94, "median": 1.01, "q75": 1.05}])  # 1.01 is above a's q75
    assert not passes_agree([{"q25": 0.96, "median": 0.97, "q75": 0.98}, a])  # a's median is below its q25


def test_readme_table_is_made_from_the_json_of_one_or_more_runs():
    from lnfree.bench.cpu import table

    spread = {"q25": 0.9, "median": 0.95, "q75": 1.0, "n": 10, "ratio_of_medians": 0.95, "min": 0.8, "max": 1.1}
    other = {**spread, "q25": 1.05, "median": 1.1, "q75": 1.2}

    def run(load, passes):
        return {"machine": {"cpu": "X", "cores": 2, "threads": 1, "torch": "t", "native_bf16": False,
                            "loadavg_before": [load, 0, 0], "loadavg_after": [load + 1, 0, 0]}, "clock": "thread",
                "inference": {"s": {"batch": 2, "context": 8, "passes": [
                    {"median_s": {"stock": 0.25}, "spread": spread, "spread_vs_fused_gelu": v} for v in passes]}}}

    res = {**run(1.0, [spread]),
           "train_step": {"s": {"fp32": {"reps": 3, "median_s": {"stock": 0.5},
                                         "spread": {k: spread for k in ("all_real", "mid_schedule", "all_removed")}}}},
           "eval": {"s": {"batch": 2, "context": 8, "fp32": {"tokens_per_s": {"stock": 100.0, "folded": 150.0}}}}}
    r2 = {**run(3.0, [other]), "eval": {},
          "train_step": {"s": {"fp32": {**res["train_step"]["s"]["fp32"], "reps": 5}}}}
    text = table(res)
    assert "| s | fp32 | 3 | 0.950 [0.900, 1.000] |" in text
    assert "| s | 2 x 8 | fp32 | 100 | 150 | 1.50 |" in text and "| s | | passes agree | | yes | yes | |" in text
    assert "CPU time of the one compute thread" in text and "load average 1.00 before, 2.00 after" in text
    # a second run's forward passes join the table, and agreement is judged over all of them
    text = table(res, [r2])
    assert "| s | 2 x 8 | run 1, 1 | 10 |" in text and "| s | 2 x 8 | run 2, 1 | 10 | 0.950" in text
    assert "| s | | passes agree | | yes | no | |" in text and "Run 2: load average 3.00 before" in text
    assert "| s (run 1) | fp32 | 3 |" in text and "| s (run 2) | fp32 | 5 |" in text


@pytest.mark.slow
def test_profile_separates_the_models_operators_and_times_the_norm_paths(tmp_path):
    """`python -m lnfree.bench.profile`: per-operator profiles of stock, stock with the fused GELU and the folded
    model (which runs no LayerNorm and no unfused GELU chain), the training step of stock and all removed, and
    the norm paths' timing; the README's tables are made from its JSON."""
    from lnfree.bench import profile as prof

    out = tmp_path / "profile.json"
    prof.main(["--shapes", "builtin_2x128", "--train", "builtin_2x128", "--steps", "1", "--norm-reps", "2",
               "--out", str(out)])
    res = json.loads(out.read_text())
    ops = res["forward"]["builtin_2x128"]["ops"]
    assert "aten::native_layer_norm" in ops["stock"] and "aten::native_layer_norm" not in ops["folded"]
    assert "aten::tanh" in ops["stock"] and "aten::tanh" not in ops["stock_fused_gelu"]
    assert "aten::gelu" in ops["stock_fused_gelu"] and "aten::gelu" in ops["folded"]
    train = res["train_step"]["builtin_2x128"]["ops"]
    assert "aten::native_layer_norm_backward" in train["stock"]
    assert "aten::native_layer_norm_backward" not in train["all_removed"]
    n = res["norm_paths"]["builtin_2x128"]
    assert n["n_layer"] == 2 and all(v > 0 for v in n["median_s"].values())
    m = n["median_s"]
    assert n["extra_s_per_step"] == pytest.approx(2 * (m["removed_block"] - m["stock_block"])
                                                  + m["removed_lnf"] - m["stock_lnf"])
    text = prof.table(res)
    assert "| builtin_2x128 | forward | folded |" in text and "ms per block in stock GPT-2" in text
