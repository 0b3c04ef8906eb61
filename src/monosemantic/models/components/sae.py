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

import inspect
import logging
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from monosemantic.errors import ConfigError
from monosemantic.models.components.sparse_step import _row_offsets

log = logging.getLogger(__name__)


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns."""

    x_hat: torch.Tensor
    """Reconstruction ``[..., d_in]``, same shape as the input."""
    feats: torch.Tensor
    """Feature activations ``[..., d_sae]`` (post-ReLU, ≥ 0)."""


class SparseAutoencoder(nn.Module):
    """The paper's SAE (``architecture="standard"``): ReLU features, an L1 penalty, unit-norm dictionary.

    Subclasses change only how pre-activations become features (:meth:`activate`, :meth:`select`), what
    the sparsity term is (:meth:`penalty`) and what the export holds (:meth:`inference_tensors`,
    :meth:`inference_cfg`); the training module, resampler, metrics and export call these alone.
    """

    architecture = "standard"
    uses_penalty = True
    """whether λ (``l1_coeff``) weights a sparsity term; TopK variants get their sparsity from k."""
    tracks_min_active = False
    """whether :meth:`observe_` wants each step's smallest active feature value."""
    sparse_ok = True
    """whether :func:`~.sparse_step.sparse_forward` can train it (the gradients need only active entries)."""
    prefix_ends: tuple[int, ...] = ()
    """nested dictionaries whose own reconstructions join the loss (Matryoshka: :meth:`MatryoshkaSAE.recon_loss`);
    empty: the loss's reconstruction term is the plain MSE."""

    def __init__(self, d_in: int, d_sae: int, tied_init: bool = True, pre_encoder_bias: bool = True,
                 normalize_decoder: bool = True, decoder_init_norm: float | None = None) -> None:
        """
        Args:
            d_in: activation width (512 MLP neurons in the paper).
            d_sae: dictionary size.
            tied_init: start the encoder as the decoder's transpose (the weights stay untied while training).
                The paper draws both independently; on synthetic data with known directions (see
                ``tests/test_ground_truth.py``) the tied start recovered them far better (mean max cosine
                0.97 vs 0.67 after the same steps), as SAELens and dictionary_learning also found.
            pre_encoder_bias: subtract ``b_dec`` before the encoder (the paper); Anthropic's later updates
                drop it (``f = ReLU(x W_enc + b_enc)``; exported with ``apply_b_dec_to_input: false``).
            normalize_decoder: keep dictionary rows at unit norm (the paper). False: rows are free and the
                L1 term weights each feature by its row's norm, ``Σ_i f_i ‖d_i‖`` (Anthropic, April 2024),
                which the same loss then cannot shrink away; the export folds the norms in.
            decoder_init_norm: the rows' starting norm when ``normalize_decoder`` is false (None: 1; the
                April update used 0.1).
        """
        super().__init__()
        if d_in <= 0 or d_sae <= 0:
            raise ConfigError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        if decoder_init_norm is not None and not decoder_init_norm > 0:
            raise ConfigError(f"decoder_init_norm must be positive, got {decoder_init_norm}")
        self.tied_init = tied_init
        self.pre_encoder_bias = bool(pre_encoder_bias)
        self.unit_decoder = bool(normalize_decoder)
        self.decoder_init_norm = 1.0 if decoder_init_norm is None or normalize_decoder else float(decoder_init_norm)
        self.d_in, self.d_sae = d_in, d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-uniform encoder and decoder drawn independently (the paper's weights are untied),
        decoder rows then scaled to unit norm (``decoder_init_norm`` when rows are free); biases zero
        (b_dec is later set to the geometric median).

        ``kaiming_uniform_`` reads fan-in from dim 1 (``nn.Linear``'s ``[out, in]`` layout), so it is
        applied to the transposed views, whose dim 1 is the input side of each matmul.
        """
        nn.init.kaiming_uniform_(self.W_enc.T, nonlinearity="relu")  # fan_in = d_in
        nn.init.kaiming_uniform_(self.W_dec.T, nonlinearity="relu")  # fan_in = d_sae
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)).mul_(self.decoder_init_norm)
        if self.tied_init:
            self.W_enc.copy_(self.W_dec.T)

    # ---- the forward pass: pre-activations -> features -> reconstruction ----

    def encoder_input(self, x_BM: torch.Tensor) -> torch.Tensor:
        """What the encoder matmul reads: ``x − b_dec`` (pre-encoder bias) or ``x``."""
        return x_BM - self.b_dec if self.pre_encoder_bias else x_BM

    def pre_acts(self, x_BM: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``[..., d_sae]``: ``x̄ W_enc + b_enc``."""
        return self.encoder_input(x_BM) @ self.W_enc + self.b_enc

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        """Features from pre-activations (ReLU here)."""
        return F.relu(pre_BF)

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (row, column) indices of the non-zero features of a 2-D batch, row-major, for the sparse step;
        the values there are the pre-activations themselves."""
        return (pre_BF > 0).nonzero(as_tuple=True)

    def select_biased(self, prod_BF: torch.Tensor, b_enc_F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`select` of ``prod + b_enc`` (``prod = x̄ W_enc``, fp32 or bf16), for the sparse step. ReLU's rule
        is ``prod > −b_enc``, equal to ``prod + b_enc > 0`` in IEEE arithmetic and 3–4× faster on a CPU, as
        it forms no [batch, d_sae] sum (other rules get the sum). A bf16 product (the dense path adds the fp32
        bias to it) is compared in bf16 with −b_enc rounded down to bf16: for a bf16 ``p``, ``p > c`` exactly
        when ``p > round_down(c)``."""
        if type(self).select is not SparseAutoencoder.select:
            return self.select(prod_BF.float() + b_enc_F)
        threshold_F = -b_enc_F.detach().float()
        if prod_BF.dtype != torch.float32:
            low = threshold_F.to(prod_BF.dtype)
            below = torch.full_like(low, float("-inf"))
            threshold_F = torch.where(low.float() > threshold_F, torch.nextafter(low, below), low)
        return (prod_BF > threshold_F).nonzero(as_tuple=True)

    def encode(self, x_BM: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` for inputs ``[..., d_in]``."""
        return self.activate(self.pre_acts(x_BM))

    def decode(self, feats_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` from feature activations ``[..., d_sae]``."""
        return feats_BF @ self.W_dec + self.b_dec

    def forward(self, x_BM: torch.Tensor) -> SAEOutput:
        feats_BF = self.encode(x_BM)
        return SAEOutput(x_hat=self.decode(feats_BF), feats=feats_BF)

    def forward_train(self, x_BM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, features, pre-activations): what the loss and the auxiliary terms need."""
        pre_BF = self.pre_acts(x_BM)
        feats_BF = self.activate(pre_BF)
        return self.decode(feats_BF), feats_BF, pre_BF

    def decoder_norms(self) -> torch.Tensor:
        """``‖d_i‖`` per feature ``[d_sae]``."""
        return self.W_dec.norm(dim=1)

    def penalty(self, pre_BF: torch.Tensor, feats_BF: torch.Tensor) -> torch.Tensor:
        """The sparsity term per input ``[B]`` that λ weights: ``Σ_i f_i`` (``Σ_i f_i ‖d_i‖`` with free rows)."""
        feats_BF = feats_BF.float()
        if self.unit_decoder:
            return feats_BF.sum(-1)  # f ≥ 0 after ReLU: Σ|f| = Σf
        return feats_BF @ self.decoder_norms()

    def sparse_penalty(self, cols: torch.Tensor, vals: torch.Tensor, n_rows: int) -> torch.Tensor:
        """:meth:`penalty` averaged over a batch given as its active entries (the sparse step's)."""
        if self.unit_decoder:
            return vals.sum() / n_rows
        return (vals * self.decoder_norms()[cols]).sum() / n_rows

    @torch.no_grad()
    def observe_(self, feats_min_active: torch.Tensor | None) -> None:
        """Called after each training forward with the smallest active feature value (all ranks); a hook for
        variants that track running statistics (BatchTopK's threshold)."""

    # ---- the export: the same SAE on raw activations, in SAELens' inference layout ----

    @torch.no_grad()
    def inference_tensors(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Weights for *raw* activations ``x`` when this SAE reads ``scale·x`` (see :mod:`monosemantic.export`),
        with free decoder norms folded into the encoder so every exported row has unit norm."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"norm_scale must be a positive finite number, got {scale}")
        out = {"W_enc": self.W_enc.detach().clone(), "b_enc": self.b_enc.detach() / scale,
               "W_dec": self.W_dec.detach().clone(), "b_dec": self.b_dec.detach() / scale}
        if not self.unit_decoder:
            # f_i ‖d_i‖ with the unit row d_i / ‖d_i‖ reconstructs the same; ReLU (and a threshold scaled
            # alike) is positively homogeneous, so the norm moves into the encoder column exactly
            n_F = self.decoder_norms().clamp_min(1e-12)
            out["W_enc"] = out["W_enc"] * n_F
            out["b_enc"] = out["b_enc"] * n_F
            out["W_dec"] = out["W_dec"] / n_F[:, None]
        return out

    def inference_cfg(self) -> dict[str, Any]:
        """The ``cfg.json`` fields that describe this architecture to SAELens."""
        return {"architecture": self.architecture, "apply_b_dec_to_input": self.pre_encoder_bias}

    def raw_coeff(self, coeff: float, scale: float) -> float | None:
        """The coefficient that acts on *raw* activations when ``coeff`` acts on ``scale``-normalised ones: the
        loss is s²·(MSE_raw + (λ/s)·Σ f_raw) for an L1 term. None where the loss has no λ."""
        return coeff / scale if self.uses_penalty else None

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this SAE (less the sizes), for :func:`build_sae`."""
        return {"architecture": self.architecture, "pre_encoder_bias": self.pre_encoder_bias,
                "normalize_decoder": self.unit_decoder}

    # ---- in-place maintenance (paper, appendix "Autoencoder training") ----

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-12) -> None:
        """Scale each dictionary vector (row of ``W_dec``) to unit L2 norm; run after every step. A no-op when
        the rows are free (``normalize_decoder=False``)."""
        if not self.unit_decoder:
            return
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(eps))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from ``W_dec.grad`` the part parallel to each dictionary vector: ``g ← g − (g·d) d``.

        With unit-norm rows this is the projection onto the sphere's tangent space, so the step moves
        the direction of each vector rather than fighting the renormalisation that follows it.
        Assumes unit-norm rows (call after ``normalize_decoder_``); a no-op when there is no gradient or
        the rows are free.
        """
        grad_FM = self.W_dec.grad
        if grad_FM is None or not self.unit_decoder:
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

    def firing_threshold(self) -> torch.Tensor | float:
        """The pre-activation above which a feature fires: 0 for ReLU (JumpReLU: its θ)."""
        return 0.0

    @torch.no_grad()
    def init_b_enc_for_l0_(self, x_NM: torch.Tensor, l0: float, chunk: int = 4096) -> float:
        """Start the run at ``l0`` active features per token of the sample ``x_NM``: each feature's ``b_enc``
        is shifted so that exactly its top ``round(N·l0/d_sae)`` pre-activations on the sample pass its
        threshold (every feature gets the same firing rate). Call after ``b_dec`` is set. Returns the L0
        the sample then has.

        Why: with ``b_enc = 0`` about half the features fire on every token at the start (a random row's
        pre-activation is positive half the time), and Adam at lr 1e-3 moves a bias by ~lr per step, so
        the first hundreds of steps only shrink. On 1,024 planted features in 128 dimensions this start
        left the dictionary at chance (mean max cosine 0.28 after 500 steps at λ 0.02), while the same run
        started at L0 8 reached 0.93 (README "Beyond the paper"). A feature that fires only where its
        row is most aligned with the input is pulled toward one true direction, as TopK's features are.
        """
        if not self.uses_penalty:
            raise ConfigError(f"an encoder-bias start at an L0 is for the λ-based SAEs; a {self.architecture} "
                              f"SAE's L0 comes from k")
        n = x_NM.shape[0]
        if x_NM.ndim != 2 or x_NM.shape[1] != self.d_in or n == 0:
            raise ValueError(f"expected a sample [N > 0, {self.d_in}], got shape {tuple(x_NM.shape)}")
        if not 0 < l0 < self.d_sae:
            raise ConfigError(f"the starting L0 must be in (0, d_sae={self.d_sae}), got {l0}")
        n_fire = min(n - 1, max(1, round(n * l0 / self.d_sae)))
        x_NM = self.encoder_input(x_NM.to(self.W_enc))
        theta = self.firing_threshold()
        theta_F = theta.detach() if torch.is_tensor(theta) else torch.full((self.d_sae,), float(theta))
        fired = 0
        for lo in range(0, self.d_sae, chunk):
            hi = min(lo + chunk, self.d_sae)
            prod_NF = x_NM @ self.W_enc[:, lo:hi]
            # the threshold lands midway between the n_fire-th and (n_fire+1)-th largest products (not on
            # one of them, where rounding in θ − p + p would decide whether it fires)
            top_KF = prod_NF.topk(n_fire + 1, dim=0).values
            cut_F = 0.5 * (top_KF[-1] + top_KF[-2])
            self.b_enc[lo:hi] = theta_F[lo:hi].to(self.b_enc) - cut_F
            fired += int((prod_NF + self.b_enc[lo:hi] > theta_F[lo:hi].to(prod_NF)).sum())
        return fired / n

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
        self.W_dec[dead_F] = unit_KM * self.decoder_init_norm
        self.W_enc[:, dead_F] = (unit_KM * (enc_norm_scale * mean_alive_norm)).T
        self.b_enc[dead_F] = 0.0


class TopKSAE(SparseAutoencoder):
    """TopK SAE (Gao et al., 2024, "Scaling and evaluating sparse autoencoders"): each input keeps its ``k``
    largest pre-activations (then ReLU), so L0 ≤ k by construction and there is no L1 term; dead latents are
    revived by the AuxK loss (``SAEModule``'s ``aux_k_coeff``) rather than by λ. SAELens ``architecture: topk``."""

    architecture = "topk"
    uses_penalty = False

    def __init__(self, d_in: int, d_sae: int, k: int | None = None, **kw: Any) -> None:
        if kw.get("normalize_decoder") is False:
            raise ConfigError("model.normalize_decoder=false is not supported for topk SAEs: the export folds the "
                             "rows' norms into the encoder, which would change which k features win")
        if not (isinstance(k, int) and 0 < k <= d_sae):
            raise ConfigError(f"model.k must be an integer in [1, d_sae={d_sae}] for a {self.architecture} SAE, "
                             f"got {k!r}")
        super().__init__(d_in, d_sae, **kw)
        self.k = k

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        vals, idx = pre_BF.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter(-1, idx, F.relu(vals))

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = pre_BF.topk(self.k, dim=-1, sorted=True)
        keep = vals > 0
        rows = torch.arange(pre_BF.shape[0], device=pre_BF.device)[:, None].expand_as(idx)[keep]
        flat = (rows * pre_BF.shape[1] + idx[keep]).sort().values  # row-major, like nonzero()
        return flat // pre_BF.shape[1], flat % pre_BF.shape[1]

    def penalty(self, pre_BF: torch.Tensor, feats_BF: torch.Tensor) -> torch.Tensor:
        return feats_BF.new_zeros(feats_BF.shape[:-1], dtype=torch.float32)

    def sparse_penalty(self, cols: torch.Tensor, vals: torch.Tensor, n_rows: int) -> torch.Tensor:
        return vals.new_zeros((), dtype=torch.float32)

    def inference_cfg(self) -> dict[str, Any]:
        return {**super().inference_cfg(), "k": self.k, "rescale_acts_by_decoder_norm": False}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k}


class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al., 2024): while training, the ``k · B`` largest ReLU activations of the whole
    batch are kept, so inputs share a budget of k features on average. A running threshold (an EMA of the
    smallest kept activation, updated by :meth:`observe_`) replaces the batch at inference:
    ``f = pre · [pre > θ]``; the export is therefore a SAELens ``jumprelu`` SAE with θ for every feature."""

    architecture = "batchtopk"
    tracks_min_active = True

    def __init__(self, d_in: int, d_sae: int, k: int | None = None, threshold_lr: float = 0.01, **kw: Any) -> None:
        super().__init__(d_in, d_sae, k, **kw)
        self.threshold_lr = float(threshold_lr)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def _batch_topk(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = F.relu(pre_BF.reshape(-1))
        n_keep = min(flat.numel(), self.k * flat.numel() // pre_BF.shape[-1])
        vals, idx = flat.topk(n_keep, sorted=False)
        return vals, idx

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return pre_BF * (pre_BF > self.threshold.to(pre_BF.dtype))
        vals, idx = self._batch_topk(pre_BF)
        return torch.zeros_like(pre_BF).reshape(-1).scatter(0, idx, vals).reshape(pre_BF.shape)

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = self._batch_topk(pre_BF)
        idx = idx[vals > 0].sort().values
        return idx // pre_BF.shape[1], idx % pre_BF.shape[1]

    @torch.no_grad()
    def observe_(self, feats_min_active: torch.Tensor | None) -> None:
        if feats_min_active is not None and torch.isfinite(feats_min_active):
            lr = self.threshold_lr
            self.threshold.mul_(1 - lr).add_(lr * feats_min_active.to(self.threshold))

    @torch.no_grad()
    def inference_tensors(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        out = super().inference_tensors(scale)
        out["threshold"] = torch.full((self.d_sae,), float(self.threshold) / scale)
        return out

    def inference_cfg(self) -> dict[str, Any]:
        return {"architecture": "jumprelu", "apply_b_dec_to_input": self.pre_encoder_bias}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "threshold_lr": self.threshold_lr}


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann et al., 2025, "Learning multi-level features with Matryoshka SAEs"; Nabeshima,
    2024): the dictionary's first ``widths[0]``, ``widths[1]``, … features must each reconstruct the input on
    their own, so the loss's reconstruction term is the whole dictionary's MSE plus the MSE of each nested
    prefix's reconstruction, ``Σ_m ‖x − (f[:m] W_dec[:m] + b_dec)‖²`` (mean over elements), as SAELens sums
    them: the whole dictionary's MSE keeps the weight it has in every other variant, and so does AuxK beside
    it. The authors report that broad features then settle in the early prefixes instead of being absorbed
    into specific ones that fire in their place (not measured here). The features are BatchTopK's, so
    inference and the export are too (SAELens ``jumprelu`` with one threshold for all)."""

    architecture = "matryoshka_batchtopk"

    def __init__(self, d_in: int, d_sae: int, k: int | None = None,
                 widths: list[int] | tuple[int, ...] | None = None, **kw: Any) -> None:
        given = widths
        ok = isinstance(given, (list, tuple)) and all(isinstance(w, int) and not isinstance(w, bool) for w in given)
        widths = tuple(given) if ok else ()
        if not widths or any(not 0 < w < d_sae for w in widths) or list(widths) != sorted(set(widths)):
            raise ConfigError(f"model.matryoshka_widths must be a list of increasing integer prefix sizes in (0, "
                              f"d_sae={d_sae}) (the whole dictionary is always the last), got {given!r}")
        super().__init__(d_in, d_sae, k, **kw)
        self.widths = widths

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        """Where each nested dictionary ends, the whole one last."""
        return (*self.widths, self.d_sae)

    def recon_loss(self, x_BM: torch.Tensor, x_hat_BM: torch.Tensor, feats) -> torch.Tensor:
        """The sum over the prefixes of their reconstructions' MSE; ``feats`` is the dense ``[B, d_sae]``
        activations or the sparse step's active entries (each group's part is then a bag over its own
        entries). The last prefix's reconstruction is ``x_hat_BM`` itself."""
        ends = self.prefix_ends
        x_BM = x_BM.float()
        total = F.mse_loss(x_hat_BM.float(), x_BM)
        partial_BM = self.b_dec.float().expand_as(x_BM)
        for start, end in zip((0, *ends[:-2]), ends[:-1]):
            if isinstance(feats, torch.Tensor):
                part_BM = feats[:, start:end].float() @ self.W_dec[start:end].float()
            else:  # SparseFeatures: the group's entries, still row-major
                keep = (feats.cols >= start) & (feats.cols < end)
                part_BM = F.embedding_bag(feats.cols[keep], self.W_dec.float(),
                                          _row_offsets(feats.rows[keep], x_BM.shape[0]), mode="sum",
                                          per_sample_weights=feats.vals[keep])
            partial_BM = partial_BM + part_BM
            total = total + F.mse_loss(partial_BM, x_BM)
        return total

    def config(self) -> dict[str, Any]:
        return {**super().config(), "widths": list(self.widths)}


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre − θ)``; ∂/∂pre = H(pre − θ), ∂/∂θ by the straight-through estimator of Rajamanoharan et
    al. (2024): the jump of size θ at pre = θ, smoothed by a rectangle kernel of width ``bandwidth``."""

    @staticmethod
    def forward(ctx, pre_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > theta_F)

    @staticmethod
    def backward(ctx, g_BF: torch.Tensor):
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = g_BF * (pre_BF > theta_F)
        g_theta = (-(theta_F / eps) * _rectangle((pre_BF - theta_F) / eps) * g_BF).reshape(-1, theta_F.shape[0])
        return g_pre, g_theta.sum(0), None


class _Step(torch.autograd.Function):
    """``H(pre − θ)`` (the L0 of each entry); no gradient to ``pre``, ∂/∂θ = −K((pre − θ)/ε)/ε."""

    @staticmethod
    def forward(ctx, pre_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > theta_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, g_BF: torch.Tensor):
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = (-(1.0 / eps) * _rectangle((pre_BF - theta_F) / eps) * g_BF).reshape(-1, theta_F.shape[0])
        return None, g_theta.sum(0), None


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE (Rajamanoharan et al., 2024): ``f = pre · H(pre − θ)`` with a learned threshold per feature
    (``θ = exp(log_threshold)``, so it stays positive) and an L0 penalty ``λ · Σ_i H(pre_i − θ_i)``, both made
    trainable by straight-through estimators of bandwidth ``bandwidth``. SAELens ``architecture: jumprelu``."""

    architecture = "jumprelu"
    sparse_ok = False  # θ's gradient needs the pre-activations just below the threshold, not only active ones

    def __init__(self, d_in: int, d_sae: int, bandwidth: float = 0.05, init_threshold: float = 0.01,
                 **kw: Any) -> None:
        if not (bandwidth > 0 and init_threshold > 0):
            raise ConfigError(f"model.jumprelu_bandwidth and model.jumprelu_init_threshold must be positive, got "
                             f"{bandwidth}, {init_threshold}")
        self.bandwidth, self.init_threshold = float(bandwidth), float(init_threshold)
        super().__init__(d_in, d_sae, **kw)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(self.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        theta_F = self.threshold.to(pre_BF.dtype)
        if torch.is_grad_enabled():
            return _JumpReLU.apply(pre_BF, theta_F, self.bandwidth)
        return pre_BF * (pre_BF > theta_F)

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (pre_BF > self.threshold).nonzero(as_tuple=True)

    def firing_threshold(self) -> torch.Tensor:
        return self.threshold

    def raw_coeff(self, coeff: float, scale: float) -> float | None:
        """L0 does not change with the scale: the loss is s²·(MSE_raw + (λ/s²)·L0)."""
        return coeff / scale**2

    def penalty(self, pre_BF: torch.Tensor, feats_BF: torch.Tensor) -> torch.Tensor:
        """The L0 of each input, with θ's straight-through gradient (none reaches the pre-activations)."""
        return _Step.apply(pre_BF.float(), self.threshold, self.bandwidth).sum(-1)

    @torch.no_grad()
    def init_b_enc_for_l0_(self, x_NM: torch.Tensor, l0: float, chunk: int = 4096) -> float:
        """Start the run at ``l0`` per token as the ReLU SAE does, but by the thresholds: with ``b_enc = 0``,
        each ``θ_i`` is set where feature i fires on its top ``round(N·l0/d_sae)`` pre-activations of the
        sample (never below ``init_threshold``: where the cut is lower, θ stays there and the bias is
        ``init_threshold − cut``, so the feature fires above its cut).
        Moving the bias instead, as the ReLU start does, would leave θ at ``init_threshold`` (0.01) against
        pre-activations of order 1, and θ moves only ~lr per step in log space: on the demo data L0 climbed
        from the start back toward the dense regime while θ could not follow."""
        before = self.b_enc.clone(), self.log_threshold.clone()
        self.log_threshold.fill_(math.log(self.init_threshold))
        try:  # b_enc = θ0 − cut: the cut each feature needs; the features fire on the sample as they will below
            fired = super().init_b_enc_for_l0_(x_NM, l0, chunk)
        except Exception:  # a refused call leaves the SAE as it was
            self.b_enc.copy_(before[0])
            self.log_threshold.copy_(before[1])
            raise
        theta0 = self.init_threshold
        cut_F = theta0 - self.b_enc
        self.log_threshold.copy_(cut_F.clamp_min(theta0).log())
        self.b_enc.clamp_(min=0.0)  # cut < θ0: fire above the cut with θ0 and a bias of θ0 − cut
        return fired  # each feature still fires exactly where its product passes its cut

    @torch.no_grad()
    def resample_(self, dead_F: torch.Tensor, inputs_KM: torch.Tensor, enc_norm_scale: float = 0.2,
                  eps: float = 1e-12) -> None:
        """As the ReLU SAE's, and each new feature's θ is ``enc_norm_scale`` × the live features' median θ (not
        below ``init_threshold``): its encoder row is scaled by that factor against the live rows, so its
        pre-activations are, and the threshold follows them. Back at ``init_threshold`` (0.01, against
        pre-activations of order 1) a resampled feature fires on a large share of all tokens: on the demo data,
        259 resampled features took L0 from 20 to 68 at once."""
        dead_mask = torch.zeros(self.d_sae, dtype=torch.bool, device=self.log_threshold.device)
        dead_mask[torch.as_tensor(dead_F, dtype=torch.long, device=dead_mask.device).flatten()] = True
        live_theta = self.threshold[~dead_mask]
        theta = max(self.init_threshold, enc_norm_scale * float(live_theta.median())) if live_theta.numel() \
            else self.init_threshold
        super().resample_(dead_F, inputs_KM, enc_norm_scale, eps)
        self.log_threshold[dead_mask] = math.log(theta)

    @torch.no_grad()
    def inference_tensors(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        out = super().inference_tensors(scale)
        theta_F = self.threshold.detach() / scale
        out["threshold"] = theta_F if self.unit_decoder else theta_F * self.decoder_norms().clamp_min(1e-12)
        return out

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bandwidth": self.bandwidth, "init_threshold": self.init_threshold}


ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (SparseAutoencoder, TopKSAE, BatchTopKSAE, MatryoshkaSAE, JumpReLUSAE)}


def build_sae(d_in: int, d_sae: int, architecture: str = "standard", **kw: Any) -> SparseAutoencoder:
    """The SAE class ``architecture`` names, with the arguments that class takes (others are dropped only
    when None, so a setting meant for another architecture is an error, not silently ignored)."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"model.architecture={architecture!r}: expected one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[architecture]
    kw = {k: v for k, v in kw.items() if v is not None}
    accepted = {n for c in cls.__mro__ if c is not nn.Module and "__init__" in vars(c)
                for n in inspect.signature(c.__init__).parameters}
    foreign = sorted(set(kw) - accepted)
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: not a setting of a {architecture} SAE (model.architecture="
                         f"{architecture}); set it to null or choose the architecture it belongs to")
    return cls(d_in, d_sae, **kw)


def sae_from_inference(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """An SAE on raw activations from an export's ``cfg.json`` fields and tensors (unit-norm rows)."""
    arch, d_in, d_sae = cfg["architecture"], int(cfg["d_in"]), int(cfg["d_sae"])
    kw: dict[str, Any] = {"pre_encoder_bias": bool(cfg.get("apply_b_dec_to_input", True))}
    if arch == "topk":
        sae: SparseAutoencoder = TopKSAE(d_in, d_sae, k=int(cfg["k"]), **kw)
    elif arch == "jumprelu":
        sae = JumpReLUSAE(d_in, d_sae, **kw)
    else:
        sae = SparseAutoencoder(d_in, d_sae, **kw)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name].to(torch.float32))
        if arch == "jumprelu":  # a zero threshold (a BatchTopK that never trained) is ReLU: log(tiny) suffices
            sae.log_threshold.copy_(tensors["threshold"].to(torch.float32).clamp_min(1e-30).log())
    return sae.eval()


def raw_reconstruction(sae: nn.Module, acts: torch.Tensor, scale: float) -> torch.Tensor:
    """The reconstruction of *raw* activations by an SAE that works on ``scale``-normalised ones."""
    return sae(acts.float() * scale).x_hat / scale
