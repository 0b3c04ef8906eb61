"""Automatic interpretability proxies that need no external model, and the direct logit effect they use.

All three proxies are computed the same way for every unit set (SAE features, neurons, a control) and on
the same footing: each unit is judged on a *uniform random sample of exactly ``n_sample`` of its firings*
(kept during the pass, see :mod:`.collect`). A unit that fired fewer times is left out (NaN) and counted.
This matters: on all of its firings, a unit that fired 3 times has a top-5 token share of 1.0 whatever it
means; on a fixed-size sample, rarity buys nothing.

* **token specificity**: the share of the sample's activation mass on its ``n_tokens`` most-weighted
  tokens (the token at the firing position). 1.0 for a unit that fires on ≤ ``n_tokens`` distinct tokens;
  for a unit firing at random positions, about the share of the corpus' commonest tokens.
* **context consistency**: the mean pairwise Jaccard similarity of the token sets of the contexts (the
  firing token and the ``context`` tokens before it, same window) of the sample's ``n_context`` strongest
  firings. 1.0 when those contexts are the same n-gram; near 0 for unrelated contexts. Positions before
  the window's start are unknown tokens that match nothing (a firing at position 0 has no context).
* **logit coherence**: the share of the sample's activation mass at positions whose *next* token is among
  the ``n_logit`` tokens the unit's direct logit effect promotes most. It asks whether what the unit
  writes to the logits agrees with what follows where it fires (the paper's logit-based check, without a
  model to grade it); 1.0 when every firing is followed by a promoted token.

The direct logit effect of a unit with dictionary direction ``d`` (neuron space) is ``W_U · LN(W_out d)``
with the final LayerNorm treated as the paper does: its centring and gain are linear and kept, its
division by the residual's norm (a positive number per position, the same for every unit there) is
dropped. The effect is shifted by its median over the vocabulary, so 0 is a typical token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from monosemantic.analysis.collect import UnitStats
from monosemantic.errors import ConfigError


@torch.no_grad()
def direct_logit_effect(transformer: nn.Module, directions_MU: torch.Tensor) -> torch.Tensor:
    """``[U, V]`` median-shifted direct effect on the logits of unit directions ``[d_mlp, U]``."""
    if len(transformer.blocks) != 1:
        raise ValueError("the direct logit effect is defined here for the one-layer model (the hook's MLP is the "
                         f"last layer); this transformer has {len(transformer.blocks)} layers")
    W_out_DM = transformer.blocks[0].mlp.fc_out.weight
    r_DU = W_out_DM @ directions_MU.to(W_out_DM)
    r_DU = r_DU - r_DU.mean(0, keepdim=True)              # the LayerNorm's centring
    r_DU = r_DU * transformer.ln_final.weight[:, None]   # and its gain; its 1/σ is dropped (see module doc)
    W_U_VD = transformer.embed.weight if transformer.unembed is None else transformer.unembed.weight
    logits_UV = (W_U_VD @ r_DU).T
    return logits_UV - logits_UV.median(dim=1, keepdim=True).values


@dataclass
class ProxySettings:
    n_tokens: int = 5
    """token specificity: share of the sampled activation mass on this many tokens"""
    context: int = 4
    """context consistency: tokens before the firing token that form its context"""
    n_context: int = 16
    """context consistency: the sample's strongest firings compared pairwise"""
    n_logit: int = 10
    """logit coherence: the unit's most-promoted tokens"""


PROXIES = ("token_specificity", "context_consistency", "logit_coherence")


def _set_jaccard_mean(ctx_UQL: torch.Tensor, valid_UQL: torch.Tensor) -> torch.Tensor:
    """Mean pairwise Jaccard similarity ``[U]`` of the token *sets* in each unit's ``Q`` contexts of length
    ``L``. A position outside the window (``valid`` False) is an unknown token: it is in its context's set
    but matches nothing, so a firing at a window's start, with no context, does not look consistent."""
    # a token repeated inside one context counts once: keep only its first occurrence
    same = (ctx_UQL[..., :, None] == ctx_UQL[..., None, :]) & valid_UQL[..., :, None] & valid_UQL[..., None, :]
    earlier = torch.tril(torch.ones(same.shape[-1], same.shape[-1], dtype=torch.bool), diagonal=-1)
    first_UQL = valid_UQL & ~(same & earlier).any(-1)
    eq = (ctx_UQL[:, :, None, :, None] == ctx_UQL[:, None, :, None, :])
    eq &= first_UQL[:, :, None, :, None] & first_UQL[:, None, :, None, :]
    inter_UQQ = eq.sum((-1, -2)).float()
    size_UQ = (first_UQL | ~valid_UQL).sum(-1).float()
    union_UQQ = size_UQ[:, :, None] + size_UQ[:, None, :] - inter_UQQ
    jac_UQQ = inter_UQQ / union_UQQ.clamp_min(1)
    Q = ctx_UQL.shape[1]
    off_diag = ~torch.eye(Q, dtype=torch.bool)
    return (jac_UQQ * off_diag).sum((1, 2)) / (Q * (Q - 1))


