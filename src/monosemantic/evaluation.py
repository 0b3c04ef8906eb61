"""Every SAE metric of DESIGN §3 in one container, used by validation and by ``src/eval.py``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from monosemantic.metrics import (
    L0,
    ExplainedVariance,
    FeatureDensity,
    LossRecovered,
    ReconstructionMSE,
    splice_losses,
)
from monosemantic.models.components import hooks


def raw_reconstruction(sae: nn.Module, acts: torch.Tensor, scale: float) -> torch.Tensor:
    """The reconstruction of *raw* activations by an SAE that works on ``scale``-normalised ones."""
    return sae(acts.float() * scale).x_hat / scale


class SAEMetrics(nn.Module):
    """MSE, explained variance, L0, densities (on activations) and loss recovered (on token windows)."""

    def __init__(self, d_in: int, d_sae: int, ablation: str = "zero", sync: bool = True) -> None:
        """``sync=False`` for a single-process evaluation inside a distributed job (rank 0 after training)."""
        super().__init__()
        if ablation not in ("zero", "mean"):
            raise ValueError(f"ablation={ablation!r} is not 'zero' or 'mean'")
        self.ablation = ablation
        kw = {"sync_on_compute": sync}
        self.mse = ReconstructionMSE(**kw)
        self.explained_variance = ExplainedVariance(d_in, **kw)
        self.l0 = L0(**kw)
        self.density = FeatureDensity(d_sae, **kw)
        self.loss_recovered = LossRecovered(ablation, **kw)

    @torch.no_grad()
    def update_acts(self, x_BM: torch.Tensor, x_hat_BM: torch.Tensor, feats_BF: torch.Tensor) -> None:
        self.mse.update(x_BM, x_hat_BM)
        self.explained_variance.update(x_BM, x_hat_BM)
        self.l0.update(feats_BF)
        self.density.update(feats_BF)

    @torch.no_grad()
    def update_tokens(self, transformer: nn.Module, tokens_BT: torch.Tensor,
                      reconstruct: Callable[[torch.Tensor], torch.Tensor], mean_acts_M: torch.Tensor | None) -> None:
        if self.ablation == "mean":
            if mean_acts_M is None:
                raise ValueError("mean-ablation needs the mean activation vector")
            ablate = hooks.mean_ablate(mean_acts_M)
        else:
            ablate = hooks.zero_ablate()
        self.loss_recovered.update(*splice_losses(transformer, tokens_BT, reconstruct, ablate))

    def compute_and_reset(self, with_tokens: bool) -> dict[str, torch.Tensor]:
        """Compute and reset. Every rank must call this with the same ``with_tokens`` (under DDP the metrics
        all-gather in ``compute``, so it runs on a rank that saw no batch too: its states are zeros)."""
        density = self.density.compute()
        out = {"mse": self.mse.compute(), "explained_variance": self.explained_variance.compute(),
               "l0": self.l0.compute(), **{k: density[k] for k in ("dead_frac", "dense_frac", "ultralow_frac",
                                                                    "log10_density")},
               "n_tokens": self.density.n_tokens.clone()}
        if with_tokens:
            out.update(self.loss_recovered.compute())
        for m in (self.mse, self.explained_variance, self.l0, self.density, self.loss_recovered):
            m.reset()
        return out


@torch.no_grad()
def evaluate(sae: nn.Module, acts_batches: Iterable[torch.Tensor], token_batches: Iterable[torch.Tensor] | None,
             transformer: nn.Module | None, scale: float = 1.0, ablation: str = "zero",
             mean_acts_M: torch.Tensor | None = None, device: str = "cpu") -> dict[str, float | list]:
    """All metrics for ``sae`` on held-out data, in this process alone (no cross-rank sync).

    ``acts_batches`` are activations already multiplied by ``scale`` (the SAE's input space); token windows
    go through ``transformer`` with raw activations."""
    start = time.time()
    d_in, d_sae = sae.W_enc.shape
    m = SAEMetrics(d_in, d_sae, ablation, sync=False).to(device)
    sae = sae.to(device).eval()
    for x in acts_batches:
        x = x.to(device)
        out = sae(x)
        m.update_acts(x, out.x_hat, out.feats)
    if transformer is not None and token_batches is not None:
        transformer = transformer.to(device).eval()

        for tokens in token_batches:
            m.update_tokens(transformer, tokens.to(device), lambda a: raw_reconstruction(sae, a, scale), mean_acts_M)
    result = m.compute_and_reset(with_tokens=transformer is not None and token_batches is not None)
    result["mse"] = result["mse"] / scale**2  # raw-activation units whatever space the SAE works in
    out: dict[str, float | list] = {k: (v.tolist() if v.ndim else float(v)) for k, v in result.items()}
    out["eval_seconds"] = round(time.time() - start, 2)
    return out
