"""Evaluating an SAE (DESIGN §3): the splice that measures loss recovered, every metric in one container
(:class:`SAEMetrics`, used by validation during training and by ``src/eval.py``), and :func:`evaluate`.

This sits above ``models/`` (it runs the transformer with the SAE spliced in) and below the stages; the
LightningModule receives its :class:`SAEMetrics` from the config (``model.metrics``), so ``models/``
imports nothing from here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from monosemantic.errors import ConfigError
from monosemantic.metrics import (
    L0,
    ExplainedVariance,
    FeatureDensity,
    LossRecovered,
    ReconstructionMSE,
    density_summary,
)
from monosemantic.models.components import hooks
from monosemantic.models.components.sae import raw_reconstruction
from monosemantic.models.components.transformer import HookFn, Transformer
from monosemantic.models.transformer_module import load_transformer


def splice_transformer(dm, device: str | torch.device = "cpu") -> tuple[nn.Module | None, str | None]:
    """The frozen transformer an activation datamodule's source (shard set or on-the-fly model) names, for the
    splice; or None and why: no loadable transformer there, or not the one that wrote the set (its weights
    changed since)."""
    ckpt = (dm.manifest.get("model") or {}).get("checkpoint")
    if not ckpt or not Path(ckpt, "model.safetensors").is_file():
        return None, f"activation source {dm.source} names no loadable transformer ({ckpt!r})"
    identity = Path(dm.source) / "cache_identity.json"  # a shard set's record of its model
    recorded = json.loads(identity.read_text()).get("model_sha256") if identity.is_file() else None
    if recorded and recorded != hashlib.sha256(Path(ckpt, "model.safetensors").read_bytes()).hexdigest():
        return None, (f"the transformer at {ckpt} is not the one that wrote shard set {dm.source} "
                      "(its weights changed since): the splice would measure another model")
    return load_transformer(ckpt, device)[0], None


def no_windows_reason(dm, n_windows: int | None = None) -> str | None:
    """Why there are no held-out token windows for loss recovered (None: there are ``n_windows`` of them, or
    the datamodule's ``lr_windows`` when None)."""
    if dm.lr_windows(n_windows) is not None:
        return None
    count = dm.hparams.lr_windows if n_windows is None else n_windows
    return (f"no held-out token windows: the token store {dm.manifest.get('token_store')!r} is missing, "
            f"or {count} windows were asked for")


def lr_absent_reason(metrics: dict, windows_reason: str | None) -> str | None:
    """Why ``metrics`` (from :func:`evaluate`) hold no ``loss_recovered``; None when they do."""
    if "loss_recovered" in metrics:
        return None
    if windows_reason:
        return windows_reason
    if "ce_clean" in metrics:
        return "ablating the MLP leaves the next-token loss unchanged (CE ablated = CE clean): no loss to recover"
    return "no held-out token windows were read"


def too_small_warnings(metrics: dict, min_tokens: int, min_lr_tokens: int) -> list[str]:
    """Why ``metrics`` (from :func:`evaluate`) may not measure what they report: a held-out set of fewer than
    ``min_tokens`` activations (MSE, L0 and explained variance are noisy, and every feature rarer than one in
    that many reads as dead) or loss recovered from fewer than ``min_lr_tokens`` spliced tokens."""
    out = []
    n = int(metrics.get("n_tokens") or 0)
    if n < min_tokens:
        out.append(f"the held-out set has {n:,} activations, fewer than eval_min_tokens={min_tokens:,}: MSE, L0 "
                   f"and explained variance are noisy, and dead_frac counts as dead every feature rarer than 1 in "
                   f"{max(n, 1):,}. Hold out more (a bigger cache, data.val_shards, data.val_tokens)")
    lr_tokens = metrics.get("lr_tokens")
    if "loss_recovered" in metrics and lr_tokens is not None and int(lr_tokens) < min_lr_tokens:
        out.append(f"loss recovered comes from {int(lr_tokens):,} spliced tokens, fewer than "
                   f"eval_min_lr_tokens={min_lr_tokens:,} (raise final_eval_lr_windows, or a bigger token store)")
    return out


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


class SAEMetrics(nn.Module):
    """MSE, explained variance, L0, densities (on activations) and loss recovered (on token windows)."""

    def __init__(self, d_in: int, d_sae: int, ablation: str = "zero", sync: bool = True) -> None:
        """``sync=False`` for a single-process evaluation inside a distributed job (rank 0 after training)."""
        super().__init__()
        if ablation not in ("zero", "mean"):
            raise ConfigError(f"ablation={ablation!r} is not 'zero' or 'mean'")
        self.ablation = ablation
        kw = {"sync_on_compute": sync}
        self.mse = ReconstructionMSE(**kw)
        self.explained_variance = ExplainedVariance(d_in, **kw)
        self.l0 = L0(**kw)
        self.density = FeatureDensity(d_sae, **kw)
        self.loss_recovered = LossRecovered(ablation, **kw)

    # the same fractions over counts kept elsewhere (the training window's, already summed over ranks)
    summarize_density = staticmethod(density_summary)

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

    def compute_and_reset(self) -> dict[str, torch.Tensor]:
        """Compute and reset. Under DDP the metrics all-gather in ``compute``, so every rank calls this (a
        rank that saw no batch contributes zeros). Loss recovered and its CE values are present only when
        some rank spliced token windows; ``ultralow_frac`` only on more than a million tokens."""
        out = {"mse": self.mse.compute(), "explained_variance": self.explained_variance.compute(),
               "l0": self.l0.compute(), **self.density.compute()}
        lr = self.loss_recovered.compute()
        if lr:
            out.update(lr, lr_tokens=self.loss_recovered.n_tokens.clone())
        for m in (self.mse, self.explained_variance, self.l0, self.density, self.loss_recovered):
            m.reset()
        return out


@torch.no_grad()
def evaluate(sae: nn.Module, acts_batches: Iterable[torch.Tensor], token_batches: Iterable[torch.Tensor] | None,
             transformer: nn.Module | None, scale: float = 1.0, ablation: str = "zero",
             mean_acts_M: torch.Tensor | None = None, device: str | torch.device = "cpu") -> dict[str, float | list]:
    """All metrics for ``sae`` on held-out data, in this process alone (no cross-rank sync).

    ``acts_batches`` are activations already multiplied by ``scale`` (the SAE's input space); token windows
    go through ``transformer`` with raw activations. MSE is reported on raw activations."""
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
    result = m.compute_and_reset()
    result["mse"] = result["mse"] / scale**2  # raw-activation units whatever space the SAE works in
    out: dict[str, float | list] = {k: (v.tolist() if v.ndim else float(v)) for k, v in result.items()}
    out["eval_seconds"] = round(time.time() - start, 2)
    return out