@torch.no_grad()
def proxies(stats: UnitStats, tokens: np.ndarray, next_tokens: np.ndarray, window_len: int,
            logit_effect_UV: torch.Tensor,
            settings: ProxySettings | None = None) -> dict[str, torch.Tensor]:
    """The three proxies ``[U]`` (NaN for units with fewer firings than the sample size), plus ``eligible``.

    ``tokens`` is the flat array the pass read (``stats``' locations index it); ``next_tokens[i]`` the token
    after ``tokens[i]`` in its text (-1 where unknown: such a firing counts as not followed by a promoted token).
    """
    s = settings or ProxySettings()
    for key in ("n_tokens", "n_logit", "context"):
        if getattr(s, key) < (0 if key == "context" else 1):
            raise ConfigError(f"proxies.{key}={getattr(s, key)} must be ≥ {0 if key == 'context' else 1}")
    if s.n_context < 2:
        raise ConfigError(f"proxies.n_context={s.n_context} must be ≥ 2 (contexts are compared in pairs)")
    tok = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    loc_UM, act_UM = stats.sample_loc, stats.sample_act
    eligible_U = (loc_UM >= 0).all(1)
    out = {name: torch.full((stats.n_fires.numel(),), float("nan")) for name in PROXIES}
    idx = eligible_U.nonzero().flatten()
    if idx.numel() == 0:
        return {**out, "eligible": eligible_U}
    loc_UM, act_UM = loc_UM[idx], act_UM[idx].float()
    mass_U = act_UM.sum(1).clamp_min(1e-30)
    cur_UM = tok[loc_UM]

    # token specificity: per-unit activation mass by token, via a sort (no [U, V] table)
    order = torch.argsort(cur_UM, dim=1)
    cur_sorted, act_sorted = cur_UM.gather(1, order), act_UM.gather(1, order)
    new_run = torch.ones_like(cur_sorted, dtype=torch.bool)
    new_run[:, 1:] = cur_sorted[:, 1:] != cur_sorted[:, :-1]
    run_id = new_run.cumsum(1) - 1
    per_token = torch.zeros_like(act_sorted).scatter_add_(1, run_id, act_sorted)
    k = min(s.n_tokens, per_token.shape[1])
    out["token_specificity"][idx] = per_token.topk(k, dim=1).values.sum(1) / mass_U

    # context consistency: the strongest sampled firings' contexts (firing token and `context` before it)
    q = min(s.n_context, act_UM.shape[1])
    top_UQ = act_UM.topk(q, dim=1).indices
    loc_UQ = loc_UM.gather(1, top_UQ)
    back = torch.arange(s.context, -1, -1)
    ctx_loc = loc_UQ[..., None] - back
    valid = back <= (loc_UQ % window_len)[..., None]  # stay inside the firing's window
    ctx_tok = torch.where(valid, tok[ctx_loc.clamp_min(0)], -1)
    out["context_consistency"][idx] = _set_jaccard_mean(ctx_tok, valid)

    # logit coherence: activation mass where the next token is one the unit's logit effect promotes most
    promoted_UK = logit_effect_UV[idx].topk(min(s.n_logit, logit_effect_UV.shape[1]), dim=1).indices
    nxt_UM = torch.from_numpy(np.asarray(next_tokens, dtype=np.int64))[loc_UM]
    hit_UM = (nxt_UM[..., None] == promoted_UK[:, None, :]).any(-1)
    out["logit_coherence"][idx] = (act_UM * hit_UM).sum(1) / mass_U
    return {**out, "eligible": eligible_U}


def summarize(values: dict[str, torch.Tensor]) -> dict[str, float | int]:
    """Medians (and quartiles) over the eligible units, and how many there were."""
    out: dict[str, float | int] = {"n_eligible": int(values["eligible"].sum()), "n_units": len(values["eligible"])}
    for name in PROXIES:
        v = values[name][~values[name].isnan()]
        if v.numel():
            out[f"{name}_median"] = float(v.median())
            out[f"{name}_q25"], out[f"{name}_q75"] = (float(x) for x in v.quantile(torch.tensor([0.25, 0.75])))
    return out


DENSITY_BANDS = ((1e-4, 1e-3), (1e-3, 1e-2), (1e-2, 1e-1), (1e-1, 1.0))


def summarize_by_density(values: dict[str, torch.Tensor], density: torch.Tensor,
                         bands: tuple[tuple[float, float], ...] = DENSITY_BANDS) -> list[dict]:
    """Medians per firing-density band (``lo ≤ density < hi``), so units are also compared at matched
    firing rates: the SAE's features are far sparser than the neurons as a whole."""
    out = []
    for lo, hi in bands:
        below = density <= hi if hi >= 1.0 else density < hi  # the last band includes units firing everywhere
        in_band = (density >= lo) & below & values["eligible"]
        row: dict = {"density_lo": lo, "density_hi": hi, "n_eligible": int(in_band.sum())}
        for name in PROXIES:
            v = values[name][in_band]
            row[f"{name}_median"] = float(v.median()) if v.numel() else None
        out.append(row)
    return out
