"""Incremental PCA of G problems at once: the SVD of streamed rows, batched over layers of one shape.

The update is PEFT's `IncrementalPCA.partial_fit` (peft/utils/incremental_pca.py, itself scikit-learn's):
the running mean and variance in float64, the previous components scaled by their singular values stacked
over the new centred rows and a mean-correction row, then one SVD, the signs fixed by the largest entry of
each right-singular vector (`svd_flip`, v-based), and the first `n_components` kept. Two differences, both
on purpose: the G problems of one stacked tensor (the inputs of layers of one width) go through one batched
`torch.linalg.svd`, and that SVD is exact, where PEFT's EVA calls `torch.svd_lowrank(q=2k, niter=4, seed
42)`: a randomised approximation whenever 2k < min(rows, features), exact up to rounding otherwise.
As in PEFT, the first fit's SVD runs on float32 rows; the later ones stack float64 terms, so they run in float64.
"""

from __future__ import annotations

import torch

__all__ = ["IncrementalPCA"]


class IncrementalPCA:
    """G incremental PCAs of `n_features` columns, each keeping `n_components` components.

    `partial_fit(X, rows)` updates the problems `rows` (all of them by default) with X of shape
    (len(rows), n_samples, n_features). The state is one tensor per quantity with G leading:
    `components_` (G, k, d), `singular_values_` (G, k), `explained_variance_ratio_` (G, k), `mean_` and
    `var_` (G, d, float64), `n_samples_seen_` (G,). A problem's first fit must see at least k rows.
    """

    def __init__(self, n_problems: int, n_features: int, n_components: int) -> None:
        if not 1 <= n_components <= n_features:
            raise ValueError(f"n_components must be in [1, n_features={n_features}], got {n_components}")
        self.n_problems, self.n_features, self.n_components = n_problems, n_features, n_components
        self.fitted = torch.zeros(n_problems, dtype=torch.bool)
        self.components_: torch.Tensor | None = None

    def _allocate(self, device: torch.device) -> None:
        g, d, k = self.n_problems, self.n_features, self.n_components
        f64 = dict(dtype=torch.float64, device=device)
        self.components_ = torch.zeros(g, k, d, **f64)
        self.singular_values_ = torch.zeros(g, k, **f64)
        self.explained_variance_ratio_ = torch.zeros(g, k, **f64)
        self.mean_ = torch.zeros(g, d, **f64)
        self.var_ = torch.zeros(g, d, **f64)
        self.n_samples_seen_ = torch.zeros(g, dtype=torch.long, device=device)

    @torch.no_grad()
    def partial_fit(self, X: torch.Tensor, rows: torch.Tensor | None = None) -> "IncrementalPCA":
        """One incremental step of the problems `rows` on their new rows X (len(rows), n, d)."""
        if rows is None:
            rows = torch.arange(self.n_problems)
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if X.ndim != 3 or X.shape[0] != len(rows) or X.shape[2] != self.n_features:
            raise ValueError(f"X must be ({len(rows)}, n_samples, {self.n_features}), got {tuple(X.shape)}")
        first = ~self.fitted[rows]
        if first.any() and not first.all():
            raise ValueError("partial_fit: the problems of one call must all be fitted before, or none")
        if first.all() and X.shape[1] < self.n_components:
            raise ValueError(f"partial_fit: a first fit needs >= {self.n_components} rows, got {X.shape[1]}")
        if self.components_ is None:
            self._allocate(X.device)
        dev = self.components_.device
        rows_d = rows.to(dev)
        X = X.to(device=dev, dtype=torch.float32 if X.dtype not in (torch.float32, torch.float64) else X.dtype).clone()
        n = X.shape[1]
        seen = self.n_samples_seen_[rows_d]
        mean, var, total = _mean_and_var(X, self.mean_[rows_d], self.var_[rows_d], seen)
        if bool(first.all()):
            X -= mean.unsqueeze(1)  # in place: float32 rows stay float32, as in PEFT
        else:
            batch_mean = X.mean(dim=1, keepdim=True)
            X = X - batch_mean
            factor = torch.sqrt(seen.double() / total * n).unsqueeze(-1)
            correction = factor * (self.mean_[rows_d] - batch_mean.squeeze(1))
            prev = self.singular_values_[rows_d].unsqueeze(-1) * self.components_[rows_d]
            X = torch.cat([prev, X.double(), correction.unsqueeze(1)], dim=1)
        _, S, Vt = torch.linalg.svd(X, full_matrices=False)
        Vt = _flip_signs(Vt)
        k = self.n_components
        ratio = S.double() ** 2 / (var * total.unsqueeze(-1)).sum(-1, keepdim=True)
        self.components_[rows_d] = Vt[:, :k].double()
        self.singular_values_[rows_d] = S[:, :k].double()
        self.explained_variance_ratio_[rows_d] = ratio[:, :k]
        self.mean_[rows_d], self.var_[rows_d], self.n_samples_seen_[rows_d] = mean, var, total
        self.fitted[rows] = True
        return self


def _mean_and_var(X: torch.Tensor, last_mean: torch.Tensor, last_var: torch.Tensor, last_n: torch.Tensor):
    """The running column mean and (biased) variance after X (G, n, d), as PEFT's `_incremental_mean_and_var`
    (a first step when last_n is 0); float64 sums."""
    n = X.shape[1]
    total = last_n + n
    last_sum = last_mean * last_n.unsqueeze(-1)
    new_sum = X.sum(dim=1, dtype=torch.float64)
    mean = (last_sum + new_sum) / total.unsqueeze(-1)
    temp = X - (new_sum / n).unsqueeze(1)
    correction = temp.sum(dim=1, dtype=torch.float64).square()
    new_unnorm = temp.square().sum(dim=1, dtype=torch.float64) - correction / n
    ratio = (last_n.double() / n).unsqueeze(-1)
    # the merge term vanishes for a first step (last_n = 0); written so that 0/0 never occurs
    cross = torch.where(ratio > 0, ratio / total.unsqueeze(-1) * (last_sum / ratio.clamp_min(1e-300) - new_sum).square(),
                        torch.zeros_like(new_sum))
    var = (last_var * last_n.unsqueeze(-1) + new_unnorm + cross) / total.unsqueeze(-1)
    return mean, var, total


def _flip_signs(Vt: torch.Tensor) -> torch.Tensor:
    """Each right-singular vector with its largest-magnitude entry positive (svd_flip, v-based)."""
    idx = Vt.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(Vt.gather(-1, idx))
    return Vt * signs
