"""A run's config is checked before any data or weights are read: a key the schema does not define (with the key
meant), non-finite numbers, hub repo ids, and the data block that follows the model's context unless set.
Impossible values and the output-dir policy: tests/test_safety.py; composing every option: tests/test_train.py."""

import pytest
from conftest import TINY_RUN, compose_train

from lnfree.training.config import LimitError
from lnfree.training.run import train


def test_a_key_the_schema_does_not_define_is_refused_before_compute_even_with_plus(tmp_path):
    from lnfree.training.config import UnknownKeyError, unknown_keys
    from lnfree.training.run import train

    run = tmp_path / "run"
    with pytest.raises(UnknownKeyError, match=r"trainer\.max_step \(did you mean trainer\.max_steps\?\)"):
        train(compose_train(run, *TINY_RUN, "+trainer.max_step=10"))
    assert not run.exists()
    with pytest.raises(UnknownKeyError, match=r"schedule\.pre_mlp\.strat \(did you mean schedule\.pre_mlp\.start\?\)"):
        train(compose_train(run, *TINY_RUN, "+schedule.pre_mlp.strat=3"))
    with pytest.raises(UnknownKeyError, match="foo"):
        train(compose_train(run, *TINY_RUN, "+foo=1"))
    from omegaconf import OmegaConf

    # the documented free-key extension point (model.shape: HF config fields) takes any key
    cfg = compose_train(run, *TINY_RUN, "+model.shape.layer_norm_epsilon=1e-6")
    assert unknown_keys(OmegaConf.to_container(cfg, resolve=False)) == []


@pytest.mark.parametrize("override", ["optim.lr=inf", "trainer.max_loss=inf", "schedule.aux_weight=nan",
                                      "+model.shape.layer_norm_epsilon=inf"])
def test_non_finite_numbers_are_refused_by_the_limit_check(tmp_path, monkeypatch, override):
    import lnfree.training.run as tr

    monkeypatch.setattr(tr, "open_source", lambda *a, **k: pytest.fail("the model was looked up"))
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(LimitError, match=rf"{key}=(inf|nan) \(must be a finite number\)"):
        train(compose_train(tmp_path, *TINY_RUN, override))


def test_push_to_hub_ids_go_through_the_hubs_own_validator(tmp_path, monkeypatch):
    import lnfree.training.run as tr
    from lnfree.hub import HubPushError, check_push

    with pytest.raises(HubPushError, match="not a valid repo id"):
        check_push("user/re--po")
    monkeypatch.setattr(tr, "load_model", lambda *a, **k: pytest.fail("the model's weights were loaded"))
    with pytest.raises(HubPushError, match=r"'bad repo/na me!!' is not a valid repo id"):
        train(compose_train(tmp_path, *TINY_RUN, "push_to_hub='bad repo/na me!!'"))


@pytest.mark.parametrize("n_positions,overrides,block", [
    (256, [], 256), (128, [], 128), (128, ["data.block_size=64"], 64), (2048, [], 1024)])
def test_the_data_block_follows_the_models_context_unless_set(tmp_path, n_positions, overrides, block):
    from lnfree.training.run import check_config

    cfg = compose_train(tmp_path, *TINY_RUN, "data=local_text", "data.files=[/nowhere/*.jsonl]",
                        f"model.shape.n_positions={n_positions}", "data.block_size=null", *overrides)
    check_config(cfg)  # reads no data
    assert cfg.data.block_size == block
