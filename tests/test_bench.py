"""The benchmark scripts themselves must keep working (their timings are not asserted: `make bench`)."""

import json

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
def test_gpu_bench_script_smoke_on_cpu(tmp_path):
    from lnfree.bench import gpu as bench_gpu

    out = tmp_path / "gpu.json"
    bench_gpu.main(["--smoke", "--out", str(out), "--tmp", str(tmp_path / "runs")])
    res = json.loads(out.read_text())
    assert len(res["runs"]) == 2 and all(r["tokens_per_s"] > 0 for r in res["runs"])
    assert res["runs"][1]["all_removed"] and not res["runs"][0]["all_removed"]
    assert res["resume"]["same_sigmas"]
    assert abs(res["resume"]["val_ce_full"] - res["resume"]["val_ce_resumed"]) < 1e-3


def test_alternate_rotates_the_order_and_paired_ratios_pair_repetitions():
    from lnfree.bench.cpu import alternate, paired_ratios

    order = []
    times = alternate({k: (lambda k=k: order.append(k)) for k in "ABC"}, reps=3, warmup=0)
    assert order == list("ABCBCACAB") and {k: len(v) for k, v in times.items()} == {"A": 3, "B": 3, "C": 3}
    spread = paired_ratios({"stock": [1.0, 2.0, 4.0, 1.0], "x": [1.5, 2.0, 4.0, 3.0]})["x"]
    assert spread["n"] == 4 and (spread["min"], spread["max"]) == (1.0, 3.0)  # per repetition: 1.5, 1, 1, 3
    assert spread["median"] == 1.25 and spread["ratio_of_medians"] == 2.5 / 1.5  # medians 2.5 and 1.5
