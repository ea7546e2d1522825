import pytest
from datasets import Dataset

from adarank.runner.data.split import carve_validation, subsample


def _ds(n):
    return Dataset.from_dict({"idx": list(range(n))})


def test_carve_partitions_train():
    train, val = carve_validation(_ds(100), 0.1, seed=0)
    assert (len(train), len(val)) == (90, 10)
    tr, va = list(train["idx"]), list(val["idx"])
    assert not set(tr) & set(va) and sorted(tr + va) == list(range(100))
    assert tr == sorted(tr)  # file order kept inside a split


def test_carve_is_seeded():
    ds = _ds(50)
    a = list(carve_validation(ds, 0.2, seed=3)[1]["idx"])
    assert a == list(carve_validation(ds, 0.2, seed=3)[1]["idx"])
    assert a != list(carve_validation(ds, 0.2, seed=4)[1]["idx"])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_carve_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="data.val_fraction"):
        carve_validation(_ds(10), fraction, seed=0)


def test_carve_rejects_empty_split():
    with pytest.raises(ValueError, match="data.val_fraction"):
        carve_validation(_ds(3), 0.01, seed=0)


def test_subsample():
    ds = _ds(20)
    assert subsample(ds, None, 0) is ds and subsample(ds, 50, 0) is ds
    a = list(subsample(ds, 5, seed=1)["idx"])
    assert len(a) == 5 and len(set(a)) == 5 and a == list(subsample(ds, 5, seed=1)["idx"])
    assert a != list(subsample(ds, 5, seed=2)["idx"])
    with pytest.raises(ValueError, match="max_train_samples"):
        subsample(ds, 0, 0)
