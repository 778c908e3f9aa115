"""experiments/quality/mutation.md from a finished `mutmut run` (make mutation runs this last).

    python -m tools.mutation_report [--title "..."]      (from the repository root)

Reads mutmut's results (`mutmut results --all true`, `mutmut show <mutant>`) in the project root, and
experiments/quality/equivalent.txt (lines `<mutant name>  <reason>`: mutants that cannot change behaviour, each
with why). Score = killed / (all - equivalent); "no tests", timeouts and survivors count as not killed.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "experiments/quality"  # the report, mutation.md, and the list of equivalent mutants it reads
MUTMUT = str(Path(sys.executable).parent / "mutmut")


def _mutmut(*args) -> str:
    return subprocess.run([MUTMUT, *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def statuses() -> dict[str, str]:
    out = {}
    for line in _mutmut("results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def equivalents() -> dict[str, str]:
    f = QUALITY / "equivalent.txt"
    out = {}
    if f.exists():
        for line in f.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, reason = line.strip().partition(" ")
                out[name] = reason.strip()
    return out


def module_of(mutant: str) -> str:
    # lnfree.norm.x_NormSite__commit__mutmut_3 -> lnfree.norm
    head = mutant.split("__mutmut_")[0]
    parts = head.split(".")
    return ".".join(p for p in parts[:-1]) if len(parts) > 1 else head


def percent(score: float) -> str:
    """Rounded down at 2 decimals, so that a score below 100% never prints as 100.0%."""
    return f"{int(score * 10000) / 100:.2f}%"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--title", default="Mutation testing of the core")
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    st, eq = statuses(), equivalents()
    if not st:
        raise SystemExit("no mutmut results here: run `make mutation` first")
    by_mod = collections.defaultdict(collections.Counter)
    for name, s in st.items():
        by_mod[module_of(name)]["equivalent" if name in eq and s != "killed" else s] += 1
    total = collections.Counter()
    for c in by_mod.values():
        total.update(c)
    n_eq, unrun = total["equivalent"], total["not checked"]  # not checked: a run stopped before reaching them
    scored = sum(total.values()) - n_eq - unrun
    score = total["killed"] / scored if scored else float("nan")
    survivors = [n for n, s in st.items() if s not in ("killed", "not checked") and n not in eq]
    lines = [f"# {a.title}", "",
             f"Tool: mutmut {_mutmut('--version').split()[-1]} (`make mutation`; config in pyproject.toml "
             "`[tool.mutmut]`: the modules mutated and the fast test selection). Report written "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by tools/mutation_report.py.",
             "", a.note, "",
             f"**Score: {total['killed']} killed of {scored} non-equivalent mutants run = {percent(score)}** "
             f"({sum(total.values())} generated, {sum(total.values()) - unrun} run, {n_eq} equivalent, "
             f"{len(survivors)} not killed" + (f"; {unrun} not run yet" if unrun else "") + ").", "",
             "| module | generated | run | killed | equivalent | survived | no tests | timeout | other |",
             "|---|---|---|---|---|---|---|---|---|"]
    known = ("killed", "equivalent", "survived", "no tests", "timeout", "not checked")
    for mod in sorted(by_mod):
        c = by_mod[mod]
        other = sum(v for k, v in c.items() if k not in known)
        lines.append(f"| {mod} | {sum(c.values())} | {sum(c.values()) - c['not checked']} | {c['killed']} | "
                     f"{c['equivalent']} | {c['survived']} | {c['no tests']} | {c['timeout']} | {other} |")
    if eq:
        lines += ["", "## Equivalent mutants (cannot change behaviour)", "", "| mutant | why |", "|---|---|"]
        lines += [f"| `{n}` | {r} |" for n, r in sorted(eq.items()) if n in st]
    if survivors:
        lines += ["", "## Not killed", ""]
        for n in sorted(survivors):
            diff = "\n".join(line for line in _mutmut("show", n).splitlines()[1:] if line.startswith(("+", "-"))
                             and not line.startswith(("+++", "---")))
            lines += [f"- `{n}` ({st[n]})", "", "```diff", diff[:600], "```", ""]
    (QUALITY / "mutation.md").write_text("\n".join(lines) + "\n")
    print(f"score {percent(score)} ({total['killed']}/{scored}); written {QUALITY / 'mutation.md'}")


if __name__ == "__main__":
    main()
