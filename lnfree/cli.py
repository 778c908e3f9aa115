"""The `lnfree` command: one entry point whose subcommands are the package's runnable modules.

    lnfree train schedule=builtin seed=2        ==  python -m lnfree.train schedule=builtin seed=2
    lnfree eval "models=[{name: a, path: runs/a}]"
    lnfree analyze scaling --help
    lnfree --help                               the list below

A subcommand runs its module exactly as `python -m <module>` does (runpy, with the rest of the command line as
the module's arguments), so the two spellings are one command: the same Hydra overrides and run dirs (train, eval,
pretrain, downstream take key=value overrides, `-m` for a sweep, `--cfg job` to print the config), the same
argparse options, and `lnfree <command> --help` is the module's own help.
"""

from __future__ import annotations

import runpy
import sys
from dataclasses import dataclass

from .extras import require


@dataclass(frozen=True)
class Command:
    module: str  # run as `python -m module`
    help: str


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "train": Command("lnfree.train", "fine-tune a model while removing its norms on a schedule (Hydra overrides)"),
    "eval": Command("lnfree.eval", "evaluate models on held-out text, with paired gaps (Hydra overrides)"),
    "pretrain": Command("lnfree.pretrain", "pretrain a built-in model with its norms (Hydra overrides)"),
    "downstream": Command("lnfree.downstream", "lm-evaluation-harness tasks on lnfree models (Hydra overrides; "
                                               "needs lnfree[eval])"),
    "remove-now": Command("lnfree.training.remove_now", "remove every norm at once, without fine-tuning "
                                                        "(the baseline fine-tuning must beat)"),
    "sweep-table": Command("lnfree.training.sweep_table", "the results table of a sweep's dir"),
    "analyze": {
        "scaling": Command("lnfree.analysis.scaling", "data needed to remove the norms vs model size"),
        "paired-tables": Command("lnfree.analysis.paired_tables", "recompute the paired gaps of eval outputs from "
                                                                  "their per-token CE"),
        "pretrained": Command("lnfree.analysis.family", "the record of a set of pretrained built-in models "
                                                        "(shape, size, CE, convergence)"),
        "dla": Command("lnfree.analysis.interp.dla", "direct logit attribution vs direct effect"),
        "patching": Command("lnfree.analysis.interp.patching", "attribution patching vs activation patching"),
        "neurons": Command("lnfree.analysis.interp.neurons", "confidence (entropy) neurons of the last MLP"),
        "residual": Command("lnfree.analysis.interp.residual", "residual-stream norms and attention sinks"),
        "controls": Command("lnfree.analysis.interp.controls_cli", "the interpretability positive controls over "
                                                                   "seeds"),
        "controls-plot": Command("lnfree.analysis.interp.controls_plot", "tables and figures of the positive "
                                                                         "controls"),
    },
    "bench": {
        "cpu": Command("lnfree.bench.cpu", "the cost of the removal machinery and the LN-free model's speed (CPU)"),
        "gpu": Command("lnfree.bench.gpu", "the GPU check (one GPU)"),
        "profile": Command("lnfree.bench.profile", "where a forward's or a training step's time goes, per operator"),
    },
    # the studies' orchestration (run from a source checkout: they read and write its experiments/ records)
    "sweep": {
        "run-missing": Command("lnfree.sweeps.run_missing", "the data-scaling runs without a record, a few Hydra "
                                                            "multiruns at a time (make scaling, scaling-depth)"),
        "pretrain-depth": Command("lnfree.sweeps.pretrain_depth", "restore or pretrain the depth-and-width "
                                                                  "family's members (make family-depth)"),
        "lr-probe": Command("lnfree.sweeps.lr_probe", "the depth family's fine-tuning LR per size, from the "
                                                      "vanilla control (make scaling-depth)"),
        "cost": Command("lnfree.sweeps.cost", "the depth family study's CPU cost: step costs measured, the plan"),
        "efficient": Command("lnfree.sweeps.efficient", "the removal-methods study's runs without a record "
                                                        "(make efficient)"),
        "efficient-depth": Command("lnfree.sweeps.efficient_depth", "the removal-methods study's depth-and-width "
                                                                    "part: its runs without a record"),
        "efficient-analysis": Command("lnfree.sweeps.efficient_analysis", "the removal-methods study's analysis "
                                                                          "from its records"),
    },
}

# The extra a command needs beyond the core (`pip install lnfree`), by group or by command (the command wins):
# without it the command stops with one line that says what to install (lnfree/extras.py). train, pretrain and
# eval check in their own modules, so that `python -m lnfree.train` says it as well; downstream's lm-eval (the
# eval extra) is checked by lnfree.downstream itself, so that its --help needs only [analysis].
NEEDS: dict[str, str] = {"downstream": "analysis", "remove-now": "analysis", "sweep-table": "analysis",
                         "analyze": "analysis", "analyze pretrained": "train", "analyze controls": "train",
                         "bench": "train", "sweep": "train"}


def needs(words: list[str]) -> str | None:
    """The extra of the command these words name: its own entry in NEEDS, else its group's."""
    return NEEDS.get(" ".join(words), NEEDS.get(words[0]))


def usage(group: str | None = None) -> str:
    table = COMMANDS if group is None else COMMANDS[group]
    prefix = "lnfree" if group is None else f"lnfree {group}"
    rows = []
    for name, c in table.items():
        if isinstance(c, dict):
            rows.append((f"{name} <command>", ", ".join(c)))
        else:
            rows.append((name, c.help))
    width = max(len(r[0]) for r in rows)
    lines = [f"usage: {prefix} <command> [arguments ...]", "",
             "commands:", *(f"  {name.ljust(width)}  {text}" for name, text in rows), "",
             f"A command's own help: {prefix} <command> --help.",
             "Each command is also `python -m <module>` (lnfree.cli.COMMANDS names the modules)."]
    return "\n".join(lines) + "\n"


def resolve(args: list[str]) -> tuple[Command | None, list[str], str | None]:
    """(command, its arguments, the group whose usage to show) for a command line without the program name; the
    command is None when the line names no runnable command (usage or an error is shown instead)."""
    table, group = COMMANDS, None
    while args and args[0] in table:
        name, args = args[0], args[1:]
        if isinstance(table[name], Command):
            return table[name], args, group
        table, group = table[name], name  # a group (analyze, bench): its command comes next
    return None, args, group


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    command, rest, group = resolve(args)
    if command is None:
        text = usage(group)
        if rest and rest[0] in ("-h", "--help"):
            print(text, end="")
            return 0
        known = COMMANDS if group is None else COMMANDS[group]
        problem = f"unknown command {rest[0]!r}" if rest else "no command given"
        print(f"{text}\nlnfree: {problem}; the commands are {', '.join(known)}", file=sys.stderr)
        return 2
    words = args[:len(args) - len(rest)]  # ["train"], ["analyze", "dla"], ...
    if extra := needs(words):
        require(extra, " ".join(["lnfree", *words]))
    # what `python -m module args` does: the module runs as __main__ and sees argv[1:] = args
    saved = sys.argv
    sys.argv = [sys.argv[0], *rest]
    try:
        runpy.run_module(command.module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
