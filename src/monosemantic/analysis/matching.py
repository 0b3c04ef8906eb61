"""Matching the units of two sets: feature splitting (a smaller SAE's features against a larger one's, on one
transformer) and universality (two transformers' SAEs, or neurons, on the same tokens).

Two similarities, as the paper uses them:

* **decoder cosine** ``[F, G]``: the cosine of the dictionary rows. Meaningful only when both SAEs read the
  same activation space (one transformer).
* **activation correlation** ``[F, G]``: Pearson's r of the two units' activations over the same tokens,
  accumulated in one pass by :class:`CrossCorrelation`. It is what universality rests on ("median activation
  correlation 0.72 for features vs 0.46 for neurons"), since two transformers' activation spaces share no
  basis.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def decoder_cosine(W_a_FM: torch.Tensor, W_b_GM: torch.Tensor) -> torch.Tensor:
    """``[F, G]`` cosine similarity of the dictionary rows (rows are normalised here, so free norms do not
    matter)."""
    if W_a_FM.shape[-1] != W_b_GM.shape[-1]:
        raise ValueError(f"dictionaries over different spaces: rows of {W_a_FM.shape[-1]} and {W_b_GM.shape[-1]} "
                         "dimensions")
    return F.normalize(W_a_FM.detach().float(), dim=1) @ F.normalize(W_b_GM.detach().float(), dim=1).T


def _sparse(acts_NU: torch.Tensor) -> torch.Tensor:
    n, u = (acts_NU != 0).nonzero(as_tuple=True)
    return torch.sparse_coo_tensor(torch.stack([n, u]), acts_NU[n, u].double(), acts_NU.shape,
                                   check_invariants=False)


class CrossCorrelation:
    """Pearson correlation ``[F, G]`` between two unit sets' activations on the same tokens, over batches.

    Keeps ``n``, ``Σa``, ``Σb``, ``Σa²``, ``Σb²`` and ``Σ a_f b_g`` (float64). SAE features are sparse, so
    the cross sum is a sparse product (cost ∝ Σ_tokens L0_a·L0_b, never a dense ``N·F·G`` per batch); a set
    denser than ``dense_above`` (neurons) is multiplied densely.
    """

    def __init__(self, n_a: int, n_b: int, dense_above: float = 0.05) -> None:
        self.n_a, self.n_b, self.dense_above = n_a, n_b, dense_above
        self.n = 0
        self.sum_a = torch.zeros(n_a, dtype=torch.float64)
        self.sum_b = torch.zeros(n_b, dtype=torch.float64)
        self.sq_a = torch.zeros(n_a, dtype=torch.float64)
        self.sq_b = torch.zeros(n_b, dtype=torch.float64)
        self.cross = torch.zeros(n_a, n_b, dtype=torch.float64)

    @torch.no_grad()
    def update(self, a_NF: torch.Tensor, b_NG: torch.Tensor) -> None:
        if a_NF.shape[0] != b_NG.shape[0] or a_NF.shape[1] != self.n_a or b_NG.shape[1] != self.n_b:
            raise ValueError(f"expected [N, {self.n_a}] and [N, {self.n_b}] on the same N tokens, got "
                             f"{tuple(a_NF.shape)} and {tuple(b_NG.shape)}")
        a, b = a_NF.detach().cpu().float(), b_NG.detach().cpu().float()
        self.n += a.shape[0]
        self.sum_a += a.sum(0, dtype=torch.float64)
        self.sum_b += b.sum(0, dtype=torch.float64)
        self.sq_a += a.double().pow(2).sum(0)
        self.sq_b += b.double().pow(2).sum(0)
        dense_a = (a != 0).float().mean() > self.dense_above
        dense_b = (b != 0).float().mean() > self.dense_above
        if dense_a and dense_b:
            self.cross += a.double().T @ b.double()
            return
        with warnings.catch_warnings():  # "sparse support is in beta": the product is checked in the tests
            warnings.simplefilter("ignore", UserWarning)
            if dense_a or dense_b:  # one sparse side: sparse @ dense
                if dense_a:
                    self.cross += torch.sparse.mm(_sparse(b).t().coalesce(), a.double()).T
                else:
                    self.cross += torch.sparse.mm(_sparse(a).t().coalesce(), b.double())
                return
            prod = torch.sparse.mm(_sparse(a).t().coalesce(), _sparse(b)).coalesce()
        ij = prod.indices()
        self.cross.view(-1).index_add_(0, ij[0] * self.n_b + ij[1], prod.values())

    def result(self) -> torch.Tensor:
        """``[F, G]`` float32; a unit that never varied (silent) has correlation 0 with everything."""
        n = max(self.n, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - mean_a[:, None] * mean_b[None, :]
        std_a = (self.sq_a / n - mean_a.pow(2)).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b.pow(2)).clamp_min(0).sqrt()
        denom = std_a[:, None] * std_b[None, :]
        return torch.where(denom > 1e-12, cov / denom.clamp_min(1e-300), 0.0).float()


def best_matches(sim_FG: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row unit, its ``k`` most similar column units: (values ``[F, k]``, indices ``[F, k]``)."""
    k = min(k, sim_FG.shape[1])
    return sim_FG.topk(k, dim=1)


def children(cos_FG: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[F]``: how many of the larger dictionary's features have this smaller-SAE feature as their nearest
    (by decoder cosine) at cosine ≥ ``threshold``: the features it split into. Each larger feature counts
    once, toward its best match."""
    best_G, parent_G = cos_FG.max(dim=0)
    keep = best_G >= threshold
    return torch.bincount(parent_G[keep], minlength=cos_FG.shape[0])


def summary(values: torch.Tensor, alive: torch.Tensor | None = None) -> dict[str, float]:
    """Median, quartiles and mean of per-unit values (over ``alive`` units only, when given)."""
    v = values.float()[alive] if alive is not None else values.float()
    if v.numel() == 0:
        return {"n": 0}
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75]))
    return {"n": int(v.numel()), "median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]),
            "mean": float(v.mean())}
