"""SAE metrics (DESIGN §3) as torchmetrics with summed float64 states.

Every state is a sum (``dist_reduce_fx="sum"``), so the value after a DDP sync equals the value on the
concatenated data, and every ratio is formed once in ``compute()``: averaging per-batch ratios would
weight batches wrongly and, for explained variance, use the wrong mean. float64 because these sums run
over millions of tokens.

Reading order: reconstruction (MSE, explained variance) → sparsity (L0, feature density + histogram)
→ downstream loss (loss recovered, and the splice that measures it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics import Metric

from monosemantic.models.components import hooks
from monosemantic.models.components.transformer import HookFn, Transformer

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


class FeatureDensity(_SumMetric):
    """Per-feature firing counts over the tokens seen since the last reset.

    ``compute()`` returns ``dead_frac`` (fired on none of these tokens), ``dense_frac`` (density > 1e-2),
    ``ultralow_frac`` (0 < density < 1e-6: the paper's ultralow cluster, counted apart from the dead
    features; it can only be non-zero on more than a million tokens) and ``log10_density`` ``[d_sae]``
    (``log10(max(density, 1e-10))``, for the paper's bimodal histogram).
    """

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
        density_F = self.fire_counts / self.n_tokens
        return {
            "dead_frac": (density_F == 0).to(_f64).mean(),
            "dense_frac": (density_F > DENSE_THRESHOLD).to(_f64).mean(),
            "ultralow_frac": ((density_F > 0) & (density_F < ULTRALOW_THRESHOLD)).to(_f64).mean(),
            "log10_density": density_F.clamp_min(10.0**LOG10_FLOOR).log10(),
        }


def density_histogram_figure(log10_density: torch.Tensor, title: str = "feature density") -> Figure:
    """Histogram of log10 feature density, bins from -10 to 0 (never-fired features sit at -10).

    Built on an Agg canvas without pyplot, so it works headless and leaks no global figure state.
    """
    fig = Figure(figsize=(6, 3.5), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = log10_density.detach().to(torch.float64).cpu().numpy()
    ax.hist(values, bins=50, range=(LOG10_FLOOR, 0.0), color="tab:blue")
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("features")
    ax.set_title(title)
    return fig


def save_density_histogram(log10_density: torch.Tensor, path: str | Path,
                           title: str = "feature density") -> Path:
    """Write the density histogram as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    density_histogram_figure(log10_density, title).savefig(path, format="png", dpi=100)
    return path


class LossRecovered(_SumMetric):
    """Fraction of the next-token loss the SAE recovers relative to an ablation baseline (paper, §Loss):

    ``(CE_ablated − CE_sae) / (CE_ablated − CE_clean)``: 1 when splicing in the reconstruction costs
    nothing, 0 when it is as bad as ablating the MLP. ``update`` takes per-token *sums* (see
    :func:`splice_losses`); ``ablation`` ("zero" or "mean") only labels which baseline was used.
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
        ce_clean, ce_sae = self.ce_clean / self.n_tokens, self.ce_sae / self.n_tokens
        ce_ablated = self.ce_ablated / self.n_tokens
        return {
            "ce_clean": ce_clean,
            "ce_sae": ce_sae,
            "ce_ablated": ce_ablated,
            "kl": self.kl / self.n_tokens,
            "loss_recovered": (ce_ablated - ce_sae) / (ce_ablated - ce_clean),
        }


def _next_token_logprobs(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[B*(T-1), V]`` at positions 0..T-2 (those with a next token), in float32+."""
    logits = logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1])
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


@torch.no_grad()
def splice_losses(model: Transformer, tokens_BT: torch.Tensor,
                  reconstruct: Callable[[torch.Tensor], torch.Tensor],
                  ablation_hook_fn: HookFn) -> tuple[float, float, float, float, int]:
    """Next-token losses with the MLP activations clean, replaced by ``reconstruct``, and ablated.

    ``reconstruct`` maps raw activations ``[B, T, d_mlp]`` to the SAE's reconstruction (same shape);
    ``ablation_hook_fn`` is e.g. ``hooks.zero_ablate()`` or ``hooks.mean_ablate(mean_M)``.
    Positions 0..T-2 predict tokens 1..T-1. Returns sums over those ``n = B·(T−1)`` positions:
    ``(ce_clean, ce_sae, ce_ablated, kl, n)`` with ``kl`` = Σ KL(p_clean ‖ p_sae), ready for
    :meth:`LossRecovered.update`. The model's train/eval mode is left as the caller set it.
    """
    if tokens_BT.ndim != 2 or tokens_BT.shape[1] < 2:
        raise ValueError(f"need tokens [B, T] with T ≥ 2, got shape {tuple(tokens_BT.shape)}")
    targets_N = tokens_BT[:, 1:].reshape(-1)
    logp_clean = _next_token_logprobs(model(tokens_BT))
    logp_sae = _next_token_logprobs(model.forward_with_mlp_hook(tokens_BT, hooks.replace_with(reconstruct)))
    logp_abl = _next_token_logprobs(model.forward_with_mlp_hook(tokens_BT, ablation_hook_fn))

    def ce_sum(logp_NV: torch.Tensor) -> float:
        return float(F.nll_loss(logp_NV, targets_N, reduction="sum"))

    kl_sum = float(F.kl_div(logp_sae, logp_clean, reduction="sum", log_target=True))
    return ce_sum(logp_clean), ce_sum(logp_sae), ce_sum(logp_abl), kl_sum, int(targets_N.numel())
