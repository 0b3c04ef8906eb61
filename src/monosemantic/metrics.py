"""SAE metrics (DESIGN §3) as torchmetrics with summed float64 states.

Every state is a sum (``dist_reduce_fx="sum"``), so the value after a DDP sync equals the value on the
concatenated data, and every ratio is formed once in ``compute()``: averaging per-batch ratios would
weight batches wrongly and, for explained variance, use the wrong mean. float64 because these sums run
over millions of tokens.

Reading order: reconstruction (MSE, explained variance) → sparsity (L0, feature density) → downstream
loss (loss recovered). The splice that produces loss recovered's inputs, and the container of all of them,
are in :mod:`monosemantic.evaluation`; the density histogram in :mod:`monosemantic.plots`.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

_f64 = torch.float64

DENSE_THRESHOLD = 1e-2  # paper: many features denser than 1% means the L1 coefficient is too low
ULTRALOW_THRESHOLD = 1e-6  # paper: the "ultralow density cluster"
LOG10_FLOOR = -10.0  # log10 density given to features that never fired


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [n, d]`` in float64 (tokens may come as ``[B, T, d]``)."""
    return x.detach().reshape(-1, x.shape[-1]).to(_f64)


class _SumMetric(Metric):
    full_state_update = False

    def _sum_state(self, name: str, shape: tuple[int, ...] = ()) -> None:
        self.add_state(name, default=torch.zeros(shape, dtype=_f64), dist_reduce_fx="sum")


class ReconstructionMSE(_SumMetric):
    """Mean over tokens and elements of ``(x − x̂)²``: a sum of squares over a count of elements."""

    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sum_state("sum_sq_err")
        self._sum_state("n_elements")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        err = _flat(x) - _flat(x_hat)
        self.sum_sq_err += err.square().sum()
        self.n_elements += err.numel()

    def compute(self) -> torch.Tensor:
        return self.sum_sq_err / self.n_elements


