"""Our SAE export through SAELens (``sae_lens.SAE``, ``HookedSAETransformer``).

The export (:mod:`monosemantic.export`) is SAELens's v6 folder layout on raw activations, so
``SAE.load_from_disk`` reads it with no conversion. These helpers run what a SAELens user would run,
so that the interop tests can compare each with our own code on the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_sae_lens(export_dir: str | Path, device: str = "cpu"):
    """``sae_lens.SAE.load_from_disk`` on one of our exports (local files only)."""
    from sae_lens import SAE

    return SAE.load_from_disk(str(export_dir), device=device)


@torch.no_grad()
def reconstruct(sae, x: torch.Tensor) -> torch.Tensor:
    """SAELens's reconstruction ``decode(encode(x))`` of raw activations ``x`` ``[..., d_in]``."""
    return sae.decode(sae.encode(x))


@torch.no_grad()
def spliced_loss(model, sae, tokens_BT: torch.Tensor) -> float:
    """Mean next-token CE with ``sae``'s reconstruction in place of its hook's activations (no error term),
    through ``HookedSAETransformer.run_with_saes``: the quantity our ``ce_sae`` is (positions 0..T−2)."""
    return float(model.run_with_saes(tokens_BT, saes=[sae], use_error_term=False, return_type="loss"))


@torch.no_grad()
def steered_logits(model, sae, feature: int, value: float, start: int, tokens_BT: torch.Tensor) -> torch.Tensor:
    """Logits with feature ``feature`` pinned to ``value`` at positions ``start:``, the SAELens way: the SAE
    attached with its error term (so everything it does not reconstruct passes through), and a hook on
    ``<hook>.hook_sae_acts_post`` editing the feature. Our ``hooks.pin_features(..., keep_error=True)``."""
    name = f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"

    def pin(acts, hook):
        acts[:, start:, feature] = value
        return acts

    with model.saes(saes=[sae], use_error_term=True):
        return model.run_with_hooks(tokens_BT, fwd_hooks=[(name, pin)])
