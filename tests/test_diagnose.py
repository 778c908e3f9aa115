"""Non-finite forwards as a result (lnfree/diagnose.py): on a Llama built to overflow once its norms are frozen, the
diagnosis names the first removal that makes the logits non-finite and where the forward overflows; the exports say
"non-finite logits"; the divergence guard names the sites removed last."""

from types import SimpleNamespace

import pytest
import torch

import lnfree
from lnfree.diagnose import describe, first_nonfinite_removal, locate_nonfinite
from lnfree.errors import ExportError
from lnfree.export import export_folded, export_hf
from lnfree.model import parse_site_name
from lnfree.training.checkpoints import last_removals

IDS = torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))


def overflowing_llama():
    """builtin:llama_w128, calibrated, then its embedding scaled by 1e12: with real norms the forward is unchanged
    up to rounding (each block reads a normalised input), but a frozen sigma no longer matches, and SwiGLU squares
    what it is given: a few frozen sites take the residual past float32's range."""
    model, _ = lnfree.load("builtin:llama_w128", removable=True)
    model.eval()
    model.calibrate(IDS)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e12)
    return model


def test_the_first_removal_that_overflows_is_named_with_where_it_overflows():
    model = overflowing_llama()
    assert locate_nonfinite(model, IDS) is None  # real norms: finite
    order = model.real_sites()
    found = first_nonfinite_removal(model, IDS)
    site, n = found["site"], found["removed"]
    assert site == order[n - 1] and site.startswith("pre_mlp.")
    report = found["report"]
    assert report["n_nonfinite"] == IDS.numel() and len(report["positions"]) == 8
    assert report["tokens"] == [int(IDS[r, t]) for r, t in report["positions"]]
    assert report["block"] is not None and report["block"] <= parse_site_name(site)[1] + 1
    assert "non-finite logits at 64 positions" in describe(report)
    assert report["max_abs_residual"][-1] is None or report["max_abs_residual"][-1] > 1e30  # overflowed by the end
    # the removals before it leave the forward finite: freezing them alone, on a fresh copy, does not overflow
    again = overflowing_llama()
    for name in order[:n - 1]:
        again.remove(*parse_site_name(name))
    assert locate_nonfinite(again, IDS) is None
    again.remove(*parse_site_name(site))
    assert locate_nonfinite(again, IDS) is not None


def test_an_export_of_a_non_finite_model_says_so(tmp_path):
    model = overflowing_llama()
    for name in model.real_sites():
        model.remove(*parse_site_name(name))
    for export in (export_hf, export_folded):
        with pytest.raises(ExportError, match="non-finite logits"):
            export(model, tmp_path / export.__name__, input_ids=IDS)
        assert not (tmp_path / export.__name__).exists()


def test_the_divergence_message_names_the_sites_removed_last():
    applied = [{"site": "pre_mlp.0", "applied_at": 3}, {"site": "pre_mlp.1", "applied_at": 5},
               {"site": "attn_qk.0", "applied_at": 5}]
    trainer = SimpleNamespace(global_step=7, callbacks=[object(), SimpleNamespace(applied=applied)])
    assert last_removals(trainer) == ", 2 step(s) after removing pre_mlp.1, attn_qk.0 at step 5"
    assert last_removals(SimpleNamespace(global_step=7, callbacks=[SimpleNamespace(applied=[])])) == ""


def test_with_ramps_the_divergence_message_tells_the_site_removed_from_the_ramp_started():
    applied = [{"site": "pre_mlp.0", "applied_at": 16, "removed_at": 28},
               {"site": "pre_mlp.5", "applied_at": 28, "removed_at": None},
               {"site": "pre_mlp.1", "applied_at": 18, "removed_at": None}]
    trainer = SimpleNamespace(global_step=29, callbacks=[SimpleNamespace(applied=applied)])
    assert last_removals(trainer) == (", 1 step(s) after removing pre_mlp.0 and starting the ramp of pre_mlp.5 "
                                      "at step 28")
    applied[0]["removed_at"] = None  # nothing removed yet: only ramps started
    assert last_removals(trainer) == ", 1 step(s) after starting the ramp of pre_mlp.5 at step 28"
