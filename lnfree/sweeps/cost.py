"""CPU cost of the depth family's study: measured seconds per step, and the plan's arithmetic from the grid.

    python -m lnfree.sweeps.cost --measure    (one thread: CPU seconds per training step -> step_cost.json)
    python -m lnfree.sweeps.cost              (the plan: pretraining + LR probe + grid, in CPU hours)

A step is one optimizer step of 16 x 256 tokens (forward, backward, AdamW) of a GPT-2 with the built-in 4096-token
vocabulary and 256 positions, dropout 0.1, fp32, torch.set_num_threads(1); timed by process CPU time (the machine
is shared, so wall time per step depends on the load; CPU time much less), 4 steps after one warm-up step. The
per-run cost model (validation and overheads) is run_missing's, which also prices what is left of the grid.
"""

from __future__ import annotations

import argparse
import json
import time

from . import lr_probe as probe
from . import pretrain_depth as mf
from . import run_missing as rm
from .run_missing import PROCESS_OVERHEAD_S, RUN_OVERHEAD_S, VAL_STEPS

COST_FILE = rm.STEP_COST
CANDIDATES = [(1, 32), (2, 64), (3, 96), (4, 128), (1, 64), (2, 96), (6, 192), (8, 256)]


def measure() -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lnfree.families import GPT2, family

    torch.set_num_threads(1)
    res = {}
    for n_layer, d in CANDIDATES:
        torch.manual_seed(0)
        # the depth family's members: GPT-2 proportions (conf/model/builtin_l*w*.yaml), context 256
        m = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_layer=n_layer, n_embd=d, n_head=max(1, d // 32),
                                       bos_token_id=0, eos_token_id=0, **{GPT2.ctx_field: 256}))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        x = torch.randint(0, 4096, (16, 256))

        def step(m=m, x=x, opt=opt):  # this shape's model, batch and optimizer
            m(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()

        step()
        t, w = time.process_time(), time.time()
        for _ in range(4):
            step()
        embeddings = set(family(m.config).embedding_names)
        nonemb = sum(p.numel() for n, p in m.named_parameters() if n not in embeddings)
        cpu, wall = (time.process_time() - t) / 4, (time.time() - w) / 4
        res[f"l{n_layer}w{d}"] = {"n_layer": n_layer, "n_embd": d, "non_embedding_params": nonemb,
                                  "cpu_s_per_step": cpu, "wall_s_per_step": wall}
        print(f"l{n_layer}w{d}", res[f"l{n_layer}w{d}"], flush=True)
    return res


def plan(cost: dict) -> dict:
    from omegaconf import OmegaConf

    g = rm.depth_grid()
    pre = OmegaConf.load(rm.ROOT / "conf/pretrain_depth.yaml").trainer.val_every
    sizes = {}
    for m in g["models"]:
        steps = OmegaConf.load(rm.ROOT / "conf/model" / f"{m}.yaml").pretrain_steps
        c = cost[rm.size_of(m)]["cpu_s_per_step"]
        reps = sum(opt == m for opt, _, _ in mf.members())
        pretrain_s = reps * c * (steps + VAL_STEPS * steps / pre)
        # the probe's extra LRs (its runs at the chosen LR are the grid's seed-1 vanilla runs of its replicate)
        probe_jobs = [j for j in probe.probe_jobs([], {**g, "models": [m]}) if j[4] != g["lr_grid"][0]]
        grid_jobs = rm.depth_jobs([], {m: {"lr": g["lr_grid"][0]}}, {**g, "models": [m]})
        runs = sum(len(j[5]) for j in grid_jobs + probe_jobs)
        steps_ft = sum(j[0] * len(j[5]) for j in grid_jobs + probe_jobs)
        finetune_s = c * (steps_ft + VAL_STEPS * runs) + RUN_OVERHEAD_S * runs + PROCESS_OVERHEAD_S * len(
            grid_jobs + probe_jobs)
        ext = rm.stage2_jobs(set(), {m: {"lr": g["lr_grid"][0]}}, {**g, "models": [m]})
        ext_runs, ext_steps = sum(len(j[5]) for j in ext), sum(j[0] * len(j[5]) for j in ext)
        ext_s = c * (ext_steps + VAL_STEPS * ext_runs) + RUN_OVERHEAD_S * ext_runs + PROCESS_OVERHEAD_S * len(ext)
        sizes[m] = {"cpu_s_per_step": c, "pretrain_cpu_h": pretrain_s / 3600, "finetune_runs": runs,
                    "finetune_steps": steps_ft, "finetune_cpu_h": finetune_s / 3600,
                    "extension_runs": ext_runs, "extension_steps": ext_steps, "extension_cpu_h": ext_s / 3600}
    pre_h = sum(s["pretrain_cpu_h"] for s in sizes.values())
    ft_h = sum(s["finetune_cpu_h"] for s in sizes.values())
    return {"sizes": sizes, "pretrain_cpu_h": pre_h, "finetune_cpu_h": ft_h, "total_cpu_h": pre_h + ft_h,
            "extension_budgets": g["stage2"]["budgets"],
            "extension_cpu_h": sum(s["extension_cpu_h"] for s in sizes.values()),
            "wall_h_on_2_idle_cores": pre_h / 2 + ft_h / 2,
            "note": "pretraining runs two one-thread processes at a time (make family-depth), the probe and grid "
                    "two; the probe's runs at the chosen LR are the grid's, counted once"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true")
    a = p.parse_args(argv)
    if a.measure:
        COST_FILE.write_text(json.dumps(measure(), indent=1))
    res = plan(json.loads(COST_FILE.read_text()))
    for m, s in res["sizes"].items():
        print(f"{m:16s} {s['cpu_s_per_step']:.2f} CPU s/step  pretraining {s['pretrain_cpu_h']:.2f} CPU h  "
              f"fine-tuning {s['finetune_runs']} runs, {s['finetune_steps']} steps, {s['finetune_cpu_h']:.2f} CPU h")
    print(f"total: pretraining {res['pretrain_cpu_h']:.1f} + fine-tuning {res['finetune_cpu_h']:.1f} = "
          f"{res['total_cpu_h']:.1f} CPU h; on 2 idle cores about {res['wall_h_on_2_idle_cores']:.1f} h")
    print(f"stage 2 (budgets per size {res['extension_budgets']} steps, "
          f"run_missing --extend): "
          f"{sum(s['extension_runs'] for s in res['sizes'].values())} runs, {res['extension_cpu_h']:.1f} CPU h")


if __name__ == "__main__":
    main()
