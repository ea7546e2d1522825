import pytest
import torch

from adarank.runner.data.loader import Batches
from adarank.runner.data.tokenize import EncodedSplit

N = 10


def _split(types=False):
    lengths = torch.tensor([3, 5, 2, 7, 4, 1, 6, 2, 3, 5], dtype=torch.int32)
    ids = torch.zeros(N, 7, dtype=torch.int32)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = 100 + i  # row i is filled with 100 + i, then padding 0
    tt = (ids > 0).int() if types else None
    return EncodedSplit(input_ids=ids, lengths=lengths, labels=torch.arange(N), token_type_ids=tt)


def _rows(batches):
    return [r for b in batches for r in b["labels"].tolist()]


def test_batches_trim_and_mask():
    split = _split(types=True)
    batches = list(Batches(split, batch_size=4, shuffle=False))
    assert [b["input_ids"].shape for b in batches] == [(4, 7), (4, 6), (2, 5)]
    for b in batches:
        lengths = split.lengths[b["labels"]]
        assert b["attention_mask"].sum(1).tolist() == lengths.tolist()
        assert torch.equal(b["attention_mask"].bool(), b["input_ids"] > 0)
        assert torch.equal(b["token_type_ids"], b["attention_mask"])
        assert b["input_ids"].dtype == torch.int64 and b["attention_mask"].dtype == torch.int64
    assert _rows(batches) == list(range(N))


def test_len_and_drop_last():
    split = _split()
    assert len(Batches(split, 4, shuffle=True)) == 3
    dropped = Batches(split, 4, shuffle=True, drop_last=True)
    assert len(dropped) == 2 and len(list(dropped)) == 2


def test_shuffle_is_deterministic_and_epoch_dependent():
    split = _split()
    a = Batches(split, 3, shuffle=True, seed=7)
    b = Batches(split, 3, shuffle=True, seed=7)
    assert _rows(a) == _rows(b)
    assert sorted(_rows(a)) == list(range(N))
    epoch0 = _rows(a)
    a.set_epoch(1)
    assert _rows(a) != epoch0 and sorted(_rows(a)) == list(range(N))
    a.set_epoch(0)
    assert _rows(a) == epoch0
    assert _rows(Batches(split, 3, shuffle=True, seed=8)) != epoch0


def test_skip_batches_equals_slicing():
    loader = Batches(_split(), 3, shuffle=True, seed=1)
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, start_batch=2)
    rest = list(loader)
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=5)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_distributed_shards_partition(world_size):
    split = _split()
    shards = [Batches(split, 2, shuffle=True, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for s in shards:
        s.set_epoch(3)
    rows = [_rows(s) for s in shards]
    per_rank = -(-N // world_size)
    assert all(len(r) == per_rank for r in rows) and len({len(s) for s in shards}) == 1
    everything = [i for r in rows for i in r]
    assert sorted(set(everything)) == list(range(N))
    assert len(everything) - N == per_rank * world_size - N  # only the padding repeats
    # interleaving the shards gives back the single-process order, padded by repetition
    single = Batches(split, 2, shuffle=True, seed=5)
    single.set_epoch(3)
    order = single.indices().tolist()
    interleaved = [rows[r][i] for i in range(per_rank) for r in range(world_size)]
    assert interleaved == (order * 2)[:per_rank * world_size]


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        Batches(_split(), 2, shuffle=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(_split(), 0, shuffle=False)
