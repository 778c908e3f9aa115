"""Make the depth-and-width family: restore committed members into the cache, pretrain the missing ones.

    python -m lnfree.sweeps.pretrain_depth            (lnfree sweep pretrain-depth; make family-depth runs this)
    python -m lnfree.sweeps.pretrain_depth --save      (copy finished members into the repo, to commit)
    python -m lnfree.sweeps.pretrain_depth --dry-run   (what it would do)
    python -m lnfree.sweeps.pretrain_depth --snapshot  (copy unsettled members' resume state into the repo)

The members are conf/experiment/data_scaling_depth.yaml's sizes x replicates, smallest first. For each one:
- in the cache (<cache>/models/<name>) with the weights conf/pretrain_depth.yaml's model.pretrain_keep says to keep:
  nothing to do; kept under another rule and its finished run dir still there: exported again from the run dir,
  without training (lnfree/training/pretrain_run.py); with no run dir: left as it is, and said so;
- committed in experiments/depth_family/models/<name>/: copied into the cache (weights, config, tokenizer config,
  pretrain_info.json) with the built-in tokenizer's tokenizer.json, which the repo holds once, not per member
  (lnfree.model_record.model_file): a whole HF dir, as pretraining writes it;
- else, when its run dir is missing and experiments/depth_family/partial/<name>/ holds a snapshot of a member not
  yet settled (`--snapshot`: an unfinished pretraining or segment, or a finished one still to be continued), the run
  dir is restored from it and the pretraining resumes there (a finished one is exported again, then continued);
- else pretrained by `python -m lnfree.pretrain --config-name pretrain_depth model=<size> model.replicate=<r>`
  into the run dir <cache>/pretrain_runs/<name>, one-thread processes, `--jobs` at a time; a run killed half-way resumes
  from its last checkpoint (lnfree/training/pretrain_run.py), so stopping and rerunning loses at most 100 steps.
Replicates: 1 and 2 for every size; when a size's finished replicates hold exactly one not converged (the
criterion of conf/pretrain_depth.yaml, recorded in each member's pretrain_info.json), replicate 3 and then 4 join
until two are converged (experiments/depth_family/README.md). Both 1 and 2 not converged: nothing added (the size
needs a longer recipe or is dropped, a decision the README records).
Wall time per member is appended to <cache>/pretrain_runs/times.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..analysis.family import DEPTH_TOL, MOST_REPLICATES, MOST_STEPS, replicates_needed, verdict, window_gain
from ..model_record import SHARED_TOKENIZER_FILE, add_shared_files, file_sha256
from ..paths import DEFAULT_CACHE_DIR, RUN_SUMMARY
from ..paths import SOURCE_ROOT as ROOT
from ..references import BUILTIN_PREFIX, builtin_dir
from .run_missing import one_thread_env

EXPERIMENT = ROOT / "conf/experiment/data_scaling_depth.yaml"
RECIPE = ROOT / "conf/pretrain_depth.yaml"
REPO_MODELS = ROOT / "experiments/depth_family/models"
PARTIAL = ROOT / "experiments/depth_family/partial"
# what a member is committed as: its tokenizer.json is the built-in tokenizer's, read from there
# (lnfree.model_record.model_file)
KEEP_FILES = ("config.json", "generation_config.json", "model.safetensors", "lnfree_export.json",
              "tokenizer_config.json", "pretrain_info.json")


def members(experiment: Path = EXPERIMENT) -> list[tuple[str, int, str]]:
    """(model option, replicate, built-in name) for every member, in the grid's order of sizes, then replicates."""
    from omegaconf import OmegaConf

    p = OmegaConf.load(experiment).hydra.sweeper.params
    out = []
    for option in str(p.model).split(","):
        source = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model" / f"{option}.yaml"))["source"]
        for r in str(p["model.replicate"]).split(","):
            name = source[len(BUILTIN_PREFIX):].replace("${.replicate}", r)
            out.append((option, int(r), name))
    return out


