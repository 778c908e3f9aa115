"""Where things live: the one definition of each path the package and its entry points use."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# a source checkout's root: the studies' records (experiments/) and docs/ are there, not in an installed wheel
SOURCE_ROOT = PACKAGE_DIR.parent
# the Hydra configs (train.yaml, eval.yaml, pretrain.yaml and the groups): inside an installed wheel lnfree/conf,
# in a source checkout (editable install included) the repository's conf/
CONF_DIR = PACKAGE_DIR / "conf" if (PACKAGE_DIR / "conf" / "train.yaml").exists() else PACKAGE_DIR.parent / "conf"
SHIPPED_DIR = PACKAGE_DIR / "pretrained"  # built-in models that ship with lnfree
CORPUS_DIR = PACKAGE_DIR / "data" / "corpus_data"  # the built-in corpus (lnfree/data/corpus.py)
BUILTIN_TOKENIZER_DIR = CORPUS_DIR / "tokenizer"  # its BPE: model.tokenizer=builtin, the built-in models' own
DEFAULT_CACHE_DIR = "~/.cache/lnfree"  # built-in models pretrained on this machine: <cache>/models/<name>
RUN_SUMMARY = "summary.json"  # what marks a training run's output dir
