"""The typed schema of `conf/eval.yaml` (python -m lnfree.eval): which models, which datasets, how.

Values live in conf/eval.yaml; the list items (ModelSpec, DatasetSpec) take their defaults from here, since
a YAML list cannot give defaults to the entries a user writes. The seeds are written once, in conf/runs.yaml
(`seeds`): a config names a model trained once per seed as `{name: lnfree_s{seed}, path: ${runs}/lnfree_s{seed}}`
and a pair over seeds as `{a: [lnfree_s{seed}], b: [vanilla_s{seed}]}`; `seeds_written_out` turns them into one
model per seed and pairs of per-seed lists, the config that is evaluated and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..errors import UserError

SOURCES = ("builtin", "hf", "files", "owt_nanogpt")


class EvalError(UserError):
    pass


@dataclass
class ModelSpec:
    name: str = MISSING  # with {seed}: one model per seed of `seeds` (seeds_written_out)
    path: str = MISSING  # hub name | builtin:<name> | HF dir | export dir | run dir | .ckpt


@dataclass
class FilterSpec:
    """Drop chunks containing any token never seen in `docs` documents of a reference (fine-tuning) set."""
    source: str = "hf"
    path: str | None = None
    config_name: str | None = None
    split: str = "train"
    text_field: str = "text"
    files: list[str] = field(default_factory=list)
    docs: int = 1_000_000


@dataclass
class DatasetSpec:
    name: str = MISSING
    source: str = "builtin"  # builtin | hf | files | owt_nanogpt
    path: str | None = None
    config_name: str | None = None
    revision: str | None = None
    split: str = "validation"
    text_field: str = "text"
    files: list[str] = field(default_factory=list)
    filter: FilterSpec | None = None


@dataclass
class PairSpec:
    """A paired comparison: mean CE of `a` minus `b` on the same tokens; a[i] and b[i] share seed i."""
    name: str = MISSING
    a: list[str] = MISSING  # model names (one per seed), or one name with {seed} (seeds_written_out)
    b: list[str] = MISSING


@dataclass
class EvalConfig:
    runs: str = MISSING  # conf/runs.yaml: where make eval trains the runs that `models` names as ${runs}/<run>
    seeds: list[int] = MISSING  # conf/runs.yaml: the seeds that a {seed} in `models` and `pairs` stands for
    models: list[ModelSpec] = MISSING
    datasets: list[DatasetSpec] = MISSING
    pairs: list[PairSpec] = MISSING  # paired gaps with bootstrap CIs, per seed and over seeds
    tokenizer: str | None = MISSING  # null: the first model that carries one
    tokens: int = MISSING  # per dataset
    context: int = MISSING
    batch: int = MISSING
    precision: str = MISSING  # bf16 (autocast) | fp32
    device: str = MISSING
    bootstrap: int = MISSING
    seed: int = MISSING
    cache_dir: str = MISSING
    output_dir: str | None = None  # None: the job's own new dir; experiments/ only when named on the command line


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


# -- models and pairs per seed ----------------------------------------------------------------------------------
SEED = "{seed}"


def _per_seed(text: str, seeds) -> list[str]:
    return [text.replace(SEED, str(s)) for s in seeds]


def models_per_seed(models: list[dict], seeds) -> list[dict]:
    """Each model whose name holds {seed} written out in its place, once per seed in order (vanilla_s{seed} ->
    vanilla_s1, vanilla_s2, ...; its path likewise); the other models as they are."""
    out = []
    for m in models:
        if SEED in m["name"]:
            out += [{**m, "name": name, "path": path}
                    for name, path in zip(_per_seed(m["name"], seeds), _per_seed(m["path"], seeds))]
        elif SEED in m["path"]:
            raise EvalError(f"model {m['name']!r}: {SEED} in its path but not in its name (one model per seed "
                            f"needs one name per seed, e.g. {m['name']}_s{SEED})")
        else:
            out.append(m)
    return out


def pairs_per_seed(pairs: list[dict], seeds) -> list[dict]:
    """Each pair that names a {seed} model written out seed by seed: a: [lnfree_s{seed}], b: [original] ->
    a: [lnfree_s1, lnfree_s2, ...], b: [original, original, ...] (a name without {seed} is the same model for
    every seed); such a pair names one model on each side. The other pairs as they are."""
    out = []
    for p in pairs:
        if not any(SEED in name for name in (*p["a"], *p["b"])):
            out.append(p)
        elif len(p["a"]) != 1 or len(p["b"]) != 1:
            raise EvalError(f"pair {p['name']!r}: a pair over seeds names one model on each side "
                            f"(a: [lnfree_s{SEED}], b: [vanilla_s{SEED}]), not a={list(p['a'])}, b={list(p['b'])}")
        else:
            out.append({**p, "a": _per_seed(p["a"][0], seeds), "b": _per_seed(p["b"][0], seeds)})
    return out


def seeds_written_out(cfg: DictConfig) -> DictConfig:
    """cfg with every {seed} model and pair written out over cfg.seeds, and `seeds` itself dropped (the models and
    pairs now say it all): what is evaluated and what its record saves, the same as for a config that lists each
    seed's model by hand. Used by lnfree.eval, lnfree.downstream (its config has no pairs) and the interp
    commands' default models."""
    seeds = list(cfg.seeds)
    c = OmegaConf.to_container(cfg, resolve=False)  # ${runs} kept as written: it resolves in the new config too
    del c["seeds"]
    c["models"] = models_per_seed(c["models"], seeds)
    if "pairs" in c:
        c["pairs"] = pairs_per_seed(c["pairs"], seeds)
    out = OmegaConf.create(c)
    OmegaConf.set_struct(out, True)  # as the composed config: a misspelt key is an error, not None
    return out
