"""A file-size limit or a full disk while a run writes is named (EFBIG, ENOSPC, and the file being written) and
leaves no half-written export or checkpoint behind, the previous export kept."""

import errno
import resource

import pytest
import torch
from conftest import calibrated_all_removed

from lnfree.training import checkpoints


class _Data:
    def __init__(self, ids):
        self.val_data = ids


def test_a_file_size_limit_during_export_leaves_no_half_export_and_is_named(tmp_path):
    from lnfree.training.run import export_run

    _, model = calibrated_all_removed()
    data = _Data(torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0)))
    export_run(model, None, tmp_path / "whole", data)  # measure: the limit lets the hf form through, not folded/
    hf_size = (tmp_path / "whole" / "export" / "hf" / "model.safetensors").stat().st_size
    folded_size = (tmp_path / "whole" / "export" / "folded" / "folded.safetensors").stat().st_size
    assert hf_size < folded_size
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    (out / "export" / "keep").write_text("the previous export")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((hf_size + folded_size) // 2, hard))
    try:
        with pytest.raises(OSError, match=r"EFBIG") as err:
            export_run(model, None, out, data)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG and ".export.tmp" in str(err.value)
    assert not (out / ".export.tmp").exists() and (out / "export" / "keep").exists()


def test_a_full_disk_while_checkpointing_is_named(tmp_path, monkeypatch):
    def full(obj, f, *a, **k):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # torch.save turns the file's OSError into its own RuntimeError
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(OSError, match=r"checkpoint .*step000006\.ckpt not written: the disk is full \(ENOSPC\)"):
        checkpoints.SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "step000006.ckpt")
    assert not list(tmp_path.iterdir())