def with_extra_replicates(base: list[tuple[str, int, str]], cache_dir) -> list[tuple[str, int, str]]:
    """`members()` plus the replicates the rule adds for each size, in order."""
    out = []
    for option in dict.fromkeys(o for o, _, _ in base):
        mine = [(o, r, n) for o, r, n in base if o == option]
        stem = mine[0][2].rsplit("_s", 1)[0]  # l1w32_s1 -> l1w32
        converged = {r: verdict(f"{stem}_s{r}", cache_dir) for r in range(1, MOST_REPLICATES + 1)}
        out += mine + [(option, r, f"{stem}_s{r}") for r in replicates_needed(converged, len(mine)) if r > len(mine)]
    return out


def recipe_keep(recipe: Path = RECIPE) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(recipe).model.pretrain_keep


def cached_state(name: str, cache_dir, runs: Path, keep: str) -> str | None:
    """None: not in the cache; "ok": kept as the recipe says; "export again": kept under another rule, with a
    finished run dir to export from; "stale": kept under another rule, nothing to export it again from."""
    d = builtin_dir(name, cache_dir)
    if not d.exists():
        return None
    info = d / "pretrain_info.json"
    kept = json.loads(info.read_text()).get("kept", "last") if info.exists() else "last"
    if kept == keep:
        return "ok"
    return "export again" if (runs / name / RUN_SUMMARY).exists() else "stale"


def restore(name: str, cache_dir, repo_models: Path = REPO_MODELS) -> bool:
    """Copy a committed member into the cache (whole or not at all); False if none is committed."""
    src, dest = repo_models / name, builtin_dir(name, cache_dir, shipped=False)
    if not (src / "model.safetensors").exists():
        return False
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    add_shared_files(tmp)
    tmp.rename(dest)
    return True


def save(name: str, cache_dir, repo_models: Path = REPO_MODELS, partial: Path = PARTIAL) -> bool:
    """Copy a finished member from the cache into the repo (the files a restore needs); False if not finished,
    or finished but still to be continued by recipe 3 (its run dir goes to partial/ instead: --snapshot)."""
    src = builtin_dir(name, cache_dir, shipped=False)
    if not (src / "pretrain_info.json").exists():
        return False
    if json.loads((src / "pretrain_info.json").read_text()).get("tail_average") and verdict(name, cache_dir) is None:
        return False
    if file_sha256(src / SHARED_TOKENIZER_FILE.name) != file_sha256(SHARED_TOKENIZER_FILE):
        raise ValueError(f"{src}: its tokenizer.json is not the built-in tokenizer's ({SHARED_TOKENIZER_FILE}), "
                         "which a committed member reads instead: not saved")
    dest = repo_models / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in KEEP_FILES:
        shutil.copy2(src / f, dest / f)
    shutil.rmtree(partial / name, ignore_errors=True)  # its resume state is not needed any more
    return True


def snapshot(name: str, runs: Path, cache_dir, partial: Path = PARTIAL) -> bool:
    """Copy the resume state of a member not yet settled into the repo, so that another machine can go on with it:
    an unfinished pretraining (or continuation segment), or a finished one that recipe 3 continues. Copied: the
    newest last*.ckpt whole (weights, optimizer, loops); the small files at the top of the run dir (summaries,
    tail_average.json, log); csv/, .hydra/ and, for a finished run, export/; and the checkpoints of the two
    tail-average windows of the run's current target (a resumed run cannot write them again; the kept weights
    and the next segment need them) with their weights only: the average needs no optimizer state, and dropping
    it leaves a third of the size. False if there is nothing unsettled to copy."""
    import torch
    from omegaconf import OmegaConf

    from ..io import read_checkpoint
    from ..training.tail_average import windows

    run = runs / name
    last = list((run / "checkpoints").glob("last*.ckpt"))
    if not last or ((run / RUN_SUMMARY).exists() and continuation(name, cache_dir, runs) is None):
        return False
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    steps, every = cfg.trainer.max_steps, cfg.trainer.val_every
    needed = {s for w in windows(steps, every, horizon=cfg.optim.get("decay_steps")) for s in w}
    tmp = partial / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    newest = max(last, key=lambda p: read_checkpoint(p).get("global_step", -1))
    shutil.copy2(newest, tmp / "checkpoints" / "last.ckpt")
    for p in sorted((run / "checkpoints").glob("step*.ckpt")):
        if int(p.stem[4:]) in needed:
            ckpt = read_checkpoint(p)
            torch.save({k: v for k, v in ckpt.items() if k not in OPTIMIZER_KEYS}, tmp / "checkpoints" / p.name)
    for f in run.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    shutil.copytree(run / "csv", tmp / "csv")
    shutil.copytree(run / ".hydra", tmp / ".hydra")
    if (run / RUN_SUMMARY).exists():  # finished: exporting it again on another machine starts from its export
        shutil.copytree(run / "export", tmp / "export")
    shutil.rmtree(partial / name, ignore_errors=True)
    tmp.rename(partial / name)
    return True


