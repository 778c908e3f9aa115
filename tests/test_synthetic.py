"""data=synthetic: the Bigram-Backcopy + induction blocks (positive controls for the interp analyses)."""

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lnfree.data.streams import DataError
from lnfree.data.synthetic import BigramBackcopy, SyntheticBlocks
from lnfree.training.config import data_module


class Tok:  # what the module uses of a tokenizer
    eos_token_id = 0

    def __len__(self):
        return 4096


def module(**kw):
    """data=synthetic (conf/data/synthetic.yaml) with these values instead of its own."""
    args = dict(synthetic={"vocab": 16, "n_triggers": 2}, seed=1, block_size=64, micro_batch_size=3, val_blocks=5)
    args.update(kw)
    return data_module(Tok(), "synthetic", **args)


def test_blocks_follow_the_task_rules():
    task = BigramBackcopy(vocab=16, n_triggers=2, low=1, repeat_prob=0.0)
    x = np.array(task.block(seed=3, index=0, block_size=400, bos=0))
    assert x[0] == 0 and ((x[1:] >= 1) & (x[1:] < 17)).all()
    t = x[1:] - 1  # task tokens
    after_trigger = [i for i in range(2, len(t)) if t[i - 1] < 2]
    assert len(after_trigger) > 10
    assert all(t[i] == t[i - 2] for i in after_trigger)  # back-copy
    # elsewhere the next token is a trigger or follows the bigram chain among the 14 ordinary tokens
    chain = [i for i in range(1, len(t)) if i not in after_trigger and t[i] >= 2]
    assert all(task.transition[t[i - 1] - 2, t[i] - 2] > 0 for i in chain)
    # triggers come after any ordinary token (~trigger_prob of the time), so the copy cannot be guessed
    assert 0.05 < len(after_trigger) / len(t) < 0.15
    assert len({t[i - 2] for i in after_trigger}) >= 8
    # the peaked bigram rows make the chain far more predictable than uniform
    assert (task.transition.max(1) > 3 / 14).mean() > 0.9


def test_repeated_spans_for_induction():
    task = BigramBackcopy(vocab=64, n_triggers=3, repeat_prob=1.0, repeat_len=(10, 10))
    for g in range(20):
        x = task.block(seed=0, index=g, block_size=128, bos=0)[1:]
        windows = {tuple(x[i:i + 10]) for i in range(len(x) - 9)}
        assert len(windows) < len(x) - 9, "no 10-token span occurs twice"


def test_same_seed_same_blocks_other_seed_other_blocks_and_validation_apart():
    a, b, c = module(seed=1), module(seed=1), module(seed=2)
    for m in (a, b, c):
        m.setup()
    first = lambda m: torch.stack(list(itertools.islice(iter(m._train_dataset(0, 1)), 6)))  # noqa: E731
    assert torch.equal(first(a), first(b))
    assert not torch.equal(first(a), first(c))
    assert torch.equal(a.val_data, c.val_data)  # validation does not depend on the run's seed
    train_rows = {tuple(r.tolist()) for r in first(a)} | {tuple(r.tolist()) for r in first(c)}
    assert not train_rows & {tuple(r.tolist()) for r in a.val_data}


def test_resume_and_ranks_and_workers_see_the_right_blocks():
    task = BigramBackcopy(vocab=16, n_triggers=2)
    whole = list(itertools.islice(iter(SyntheticBlocks(task, 32, 0, seed=1, micro_batch_size=3)), 30))
    resumed = list(itertools.islice(iter(SyntheticBlocks(task, 32, 0, seed=1, skip_batches=4, micro_batch_size=3)),
                                    18))
    assert all(torch.equal(x, y) for x, y in zip(whole[12:], resumed))
    # two ranks: disjoint, and together the single-rank stream
    r0 = list(itertools.islice(iter(SyntheticBlocks(task, 32, 0, 1, rank=0, world_size=2, micro_batch_size=3)), 6))
    r1 = list(itertools.islice(iter(SyntheticBlocks(task, 32, 0, 1, rank=1, world_size=2, micro_batch_size=3)), 6))
    assert all(torch.equal(x, y) for x, y in zip(r0[:3] + r1[:3] + r0[3:] + r1[3:], whole[:12]))
    # two DataLoader workers give the batches in the single-process order, also after a resume
    for skip in (0, 3):
        ds = SyntheticBlocks(task, 32, 0, seed=1, skip_batches=skip, micro_batch_size=3)
        batches = list(itertools.islice(iter(DataLoader(ds, batch_size=3, num_workers=2)), 4))
        assert torch.equal(torch.cat(batches), torch.stack(whole[3 * skip:3 * skip + 12]))


@pytest.mark.slow
def test_bad_settings_fail_before_any_compute():
    with pytest.raises(DataError, match="vocab"):
        module(synthetic={"vocab": 3, "n_triggers": 3})
    with pytest.raises(DataError, match="leave out BOS"):
        module(synthetic={"vocab": 16, "low": 0})
    with pytest.raises(DataError, match="fit the tokenizer"):
        module(synthetic={"vocab": 5000})
    with pytest.raises(DataError, match="need data=synthetic"):
        data_module(Tok(), "builtin", synthetic={"vocab": 16})
