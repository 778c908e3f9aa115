"""The optional extras: what `pip install lnfree` leaves out, and one clear line when an entry point needs it.

`pip install lnfree` is the core (`import lnfree`: the removable model, the schedule, lnfree.load, the exports) and
the `lnfree` command; the entry points need an extra on top (pyproject.toml [project.optional-dependencies]):

    lnfree train, lnfree pretrain     pip install 'lnfree[train]'      Lightning, W&B, and what [analysis] holds
    lnfree eval, lnfree analyze ...   pip install 'lnfree[analysis]'   Hydra, datasets, scipy, matplotlib

Which packages an extra holds is read from the installed package's metadata, so pyproject.toml stays the one list.
An entry point calls `require(extra, command)` before its first import of them: without the extra it stops with
one line that says what to install, instead of a traceback from deep inside an import.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement

PACKAGE = "lnfree"  # the distribution whose metadata lists the extras


def requirements(extra: str) -> list[Requirement]:
    """The requirements that `lnfree[extra]` adds to the core, an extra that includes another (train includes
    analysis: `lnfree[analysis]`) expanded. Empty where lnfree is not installed (a source checkout run in place
    from sys.path carries no metadata to check against) or names no such extra."""
    try:
        declared = [Requirement(r) for r in metadata.requires(PACKAGE) or []]
    except metadata.PackageNotFoundError:
        return []
    out = []
    for r in declared:
        if r.marker is None or not r.marker.evaluate({"extra": extra}) or r.marker.evaluate({"extra": ""}):
            continue  # the core's own (with or without a marker of its own), or another extra's
        if r.name == PACKAGE:
            out += [q for e in sorted(r.extras) for q in requirements(e)]
        else:
            out.append(r)
    return out


def missing(extra: str) -> list[str]:
    """The distributions of `extra` that are not installed (presence only: pip checked the versions)."""
    gone = []
    for r in requirements(extra):
        try:
            metadata.distribution(r.name)
        except metadata.PackageNotFoundError:
            gone.append(r.name)
    return sorted(set(gone))


def require(extra: str, command: str) -> None:
    """Stop `command` with one line when `extra` is not installed (SystemExit: no traceback, exit status 1)."""
    if gone := missing(extra):
        raise SystemExit(f"{command} needs the {extra} extra (missing: {', '.join(gone)}): "
                         f"pip install 'lnfree[{extra}]'")