OPTIMIZER_KEYS = ("optimizer_states", "lr_schedulers")  # what a checkpoint holds only to resume training from it


def restore_partial(name: str, runs: Path, partial: Path = PARTIAL) -> bool:
    """Restore a snapshot into a missing run dir (the pretraining then resumes from its last.ckpt)."""
    src, run = partial / name, runs / name
    if run.exists() or not (src / "checkpoints" / "last.ckpt").exists():
        return False
    shutil.copytree(src, run)
    return True


SEGMENT = 800  # recipe 3: steps per continuation segment (the width of a convergence window)


def _summary(name: str, runs: Path) -> dict | None:
    f = runs / name / RUN_SUMMARY
    return json.loads(f.read_text()) if f.exists() else None


def steps_args(name: str, runs: Path) -> tuple[str, ...]:
    """The overrides naming a continued member's own steps and cosine horizon (so that exporting it again asks
    for the run it is); () for one never continued (the recipe's own steps)."""
    done = _summary(name, runs)
    horizon = done and done["config"]["optim"].get("decay_steps")
    return (f"model.pretrain_steps={done['steps']}", f"optim.decay_steps={horizon}") if horizon else ()


def continuation(name: str, cache_dir, runs: Path, tol: float = DEPTH_TOL) -> tuple[str, ...] | None:
    """Recipe 3: the overrides continuing a finished member that is not converged by one more segment at the
    final learning rate, or None (converged, not finished here, or at MOST_STEPS)."""
    info, done = builtin_dir(name, cache_dir) / "pretrain_info.json", _summary(name, runs)
    if not info.exists() or done is None or done["steps"] + SEGMENT > MOST_STEPS:
        return None
    record = json.loads(info.read_text()).get("tail_average")
    if not record or window_gain(record, tol)["met"]:
        return None
    horizon = done["config"]["optim"].get("decay_steps") or done["steps"]
    return f"model.pretrain_steps={done['steps'] + SEGMENT}", f"optim.decay_steps={horizon}"


def pretrain_cmd(option: str, replicate: int, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "lnfree.pretrain", "--config-name", "pretrain_depth", f"model={option}",
           f"model.replicate={replicate}", f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", *extra]
    started = run_dir.exists() and any(run_dir.iterdir())
    if started and not (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / RUN_SUMMARY).exists():
        cmd.append("overwrite=true")  # killed before its first checkpoint: nothing to resume, start again
    return cmd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--save", action="store_true", help="copy finished members into experiments/depth_family/models")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--snapshot", action="store_true", help="copy unsettled members' resume state into "
                   "experiments/depth_family/partial")
    p.add_argument("--restore-only", action="store_true", help="restore committed members, pretrain nothing")
    p.add_argument("--jobs", type=int, default=1, help="members pretrained at once (one thread each)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for the pretraining (e.g. hardware=gpu)")
    a = p.parse_args(argv)
    cache = Path(a.cache_dir).expanduser()
    runs = cache / "pretrain_runs"
    keep = recipe_keep()
    if a.save or a.snapshot:
        for _, _, name in with_extra_replicates(members(), cache):
            if a.save:
                print(f"{name}: {'saved' if save(name, cache) else 'not settled (unfinished, or to be continued)'}",
                      flush=True)
            elif snapshot(name, runs, cache):
                print(f"{name}: snapshot in {PARTIAL / name}", flush=True)
            else:
                print(f"{name}: nothing unfinished", flush=True)
        return
    previous = None
    while True:  # rounds: a finished member may need a continuation, a size another replicate
        todo = plan(cache, runs, keep, a)
        if a.dry_run or not todo or todo == previous:
            for name, cmd in todo if a.dry_run else []:
                print(f"{name}: {' '.join(cmd[1:])}", flush=True)
            return
        if rc := pretrain_all(todo, runs, max(1, a.jobs), lambda name: next_segment(name, cache, runs, a)):
            sys.exit(rc)
        previous = todo


