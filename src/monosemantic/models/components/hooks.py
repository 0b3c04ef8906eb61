"""Functions to attach to the MLP hook: read, replace or edit the post-ReLU activations.

Each factory returns a ``fn(acts_BTM) -> acts_BTM | None`` for ``Transformer.forward_with_mlp_hook``
or ``HookPoint.attach``. The steering edit follows the paper's recipe (§Feature steering):
pinning feature i to value c is ``x ← x + (c − f_i(x)) · d_i``; ablating it is ``x ← x − f_i(x) · d_i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from monosemantic.errors import ConfigError
from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.models.components.transformer import HookFn


def capture(store: list[torch.Tensor]) -> HookFn:
    """Append a detached copy of the activations to ``store``; leave them unchanged."""

    def fn(acts_BTM: torch.Tensor) -> None:
        store.append(acts_BTM.detach().clone())

    return fn


def zero_ablate() -> HookFn:
    return lambda acts_BTM: torch.zeros_like(acts_BTM)


def mean_ablate(mean_M: torch.Tensor) -> HookFn:
    """Replace every position's activations by a fixed mean vector ``[d_mlp]``."""
    return lambda acts_BTM: mean_M.to(acts_BTM).expand_as(acts_BTM)


def replace_with(reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> HookFn:
    """Replace the activations by ``reconstruct(acts)`` (e.g. an SAE's reconstruction)."""
    return lambda acts_BTM: reconstruct(acts_BTM)


def edit_feature(feature_act: Callable[[torch.Tensor], torch.Tensor], direction_M: torch.Tensor,
                 value: float | None, positions: slice | None = None) -> HookFn:
    """Set one feature to ``value`` (or ablate it when ``value`` is None) along ``direction_M``.

    ``feature_act(acts_BTM) -> [B, T]`` is the feature's activation (e.g. ``sae.encode(x)[..., i]``);
    ``direction_M`` its unit decoder vector. ``positions`` restricts the edit (e.g. ``slice(10, None)``
    to leave a prompt untouched).
    """

    def fn(acts_BTM: torch.Tensor) -> torch.Tensor:
        f_BT = feature_act(acts_BTM)
        target = torch.zeros_like(f_BT) if value is None else torch.full_like(f_BT, value)
        delta_BTM = (target - f_BT).unsqueeze(-1) * direction_M.to(acts_BTM)
        if positions is not None:
            mask_T = torch.zeros(acts_BTM.shape[1], dtype=acts_BTM.dtype, device=acts_BTM.device)
            mask_T[positions] = 1
            delta_BTM = delta_BTM * mask_T[None, :, None]
        return acts_BTM + delta_BTM

    return fn


def pin_features(sae: SparseAutoencoder, indices: list[int], values: list[float | None], keep_error: bool = True,
                 start: int = 0) -> HookFn:
    """Pin SAE features ``indices`` to ``values`` (None: ablate, i.e. pin to 0) at positions ``start:``.

    ``keep_error=True`` (the delta form, the paper's): ``x ← x + Σ_i (c_i − f_i(x)) · d_i``, so everything
    the SAE does not reconstruct (its error term) passes through untouched. ``keep_error=False`` replaces
    the activations by the SAE's reconstruction with the features pinned, ``x ← W_dec·f' + b_dec``, which
    also drops the error term. ``sae`` works on the raw activations this hook sees.
    """
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.numel() == 0:
        raise ConfigError("pin_features needs at least one feature index")
    if int(idx.min()) < 0 or int(idx.max()) >= sae.d_sae:
        raise ConfigError(f"feature indices {indices} out of range for an SAE with {sae.d_sae} features")
    target_K = torch.tensor([0.0 if v is None else float(v) for v in values])

    def fn(acts_BTM: torch.Tensor) -> torch.Tensor:
        dev = acts_BTM.device
        i, c_K = idx.to(dev), target_K.to(acts_BTM)
        if keep_error:
            # the SAE's own encoder: TopK needs every pre-activation, JumpReLU its thresholds, and a
            # recipe without pre-encoder bias does not subtract b_dec
            f_BTK = sae.encode(acts_BTM)[..., i]
            new_BTM = acts_BTM + (c_K - f_BTK) @ sae.W_dec[i]
        else:
            f_BTF = sae.encode(acts_BTM)
            f_BTF[..., i] = c_K
            new_BTM = sae.decode(f_BTF)
        if start > 0:
            new_BTM[:, :start] = acts_BTM[:, :start]
        return new_BTM

    return fn
