"""Tests run offline: no hub, no W&B network. Tiny GPT-2 configs are built here."""

import os

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