def next_segment(name: str, cache: Path, runs: Path, a) -> list[str] | None:
    """The continuation command for a member that just finished a pretraining or a segment, if it needs one."""
    more = continuation(name, cache, runs)
    if more is None:
        return None
    option, r = next((o, rr) for o, rr, n in with_extra_replicates(members(), cache) if n == name)
    print(f"{name}: not converged: continued ({' '.join(more)})", flush=True)
    return pretrain_cmd(option, r, runs / name, (*more, *a.extra))


def plan(cache: Path, runs: Path, keep: str, a) -> list[tuple[str, list[str]]]:
    """The pretraining commands this round: missing members, continuations (recipe 3), exports again."""
    todo = []
    for option, r, name in with_extra_replicates(members(), cache):
        state = cached_state(name, cache, runs, keep)
        if state == "export again":
            print(f"{name}: in the cache, kept under another rule than model.pretrain_keep={keep}: exported again "
                  "from its run dir", flush=True)
            todo.append((name, pretrain_cmd(option, r, runs / name, (*steps_args(name, runs), *a.extra))))
            continue
        if state == "ok" and (more := continuation(name, cache, runs)):
            print(f"{name}: not converged: continued ({' '.join(more)})", flush=True)
            todo.append((name, pretrain_cmd(option, r, runs / name, (*more, *a.extra))))
            continue
        if state is not None:
            print(f"{name}: in the cache" + ("" if state == "ok" else f", kept under another rule than "
                  f"model.pretrain_keep={keep} and no run dir to export it again from"), flush=True)
            continue
        if not a.dry_run and restore(name, cache):
            print(f"{name}: restored from {REPO_MODELS / name}", flush=True)
            continue
        if a.restore_only:
            print(f"{name}: not committed, not in the cache (--restore-only: not pretrained)", flush=True)
            continue
        if not a.dry_run and restore_partial(name, runs):
            print(f"{name}: run dir restored from {PARTIAL / name}: resumes", flush=True)
        todo.append((name, pretrain_cmd(option, r, runs / name, (*steps_args(name, runs), *a.extra))))
    return todo


def pretrain_all(todo: list[tuple[str, list[str]]], runs: Path, jobs: int, followup=None) -> int:
    """Run the pretraining commands, `jobs` at a time, smallest first; stop starting new ones after a failure.
    `followup(name)`: the next command for a member whose command just succeeded (a continuation segment), or
    None; it goes to the front of the queue, so a small member's next segment need not wait for a large member."""
    runs.mkdir(parents=True, exist_ok=True)
    env = one_thread_env()
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed = 0
    # a time limit (timeout's SIGTERM) ends the members in flight too (they save a checkpoint and resume later)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        failed = _run(todo, runs, jobs, env, running, followup)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.wait()
    return failed


def _run(todo, runs: Path, jobs: int, env: dict, running: dict, followup=None) -> int:
    failed = 0
    while todo or running:
        while todo and len(running) < jobs and not failed:
            name, cmd = todo.pop(0)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env), time.time())
        if failed and not running:
            break
        time.sleep(2)
        for name, (proc, t0) in list(running.items()):
            if (rc := proc.poll()) is None:
                continue
            del running[name]
            wall = time.time() - t0
            with open(runs / "times.jsonl", "a") as f:
                f.write(json.dumps({"name": name, "rc": rc, "wall_s": round(wall, 1), "jobs": jobs,
                                    "end": time.strftime("%FT%T")}) + "\n")
            print(f"[{time.strftime('%H:%M:%S')}] {name}: rc={rc}, {wall:.0f} s", flush=True)
            failed = failed or rc
            if not rc and followup is not None and (nxt := followup(name)) is not None:
                todo.insert(0, (name, nxt))
    return failed


if __name__ == "__main__":
    main()