class ExplainedVariance(_SumMetric):
    """``1 − Σ‖x − x̂‖² / Σ‖x − μ‖²`` with both sums and the mean ``μ`` over the whole eval set.

    The denominator is kept as sums: ``Σ‖x − μ‖² = Σ‖x‖² − n‖μ‖²`` with ``μ = Σx / n``, so the result
    does not depend on how the data was split into batches (or ranks). ``d_in`` fixes the shape of the
    ``Σx`` state up front; without it the state takes its shape from the first batch, which is fine on
    one process but needs every DDP rank to see at least one batch.
    """

    higher_is_better = True

    def __init__(self, d_in: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sum_state("sum_sq_err")
        self._sum_state("sum_sq_x")
        self._sum_state("sum_x", () if d_in is None else (d_in,))
        self._sum_state("n_tokens")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x_NM, x_hat_NM = _flat(x), _flat(x_hat)
        self.sum_sq_err += (x_NM - x_hat_NM).square().sum()
        self.sum_sq_x += x_NM.square().sum()
        self.sum_x = self.sum_x + x_NM.sum(dim=0)  # broadcasts the scalar default on the first batch
        self.n_tokens += x_NM.shape[0]

    def compute(self) -> torch.Tensor:
        total_var = self.sum_sq_x - self.sum_x.square().sum() / self.n_tokens
        return 1.0 - self.sum_sq_err / total_var


class L0(_SumMetric):
    """Mean over tokens of the number of active features (``f_i > 0``)."""

    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sum_state("n_active")
        self._sum_state("n_tokens")

    def update(self, feats: torch.Tensor) -> None:
        feats_NF = feats.detach().reshape(-1, feats.shape[-1])
        self.n_active += (feats_NF > 0).sum().to(_f64)
        self.n_tokens += feats_NF.shape[0]

    def compute(self) -> torch.Tensor:
        return self.n_active / self.n_tokens


def density_summary(fire_counts_F: torch.Tensor, n_tokens: float | torch.Tensor) -> dict[str, torch.Tensor]:
    """Fractions of features by firing density over ``n_tokens`` tokens, from per-feature counts ``[d_sae]``.

    ``dead_frac`` (fired on none of them), ``dense_frac`` (density > 1e-2), ``log10_density`` ``[d_sae]``
    (``log10(max(density, 1e-10))``, for the paper's bimodal histogram) and ``n_tokens``; ``ultralow_frac``
    (0 < density < 1e-6: the paper's ultralow cluster, counted apart from the dead features) only when
    the window can show it: a feature that fires once in ``n`` tokens has density ``1/n``, so on a million
    tokens or fewer the fraction would be 0 by construction, a number that says nothing.
    """
    fire_counts_F = fire_counts_F.to(_f64)
    n = torch.as_tensor(n_tokens, dtype=_f64, device=fire_counts_F.device)
    density_F = fire_counts_F / n.clamp_min(1)
    out = {
        "dead_frac": (fire_counts_F == 0).to(_f64).mean(),
        "dense_frac": (density_F > DENSE_THRESHOLD).to(_f64).mean(),
        "log10_density": density_F.clamp_min(10.0**LOG10_FLOOR).log10(),
        "n_tokens": n,
    }
    if float(n) * ULTRALOW_THRESHOLD > 1:
        out["ultralow_frac"] = ((density_F > 0) & (density_F < ULTRALOW_THRESHOLD)).to(_f64).mean()
    return out


class FeatureDensity(_SumMetric):
    """Per-feature firing counts over the tokens seen since the last reset; ``compute()`` is
    :func:`density_summary` of them."""

    def __init__(self, d_sae: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.d_sae = d_sae
        self._sum_state("fire_counts", (d_sae,))
        self._sum_state("n_tokens")

    def update(self, feats: torch.Tensor | None = None, *, fires: torch.Tensor | None = None,
               n_tokens: int | None = None) -> None:
        """Either dense ``feats [..., d_sae]``, or per-feature firing counts ``fires [d_sae]`` over
        ``n_tokens`` tokens (for callers that hold sparse features)."""
        if feats is not None:
            feats_NF = feats.detach().reshape(-1, feats.shape[-1])
            fires, n_tokens = (feats_NF > 0).sum(dim=0), feats_NF.shape[0]
        if fires is None or n_tokens is None or fires.shape != (self.d_sae,):
            width = feats.shape[-1] if feats is not None else None
            raise ValueError(f"FeatureDensity(d_sae={self.d_sae}) needs feats [..., {self.d_sae}] or fires "
                             f"[{self.d_sae}] with n_tokens (got features of width {width})")
        self.fire_counts += fires.to(_f64)
        self.n_tokens += n_tokens

    def compute(self) -> dict[str, torch.Tensor]:
        return density_summary(self.fire_counts, self.n_tokens)


class LossRecovered(_SumMetric):
    """Fraction of the next-token loss the SAE recovers relative to an ablation baseline (paper, §Loss):

    ``(CE_ablated − CE_sae) / (CE_ablated − CE_clean)``: 1 when splicing in the reconstruction costs
    nothing, 0 when it is as bad as ablating the MLP. ``update`` takes per-token *sums* (see
    :func:`monosemantic.evaluation.splice_losses`); ``ablation`` ("zero" or "mean") only labels which
    baseline was used. ``compute()`` on no tokens returns ``{}``, and without ``loss_recovered`` when the
    ablation leaves the loss unchanged: it is then absent (the caller says why), never a 0/0 NaN.
    """

    higher_is_better = True

    def __init__(self, ablation: str = "zero", **kwargs) -> None:
        super().__init__(**kwargs)
        if ablation not in ("zero", "mean"):
            raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
        self.ablation = ablation
        for name in ("ce_clean", "ce_sae", "ce_ablated", "kl", "n_tokens"):
            self._sum_state(name)

    def update(self, ce_clean: float | torch.Tensor, ce_sae: float | torch.Tensor,
               ce_ablated: float | torch.Tensor, kl: float | torch.Tensor, n_tokens: int) -> None:
        self.ce_clean += torch.as_tensor(ce_clean, dtype=_f64, device=self.device)
        self.ce_sae += torch.as_tensor(ce_sae, dtype=_f64, device=self.device)
        self.ce_ablated += torch.as_tensor(ce_ablated, dtype=_f64, device=self.device)
        self.kl += torch.as_tensor(kl, dtype=_f64, device=self.device)
        self.n_tokens += n_tokens

    def compute(self) -> dict[str, torch.Tensor]:
        if float(self.n_tokens) == 0:
            return {}
        ce_clean, ce_sae = self.ce_clean / self.n_tokens, self.ce_sae / self.n_tokens
        ce_ablated = self.ce_ablated / self.n_tokens
        out = {"ce_clean": ce_clean, "ce_sae": ce_sae, "ce_ablated": ce_ablated, "kl": self.kl / self.n_tokens}
        if ce_ablated != ce_clean:  # else ablating the MLP costs nothing: there is no loss to recover (0/0)
            out["loss_recovered"] = (ce_ablated - ce_sae) / (ce_ablated - ce_clean)
        return out


RECOVERED_COSINE = 0.9  # a true feature counts as recovered when some dictionary row is this close


def ground_truth_recovery(W_dec_FM: torch.Tensor, directions_KM: torch.Tensor,
                          threshold: float = RECOVERED_COSINE) -> dict[str, float]:
    """How well a dictionary recovers known directions (synthetic data, :mod:`monosemantic.data.synthetic`).

    For each true direction, its best cosine similarity with any dictionary row: ``mmcs`` is their mean (mean
    max cosine similarity, as in Sharkey et al.'s "Taking features out of superposition"), ``recovered`` the
    fraction above ``threshold``. Rows and directions are normalised here, so free decoder norms do not matter.
    """
    if W_dec_FM.shape[-1] != directions_KM.shape[-1]:
        raise ValueError(f"the dictionary's rows have {W_dec_FM.shape[-1]} dimensions, the true directions "
                         f"{directions_KM.shape[-1]}")
    d = torch.nn.functional.normalize(W_dec_FM.detach().float(), dim=1)
    t = torch.nn.functional.normalize(directions_KM.detach().float(), dim=1)
    best_K = (t @ d.T).max(dim=1).values
    return {"mmcs": float(best_K.mean()), "recovered": float((best_K > threshold).float().mean()),
            "recovered_threshold": float(threshold)}
