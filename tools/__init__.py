"""This repository's own tooling, run from its root (`python -m tools.<name>`): what rewrites its docs and records.
Not part of the lnfree package or its wheel (pyproject.toml lists the packages it ships)."""
