import json

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from transformers import GPT2LMHeadModel

from lnfree.references import builtin_dir
from lnfree.training.pretrain_run import pretrain


@pytest.mark.slow
def test_pretrain_writes_a_stock_loadable_builtin_model(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=[
            "model=builtin_w48", "model.source=builtin:test1x32", "model.shape.n_embd=32",
            "model.shape.n_head=2", "model.pretrain_steps=6", "data.block_size=32", "data.val_blocks=2",
            "hardware.micro_batch_size=2", "trainer.progress_bar=false", "trainer.val_every=3",
            f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
        ])
    dest = pretrain(cfg)
    assert dest == builtin_dir("test1x32", tmp_path / "cache") and not dest.with_name(".test1x32.model.tmp").exists()
    info = json.loads((dest / "pretrain_info.json").read_text())
    assert info["steps"] == 6 and info["tokens"] == 6 * 2 * 32
    model = GPT2LMHeadModel.from_pretrained(dest)
    assert model.config.n_embd == 32 and model.config.layer_norm_epsilon == 1e-5  # trained with LayerNorm
    assert info["n_params_non_embedding"] == sum(p.numel() for n, p in model.named_parameters()
                                                 if not n.endswith(("wte.weight", "wpe.weight")))
    assert (dest / "tokenizer.json").exists()


def test_resume_point_is_the_newest_last_checkpoint_by_step_not_by_file_time(tmp_path):
    """A moved run dir: Lightning kept writing last-v1.ckpt next to the stale last.ckpt, which is newer on disk."""
    import os

    import torch
    from omegaconf import OmegaConf

    from lnfree.training.pretrain_run import resume_point

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name, step, mtime in [("last-v1.ckpt", 300, 1_000), ("last.ckpt", 100, 2_000), ("step000400.ckpt", 400, 0),
                              ("last-v1.ckpt.tmp", 500, 3_000)]:
        torch.save({"global_step": step}, ckpts / name)
        os.utime(ckpts / name, (mtime, mtime))
    cfg = OmegaConf.create({"ckpt_path": None})
    assert resume_point(tmp_path, cfg) == str(ckpts / "last-v1.ckpt")
    torch.save({"global_step": 600}, ckpts / "last-v2.ckpt")
    assert resume_point(tmp_path, cfg) == str(ckpts / "last-v2.ckpt")
    (tmp_path / "summary.json").write_text("{}")  # a finished run is not resumed
    assert resume_point(tmp_path, cfg) is None
