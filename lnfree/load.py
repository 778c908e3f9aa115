"""One loader for every model form the project produces or reads, for evaluation and the analyses.

    load_any("gpt2")                          hub name (online)
    load_any("builtin:2x128")                 the built-in family
    load_any("path/to/hf_dir")                any HF GPT-2 dir, incl. <run>/export/hf (HF-compatible LN-free)
    load_any("path/to/export/folded")         the folded, truly norm-free form
    load_any("path/to/removable_dir")         save_removable() output (modes and sigmas kept)
    load_any("path/to/run_dir")               a training run: its export/hf
    load_any("path/to/step000100.ckpt")       a Lightning checkpoint of a training run

Every form returns (model, tokenizer_or_None); the model maps input_ids [batch, pos] to logits via `logits()`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .folded import CONFIG_FILE as FOLDED_CONFIG
from .folded import load_folded
from .model import LNFREE_FILE, RemovableGPT2LMHeadModel, load_removable
from .sources import BUILTIN_PREFIX, builtin_dir, hub_offline


class LoadError(ValueError):
    pass


def describe(path: str, cache_dir="~/.cache/lnfree") -> str:
    """What `path` is (builtin | folded | removable | hf | run | ckpt | hub), or LoadError; loads nothing."""
    if path.startswith(BUILTIN_PREFIX):
        d = builtin_dir(path[len(BUILTIN_PREFIX):], cache_dir)
        if not d.exists():
            raise LoadError(f"built-in model {path!r} not found at {d}: run `python -m lnfree.pretrain "
                            f"model=builtin_{path[len(BUILTIN_PREFIX):]}`")
        return "builtin"
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".ckpt":
        return "ckpt"
    if p.is_dir():
        if (p / FOLDED_CONFIG).exists():
            return "folded"
        if (p / LNFREE_FILE).exists():
            return "removable"
        if (p / "config.json").exists():
            return "hf"
        if (p / "export" / "hf" / "config.json").exists():
            return "run"
        raise LoadError(f"{path!r} is a directory but not a model: no config.json, folded_config.json or "
                        "export/hf/ inside")
    if p.exists() or path.startswith((".", "/", "~")) or path.endswith(".ckpt"):
        raise LoadError(f"model path {path!r} does not exist")
    if hub_offline():
        raise LoadError(f"model {path!r} looks like a hub name but the hub is offline (HF_HUB_OFFLINE=1); "
                        "give a local path, a run dir or builtin:<name>")
    return "hub"


def _tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None


def load_any(path: str, cache_dir="~/.cache/lnfree", device="cpu"):
    kind = describe(path, cache_dir)
    from transformers import GPT2Config, GPT2LMHeadModel

    if kind == "builtin":
        path, kind = str(builtin_dir(path[len(BUILTIN_PREFIX):], cache_dir)), "hf"
    if kind == "run":
        path, kind = str(Path(path) / "export" / "hf"), "hf"
    if kind == "folded":
        return load_folded(path, device), _tokenizer(path)
    if kind == "removable":
        return load_removable(path, device).eval(), _tokenizer(path)
    if kind == "ckpt":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if "lnfree_model_config" not in ckpt:
            raise LoadError(f"{path} is not an lnfree training checkpoint (no lnfree_model_config)")
        model = RemovableGPT2LMHeadModel(GPT2Config.from_dict(ckpt["lnfree_model_config"]))
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state)
        run_dir = Path(path).parent.parent
        tok = _tokenizer(run_dir / "export" / "hf") if (run_dir / "export" / "hf").exists() else None
        return model.to(device).eval(), tok
    model = GPT2LMHeadModel.from_pretrained(path).to(device).eval()
    return model, _tokenizer(path)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out
