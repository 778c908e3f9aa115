"""Tests run offline: no hub, no W&B network. Tiny GPT-2 configs are built here."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config  # noqa: E402


def tiny_config(**kw) -> GPT2Config:
    base = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64, bos_token_id=96,
                eos_token_id=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base.update(kw)
    return GPT2Config(**base)


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = Path(__file__).resolve().parents[1]

# A few-second CPU run: random 2-layer model, built-in corpus, every site removed by step 18 of 24.
TINY_RUN = [
    "model=tiny", "model.dropout=0.0", "schedule=builtin", "data=builtin", "data.block_size=64",
    "data.val_blocks=4", "hardware=cpu", "hardware.precision=32-true", "hardware.micro_batch_size=4",
    "trainer.max_steps=24", "trainer.val_every=12", "trainer.ckpt_every=12", "trainer.progress_bar=false",
    "logger=csv", "optim.warmup_steps=2", "optim.lr=3e-3",
]


def compose_train(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}",
                                           f"paths.cache_dir={tmp_path}/cache", *overrides])
