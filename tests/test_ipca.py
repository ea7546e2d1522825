"""The incremental PCA against the SVD of all the data at once, and against PEFT's IncrementalPCA step by step."""

from __future__ import annotations

import pytest
import torch

from adarank.ipca import IncrementalPCA


def _data(n: int, d: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if rank is None:  # full rank, a decaying spectrum so the components are well separated
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    else:
        x = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    return (x + 3.0).float()  # an offset: the mean has to be tracked


def _reference(x: torch.Tensor, k: int):
    xc = x.double() - x.double().mean(0)
    _, s, vt = torch.linalg.svd(xc, full_matrices=False)
    return vt[:k], s[:k], (s**2 / (xc**2).sum())[:k]


def _same_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    sign = torch.sign((a * b).sum(-1, keepdim=True))
    return torch.allclose(a, sign * b, atol=atol)


@pytest.mark.parametrize("d,k,rank", [(12, 12, None), (12, 4, 3), (20, 5, 5)])
def test_streamed_equals_the_svd_of_all_rows(d, k, rank):
    """Exact where no step truncates information: all components kept, or data of rank <= k."""
    x = _data(90, d, rank)
    pca = IncrementalPCA(1, d, k)
    for chunk in x.split(15):
        pca.partial_fit(chunk[None])
    vt, s, ratio = _reference(x, k)
    top = k if rank is None else rank  # past the data's rank the directions are rounding noise
    assert _same_up_to_sign(pca.components_[0, :top], vt[:top], atol=1e-5)
    torch.testing.assert_close(pca.singular_values_[0], s, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pca.explained_variance_ratio_[0], ratio, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(pca.mean_[0], x.double().mean(0), rtol=1e-9, atol=1e-9)
    assert int(pca.n_samples_seen_[0]) == 90


def test_batched_problems_and_subsets_equal_separate_fits():
    """Three problems stacked, the third sitting out the second step, equal three separate fits."""
    xs = [_data(45, 10, seed=s) for s in range(3)]
    together = IncrementalPCA(3, 10, 4)
    together.partial_fit(torch.stack([x[:15] for x in xs]))
    together.partial_fit(torch.stack([x[15:30] for x in xs[:2]]), torch.tensor([0, 1]))
    together.partial_fit(torch.stack([x[30:] for x in xs]))
    for i, x in enumerate(xs):
        alone = IncrementalPCA(1, 10, 4)
        for part in ([x[:15], x[15:30], x[30:]] if i < 2 else [x[:15], x[30:]]):
            alone.partial_fit(part[None])
        torch.testing.assert_close(together.components_[i], alone.components_[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(together.explained_variance_ratio_[i], alone.explained_variance_ratio_[0])


def test_matches_peft_incremental_pca_with_its_exact_svd():
    """PEFT's semantics, including the truncation at every step (k < rank of the data) and the sign
    convention (not up to sign: both flip each vector's largest entry positive)."""
    from peft.utils.incremental_pca import IncrementalPCA as PeftIPCA

    x = _data(80, 16)
    ours, peft = IncrementalPCA(1, 16, 5), PeftIPCA(n_components=5, lowrank=False)
    for chunk in x.split(20):
        ours.partial_fit(chunk[None])
        peft.partial_fit(chunk)
        torch.testing.assert_close(ours.components_[0], peft.components_.double(), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.explained_variance_ratio_[0], peft.explained_variance_ratio_.double(),
                                   rtol=1e-5, atol=1e-8)


def test_bad_shapes_and_first_fits_are_refused():
    pca = IncrementalPCA(2, 8, 4)
    with pytest.raises(ValueError, match="X must be"):
        pca.partial_fit(torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="first fit needs"):
        pca.partial_fit(torch.zeros(2, 3, 8))
    pca.partial_fit(torch.randn(1, 6, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="all be fitted before, or none"):
        pca.partial_fit(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="n_components"):
        IncrementalPCA(1, 4, 5)
