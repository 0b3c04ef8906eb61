"""Steering generation with SAE features (paper, §Feature steering): sample from the transformer with features
pinned or ablated at the MLP hook (:func:`~monosemantic.models.components.hooks.pin_features`), beside the
unsteered baseline drawn with the same random numbers, so any difference comes from the edit alone."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from monosemantic.analysis.collect import token_windows
from monosemantic.errors import ConfigError
from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.models.components.transformer import HookFn, Transformer


@torch.no_grad()
def next_token_logits(model: Transformer, ids: list[int], hook: Callable[[int], HookFn | None] | None = None
                      ) -> torch.Tensor:
    """Logits ``[V]`` for the token after ``ids`` (its last ``n_ctx`` tokens). ``hook(window_start)`` gives the
    MLP hook for a window that starts at that index of ``ids`` (None: no edit)."""
    start = max(0, len(ids) - model.cfg.n_ctx)
    ctx = torch.tensor([ids[start:]], device=model.embed.weight.device)
    fn = hook(start) if hook is not None else None
    logits = model(ctx) if fn is None else model.forward_with_mlp_hook(ctx, fn)
    return logits[0, -1].float()


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, seed: int, temperature: float = 1.0,
             top_k: int | None = None, hook: Callable[[int], HookFn | None] | None = None) -> list[int]:
    """Sample ``max_new_tokens`` after the prompt. The generator is seeded with ``seed`` and draws one uniform
    number per token whatever the distribution, so two calls with the same seed differ only where their
    distributions do. ``temperature=0`` is greedy."""
    if not prompt_ids:
        raise ConfigError("the prompt encodes to no tokens")
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, ids, hook).cpu()
        u = torch.rand((), generator=g)
        if temperature == 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        cdf = torch.softmax(logits, -1).cumsum(0)
        # inverse-CDF sampling; side="right" never lands on a token of probability 0 (masked by top_k)
        ids.append(int(torch.searchsorted(cdf, u * cdf[-1], side="right").clamp_max(len(cdf) - 1)))
    return ids[len(prompt_ids):]


@torch.no_grad()
def scan_features(model: Transformer, sae: SparseAutoencoder, tokens: np.ndarray, token_id: int | None = None,
                  batch_windows: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Over the tiled windows of ``tokens``: each feature's maximum activation ``[F]``, and, when ``token_id``
    is given, how specific each feature is to that token ``[F]``: (share of the feature's activation mass on
    the token) × (share of the token's occurrences where the feature fires)."""
    T = model.cfg.n_ctx
    max_F = torch.zeros(sae.d_sae)
    on_tok_F, mass_F, fires_on_tok_F, n_tok = torch.zeros(sae.d_sae), torch.zeros(sae.d_sae), torch.zeros(sae.d_sae), 0
    for tokens_BT, _ in token_windows(tokens, T, batch_windows):
        f_NF = sae.encode(model.mlp_acts(tokens_BT.to(model.embed.weight.device)).flatten(0, 1)).cpu()
        max_F = torch.maximum(max_F, f_NF.amax(0))
        if token_id is not None:
            hit_N = tokens_BT.flatten() == token_id
            n_tok += int(hit_N.sum())
            mass_F += f_NF.sum(0)
            on_tok_F += f_NF[hit_N].sum(0)
            fires_on_tok_F += (f_NF[hit_N] > 0).sum(0)
    if token_id is None:
        return max_F, None
    if n_tok == 0:
        return max_F, torch.zeros(sae.d_sae)
    return max_F, (on_tok_F / mass_F.clamp_min(1e-12)) * (fires_on_tok_F / n_tok)
