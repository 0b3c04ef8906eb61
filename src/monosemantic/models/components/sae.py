"""The sparse autoencoder of "Towards Monosemanticity" (Bricken et al., 2023), as a plain ``nn.Module``.

Paper, §Problem setup / appendix "Autoencoder architecture"::

    x̄ = x − b_dec;   f = ReLU(x̄ W_enc + b_enc);   x̂ = f W_dec + b_dec

Parameters are raw tensors in SAELens' layout (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``), so the
export needs no transposes and nothing hides behind ``nn.Linear``'s ``[out, in]`` convention. Row ``i``
of ``W_dec`` is feature ``i``'s dictionary vector; the paper keeps it at unit L2 norm, which is what makes
feature activations comparable and the L1 penalty meaningful.

Shape suffixes: ``B`` batch (any leading dims), ``M`` d_in (the MLP width), ``F`` d_sae (features),
``N`` a sample of inputs, ``K`` one input per resampled feature.

The training loop owns *when* the in-place maintenance methods run; the methods own *what* they do:
``remove_parallel_grads_`` before each optimizer step, ``normalize_decoder_`` after it,
``init_b_dec_geometric_median_`` once before training and ``resample_`` at the resampling steps.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns."""

    x_hat: torch.Tensor
    """Reconstruction ``[..., d_in]``, same shape as the input."""
    feats: torch.Tensor
    """Feature activations ``[..., d_sae]`` (post-ReLU, ≥ 0)."""


class SparseAutoencoder(nn.Module):
    def __init__(self, d_in: int, d_sae: int, tied_init: bool = True) -> None:
        """
        Args:
            d_in: activation width (512 MLP neurons in the paper).
            d_sae: dictionary size.
            tied_init: start the encoder as the decoder's transpose (the weights stay untied while training).
                The paper draws both independently; on synthetic data with known directions (see
                ``tests/test_ground_truth.py``) the tied start recovered them far better (mean max cosine
                0.97 vs 0.67 after the same steps), as SAELens and dictionary_learning also found.
        """
        super().__init__()
        self.tied_init = tied_init
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        self.d_in, self.d_sae = d_in, d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-uniform encoder and decoder drawn independently (the paper's weights are untied),
        decoder rows then scaled to unit norm; biases zero (b_dec is later set to the geometric median).

        ``kaiming_uniform_`` reads fan-in from dim 1 (``nn.Linear``'s ``[out, in]`` layout), so it is
        applied to the transposed views, whose dim 1 is the input side of each matmul.
        """
        nn.init.kaiming_uniform_(self.W_enc.T, nonlinearity="relu")  # fan_in = d_in
        nn.init.kaiming_uniform_(self.W_dec.T, nonlinearity="relu")  # fan_in = d_sae
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.normalize_decoder_()
        if self.tied_init:
            self.W_enc.copy_(self.W_dec.T)

    def encode(self, x_BM: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` for inputs ``[..., d_in]``."""
        return F.relu((x_BM - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, feats_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` from feature activations ``[..., d_sae]``."""
        return feats_BF @ self.W_dec + self.b_dec

    def forward(self, x_BM: torch.Tensor) -> SAEOutput:
        feats_BF = self.encode(x_BM)
        return SAEOutput(x_hat=self.decode(feats_BF), feats=feats_BF)

    # ---- in-place maintenance (paper, appendix "Autoencoder training") ----

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-12) -> None:
        """Scale each dictionary vector (row of ``W_dec``) to unit L2 norm; run after every step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(eps))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from ``W_dec.grad`` the part parallel to each dictionary vector: ``g ← g − (g·d) d``.

        With unit-norm rows this is the projection onto the sphere's tangent space, so the step moves
        the direction of each vector rather than fighting the renormalisation that follows it.
        Assumes unit-norm rows (call after ``normalize_decoder_``); a no-op when there is no gradient.
        """
        grad_FM = self.W_dec.grad
        if grad_FM is None:
            return
        W_dec_FM = self.W_dec
        parallel_F1 = (grad_FM * W_dec_FM).sum(dim=1, keepdim=True)
        grad_FM.sub_(parallel_F1 * W_dec_FM)

    @torch.no_grad()
    def init_b_dec_geometric_median_(self, x_NM: torch.Tensor, n_iter: int = 100, tol: float = 1e-7,
                                     eps: float = 1e-8) -> torch.Tensor:
        """Set ``b_dec`` to the geometric median of the sample ``x_NM`` (paper: b_d's initialisation).

        Weiszfeld's algorithm: iterate ``y ← Σ w_i x_i / Σ w_i`` with ``w_i = 1 / ‖x_i − y‖``, in float64
        from the mean. Distances are clamped to ``eps`` so a sample point lying on the current estimate
        (e.g. at the median itself) gets a large finite weight instead of a division by zero. Stops when
        the estimate moves less than ``tol`` (relative to the data's scale) or after ``n_iter``.
        Returns the median ``[d_in]`` (also written into ``b_dec``).
        """
        if x_NM.ndim != 2 or x_NM.shape[1] != self.d_in:
            raise ValueError(f"expected a sample [N, {self.d_in}], got shape {tuple(x_NM.shape)}")
        if x_NM.shape[0] == 0:
            raise ValueError("cannot take the geometric median of an empty sample")
        x64_NM = x_NM.detach().to(torch.float64)
        y_M = x64_NM.mean(dim=0)
        scale = float(x64_NM.norm(dim=1).max().clamp_min(1.0))
        for i in range(n_iter):
            w_N = 1.0 / (x64_NM - y_M).norm(dim=1).clamp_min(eps)
            y_new_M = (w_N[:, None] * x64_NM).sum(dim=0) / w_N.sum()
            moved = float((y_new_M - y_M).norm())
            y_M = y_new_M
            if moved < tol * scale:
                log.debug("geometric median converged after %d Weiszfeld iterations", i + 1)
                break
        self.b_dec.copy_(y_M.to(self.b_dec))
        return self.b_dec.detach().clone()

    @torch.no_grad()
    def resample_(self, dead_F: torch.Tensor, inputs_KM: torch.Tensor, enc_norm_scale: float = 0.2,
                  eps: float = 1e-12) -> None:
        """Re-initialise dead features from chosen inputs (paper, appendix "Neuron resampling").

        For dead feature ``i`` with input ``x`` (row ``k`` of ``inputs_KM`` goes to ``dead_F[k]``):
        ``W_dec[i] := x / ‖x‖``; ``W_enc[:, i] := x / ‖x‖ · enc_norm_scale · mean_alive ‖W_enc[:, j]‖``;
        ``b_enc[i] := 0``. The mean norm is over the encoder vectors of the features *not* in ``dead_F``,
        measured before any change (1.0 when every feature is dead). Choosing the inputs (∝ loss²) and
        resetting the optimizer's moments are the caller's job (see ``callbacks.resampler``).
        """
        dead_F = torch.as_tensor(dead_F, dtype=torch.long, device=self.W_enc.device).flatten()
        if inputs_KM.shape != (dead_F.numel(), self.d_in):
            raise ValueError(f"need one input [{self.d_in}] per dead feature: {dead_F.numel()} dead, "
                             f"inputs of shape {tuple(inputs_KM.shape)}")
        if dead_F.numel() == 0:
            return
        if dead_F.unique().numel() != dead_F.numel():
            raise ValueError("dead_F contains repeated feature indices")
        alive_F = torch.ones(self.d_sae, dtype=torch.bool, device=dead_F.device)
        alive_F[dead_F] = False
        if alive_F.any():
            mean_alive_norm = self.W_enc[:, alive_F].norm(dim=0).mean()
        else:
            mean_alive_norm = torch.ones((), device=self.W_enc.device, dtype=self.W_enc.dtype)

        x_KM = inputs_KM.to(self.W_dec)
        unit_KM = x_KM / x_KM.norm(dim=1, keepdim=True).clamp_min(eps)
        self.W_dec[dead_F] = unit_KM
        self.W_enc[:, dead_F] = (unit_KM * (enc_norm_scale * mean_alive_norm)).T
        self.b_enc[dead_F] = 0.0


def raw_reconstruction(sae: nn.Module, acts: torch.Tensor, scale: float) -> torch.Tensor:
    """The reconstruction of *raw* activations by an SAE that works on ``scale``-normalised ones."""
    return sae(acts.float() * scale).x_hat / scale
