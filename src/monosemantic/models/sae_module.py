"""``SAEModule``: the training system around :class:`SparseAutoencoder` (the paper's recipe, DESIGN §2).

- loss = MSE (mean over vector elements) + λ · Σ_i f_i (sum over features, mean over tokens); the
  reduction is stored beside λ (``l1_reduction``) because λ does not transfer between reductions. Other
  architectures (``architecture``: TopK, BatchTopK, JumpReLU; :mod:`.components.sae`) bring their own sparsity
  term (none for TopK, λ·L0 for JumpReLU) and may add AuxK; the rest of this module is the same for all.
- Adam; before each step the gradient component parallel to each decoder row is removed, after it the
  rows are renormalised (decoder hygiene lives on the SAE: ``remove_parallel_grads_``, ``normalize_decoder_``;
  both are no-ops for free rows, ``normalize_decoder=false``).
- ``tokens_since_fired`` (a buffer, so it is checkpointed) counts, per feature, the tokens seen on *all*
  ranks since it last fired: per-step fire counts are summed across ranks, so every rank makes the same
  dead-feature decision (for :class:`~monosemantic.callbacks.resampler.NeuronResampler`).
- Units: the SAE trains on normalised activations ``s·x`` (mean norm √d_in), so ``train/loss`` and
  ``train/l1`` are in that space; every MSE that is logged (``train/mse``, ``val/mse``) is on *raw*
  activations, and the normalised one is ``train/mse_normalized``. The λ that acts on raw activations is
  λ/s (the loss is s²·(MSE_raw + (λ/s)·Σf_raw)); the stage records it beside λ.
- Feature density over a training window: the per-feature firing counts (summed over ranks) since the last
  validation, a buffer, so the window survives a resume and is large enough to show ultralow features.
- Validation: MSE, explained variance, L0 and density on held-out shards; loss recovered (the SAE's
  reconstruction spliced into the frozen transformer) on held-out token windows, when the shard set
  names its transformer. The metric definitions come from the config (``metrics``: a partial of
  :class:`monosemantic.evaluation.SAEMetrics`), so this module imports nothing above ``models/``; the
  density histograms are drawn by :class:`monosemantic.callbacks.density_plots.DensityPlots`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from monosemantic.errors import ConfigError, InputError
from monosemantic.models import guards
from monosemantic.models.components.sae import build_sae, raw_reconstruction
from monosemantic.models.components.sparse_step import cost_cache_path, crossover_for, sparse_forward

log = logging.getLogger(__name__)


# Buffers added after the first checkpoints were written (2026-11-25: tokens_since_fired, tokens_seen,
# window_tokens, norm_scale_buf): a checkpoint may lack these because an older version wrote it. Any other
# missing entry means the file is damaged or not this project's SAE, and the load is refused naming it.
ADDED_BUFFERS = frozenset({"l1_coeff_buf", "l0_ema", "l0_rate", "window_fires", "last_window_fires",
                           "last_window_tokens", "nonfinite_skipped", "last_l0", "sparse_crossover"})


def fill_missing_buffers(module: nn.Module, checkpoint: dict[str, Any], where: str | None) -> None:
    """A buffer of :data:`ADDED_BUFFERS` the checkpoint lacks (written by an older version) keeps its fresh
    value, with a warning, so the checkpoint still loads strictly. Any other missing buffer or parameter is an
    :class:`InputError` naming the checkpoint and the entries (a sweep's members' buffers are matched by their
    own names)."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    params = {n for n, _ in module.named_parameters()}
    missing = []
    for name, value in module.state_dict().items():
        if name in state:
            continue
        if name not in params and name.rsplit(".", 1)[-1] in ADDED_BUFFERS:
            log.warning("checkpoint %s has no %s (written by an older version): it starts fresh", where or "", name)
            state[name] = value.detach().clone()
        else:
            missing.append(name)
    if missing:
        raise InputError(f"checkpoint {where or ''} has no {', '.join(missing[:5])}"
                         f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}: it is damaged or "
                         "not a checkpoint of this SAE; resume from another (checkpoints/) or start a new run "
                         "without ckpt_path")


class SAEModule(L.LightningModule):
    def __init__(self, d_sae: int, l1_coeff: float, optimizer: Callable[..., torch.optim.Optimizer],
                 d_in: int | None = None, l1_reduction: str = "sum_features_mean_tokens",
                 l1_warmup_steps: int = 0, dead_window_tokens: int = 10_000_000, b_dec_init: str = "geometric_median",
                 b_dec_init_tokens: int = 16_384, ablation: str = "zero", lr_decay_start: float = 1.0,
                 tied_init: bool = True, sparse_step: bool = True, sparse_max_density: float | None = None,
                 metrics: Callable[..., nn.Module] | None = None, architecture: str = "standard",
                 k: int | None = None, aux_k_coeff: float = 0.0, aux_k: int | None = None,
                 aux_k_normalize: bool = False, ghost_grads: bool = False,
                 aux_dead_tokens: int | None = None, batchtopk_threshold_lr: float | None = None,
                 jumprelu_bandwidth: float | None = None, jumprelu_init_threshold: float | None = None,
                 jumprelu_threshold_lr_scale: float | None = None,
                 matryoshka_widths: list[int] | None = None, pre_encoder_bias: bool = True,
                 normalize_decoder: bool = True,
                 decoder_init_norm: float | None = None, target_l0: float | None = None,
                 target_l0_until: float = 0.5, target_l0_gain: float = 0.02, target_l0_damping: float = 50.0,
                 dense_warn_frac: float = 0.25, b_enc_init_l0: float | None = None,
                 nonfinite: str = "stop") -> None:
        """
        Args:
            d_sae: dictionary size (A/1: 4,096).
            l1_coeff: λ (paper's A runs: 0.004 with their scaling; always report L0 beside it).
            optimizer: partial Adam (``_partial_: true``).
            d_in: activation width; set from the shard manifest by the SAE stage (``stages/sae.py``).
            l1_reduction: how the L1 term is reduced; recorded for sweeps (only this one is implemented).
            l1_warmup_steps: λ ramps linearly from 0 over these steps (0: no warm-up).
            dead_window_tokens: a feature that fired on none of the last N tokens is dead.
            b_dec_init: "geometric_median" of a sample (paper) or "zeros".
            ablation: "zero" (paper) or "mean" baseline for loss recovered.
            lr_decay_start: fraction of training after which the LR decays linearly to 0 (1.0: constant LR).
            tied_init: initialise W_enc as W_dec^T (see :class:`SparseAutoencoder`); false is the paper's.
            sparse_step: train with the sparsity-aware forward/backward (same math, ~4× fewer FLOPs; see
                :mod:`.components.sparse_step`) whenever the last step's L0 was below
                ``sparse_max_density · d_sae``; otherwise (early training) the dense path.
            sparse_max_density: that density; None: measured on the first training step, where both paths
                are timed on the real batch at this size, device and precision
                (:func:`.components.sparse_step.measure_step_costs`; 5–14% of d_sae on 2 CPU cores).
            metrics: builds the validation metrics, ``metrics(d_in=, d_sae=, ablation=)`` (a partial of
                :class:`monosemantic.evaluation.SAEMetrics`); None: validation computes nothing.
            architecture: ``standard`` (the paper's ReLU + L1), ``topk``, ``batchtopk`` (k active per input /
                on average; λ unused), ``matryoshka_batchtopk`` (BatchTopK whose nested prefixes each
                reconstruct) or ``jumprelu`` (learned thresholds, λ weights an L0 term); see
                :mod:`.components.sae`.
            k: active features per input (topk, batchtopk, matryoshka_batchtopk).
            aux_k_coeff: weight of the AuxK loss (Gao et al., 2024): the dead latents' top ``aux_k``
                pre-activations reconstruct the residual ``x − x̂``, so dead latents get gradient (0: off).
            aux_k: dead latents per input in AuxK (None: d_in / 2, the paper's heuristic).
            aux_k_normalize: scale the AuxK error by E[x²] / E[e²] (detached), which is Gao et al.'s weighting
                (their loss and AuxK are each normalised: by ‖x‖² and by ‖e‖²) on our plain-MSE loss; the same
                ``aux_k_coeff`` is then about 1 / (1 − explained variance) times stronger than without it.
            ghost_grads: Anthropic's ghost grads (Circuits Updates, January 2024) for the ReLU SAE: the dead
                features' ``exp`` pre-activations reconstruct the residual at half its norm, as an extra MSE
                rescaled to the main MSE's size (:meth:`ghost_grad_loss`); an alternative to resampling.
            aux_dead_tokens: a latent silent for this many tokens is dead for AuxK and ghost grads (None:
                dead_window_tokens).
            batchtopk_threshold_lr: EMA rate of BatchTopK's inference threshold (None: 0.01).
            jumprelu_bandwidth, jumprelu_init_threshold: JumpReLU's straight-through kernel width and
                starting θ (None: 0.05, 0.01; on normalised activations).
            jumprelu_threshold_lr_scale: the thresholds' learning rate as a multiple of ``optimizer.lr`` (None:
                1): θ is trained in log space, so Adam moves it by about that lr relatively per step, which
                bounds how far a short run can take it.
            matryoshka_widths: the nested prefix sizes of a ``matryoshka_batchtopk`` SAE, increasing and below
                d_sae (the whole dictionary is the last prefix); each prefix's reconstruction MSE is added to the
                loss (logged: ``train/prefix_mse``, their mean).
            pre_encoder_bias: subtract b_dec before the encoder (the paper; false: Anthropic's later recipe).
            normalize_decoder: unit-norm dictionary rows (the paper); false: free rows, L1 weighted by ‖d_i‖.
            decoder_init_norm: starting row norm when rows are free (None: 1; Anthropic's April update: 0.1).
            target_l0: when set (λ-based architectures), λ is steered toward this L0 after the warm-up until
                ``target_l0_until`` of training, multiplicatively (a damped controller, :meth:`_steer_l1`), then
                frozen, so the rest of the run optimises the paper's objective at the λ found (logged as
                ``train/l1_coeff``, reported as ``l1_coeff`` in ``metrics.json``).
            dense_warn_frac: warn at validation when more than this fraction of features fire on > 1% of
                the training window's tokens (the paper's sign that λ is too low).
            b_enc_init_l0: start the encoder biases so that this many features fire per token of the
                ``b_dec_init_tokens`` sample, each on the same share of it
                (:meth:`~.components.sae.SparseAutoencoder.init_b_enc_for_l0_`; λ-based architectures;
                None: zero biases, the paper's). The config sets it to ``target_l0``.
            nonfinite: on a NaN/inf loss, ``stop`` the run naming the step, the batch and the last checkpoint,
                or ``skip`` the batch and count it (:mod:`.guards`); non-finite parameters always stop it.
        """
        super().__init__()
        if matryoshka_widths is not None and not isinstance(matryoshka_widths, (int, float, str)):
            matryoshka_widths = list(matryoshka_widths)  # a Hydra ListConfig would not load weights_only
        guards.check_action(nonfinite)
        if d_in is None:
            raise ConfigError("model.d_in is not set: it comes from the shard set's manifest (data.shards)")
        if l1_reduction != "sum_features_mean_tokens":
            raise ConfigError(f"model.l1_reduction={l1_reduction!r}: only 'sum_features_mean_tokens' is implemented")
        if target_l0 is not None and not (target_l0 > 0 and 0 <= target_l0_until <= 1 and target_l0_gain > 0):
            raise ConfigError(f"model.target_l0={target_l0} needs target_l0 > 0, 0 <= target_l0_until <= 1 and "
                             f"target_l0_gain > 0 (got {target_l0_until}, {target_l0_gain})")
        self.save_hyperparameters(logger=False, ignore=["optimizer", "metrics"])  # weights_only-loadable
        self.optimizer_factory = optimizer
        self.sae = build_sae(d_in, d_sae, architecture, tied_init=tied_init, k=k,
                             threshold_lr=batchtopk_threshold_lr, bandwidth=jumprelu_bandwidth,
                             init_threshold=jumprelu_init_threshold, widths=matryoshka_widths,
                             pre_encoder_bias=pre_encoder_bias,
                             normalize_decoder=normalize_decoder, decoder_init_norm=decoder_init_norm)
        if target_l0 is not None and not self.sae.uses_penalty:
            raise ConfigError(f"model.target_l0 steers λ, which a {architecture} SAE does not use: set model.k")
        if b_enc_init_l0 is not None and not (self.sae.uses_penalty and 0 < b_enc_init_l0 < d_sae):
            raise ConfigError(f"model.b_enc_init_l0={b_enc_init_l0} needs a λ-based SAE (not {architecture}) and "
                              f"0 < b_enc_init_l0 < d_sae={d_sae}")
        if ghost_grads and architecture != "standard":
            raise ConfigError(f"model.ghost_grads is for the ReLU SAE (architecture standard), not {architecture}: "
                              "TopK variants have model.aux_k_coeff")
        if jumprelu_threshold_lr_scale is not None:
            if architecture != "jumprelu":
                raise ConfigError(f"model.jumprelu_threshold_lr_scale={jumprelu_threshold_lr_scale} is for "
                                  f"architecture jumprelu, not {architecture}")
            if not jumprelu_threshold_lr_scale > 0:
                raise ConfigError(f"model.jumprelu_threshold_lr_scale must be positive, got "
                                  f"{jumprelu_threshold_lr_scale}")
        if aux_k_coeff < 0 or (aux_k is not None and aux_k <= 0):
            raise ConfigError(f"model.aux_k_coeff must be >= 0 and model.aux_k positive, got {aux_k_coeff}, {aux_k}")
        # λ in force (target_l0 moves it) and the L0 average that steers it; buffers, so a resume continues them
        self.register_buffer("l1_coeff_buf", torch.tensor(float(l1_coeff), dtype=torch.float64))
        self.register_buffer("l0_ema", torch.tensor(-1.0, dtype=torch.float64))  # of log L0
        self.register_buffer("l0_rate", torch.tensor(0.0, dtype=torch.float64))  # its change per step
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        self.val_metrics = metrics(d_in=d_in, d_sae=d_sae, ablation=ablation) if metrics is not None else None
        # firing counts over all ranks in the current density window (reset at each validation) and the last
        # completed window: measured over millions of tokens, where a held-out shard has ~10^5
        self.register_buffer("window_fires", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_window_fires", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("last_window_tokens", torch.zeros((), dtype=torch.int64))
        self.register_buffer("norm_scale_buf", torch.ones(()))  # checkpointed: eval needs the scale
        self.register_buffer("nonfinite_skipped", torch.zeros((), dtype=torch.int64))  # model.nonfinite=skip
        # the last step's L0 picks the dense or sparse path; a buffer, so a resumed run picks as the original
        # did (Adam turns tiny float differences in near-zero gradients into whole-lr steps)
        self.register_buffer("last_l0", torch.tensor(-1.0))  # -1: not yet known; the first batch's L0 stands in
        # the L0 density below which the sparse path is cheaper (sparse_max_density, or measured: -1 until then)
        self.register_buffer("sparse_crossover", torch.tensor(-1.0 if sparse_max_density is None
                                                              else float(sparse_max_density)))
        self._frozen: list[Any] = []  # [transformer], kept out of the module tree and the checkpoint
        self._mean_acts: torch.Tensor | None = None
        self.lr_skip_reason: str | None = None  # why loss recovered cannot be measured, when it cannot
        self.last_log10_density: dict[str, torch.Tensor] = {}  # per split, for the density plots
        self._lr_warned = False
        self._dense_warned = False
        self._target_warned = False
        self._loss_finite = True  # the last train_loss: finite on every rank

    # -- data-dependent setup -------------------------------------------------------------------------
    def attach_data(self, norm_scale: float, transformer: torch.nn.Module | None,
                    mean_acts_M: torch.Tensor | None = None, lr_skip_reason: str | None = None) -> None:
        """Give the module what the data defines: the normalisation scale, the frozen transformer, and
        (when loss recovered cannot be measured) the reason, which validation logs once."""
        self.norm_scale_buf.fill_(float(norm_scale))
        self._frozen = [transformer.requires_grad_(False).eval()] if transformer is not None else []
        self._mean_acts = mean_acts_M
        self.lr_skip_reason = lr_skip_reason

    @property
    def norm_scale(self) -> float:
        return float(self.norm_scale_buf)

    @property
    def transformer(self) -> torch.nn.Module | None:
        return self._frozen[0] if self._frozen else None

    def setup(self, stage: str) -> None:
        # Runs before DDP wraps the module (which then broadcasts rank 0's parameters).
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        start_l0 = self.hparams.get("b_enc_init_l0")
        if stage != "fit" or dm is None or (self.hparams.b_dec_init != "geometric_median" and start_l0 is None):
            return
        sample = dm.sample_activations(self.hparams.b_dec_init_tokens, seed=0)
        if self.hparams.b_dec_init == "geometric_median":
            self.sae.init_b_dec_geometric_median_(sample)
        if start_l0 is not None:
            l0 = self.sae.init_b_enc_for_l0_(sample, start_l0)
            log.info("encoder biases (JumpReLU: thresholds) set so the run starts at L0 %.1f "
                     "(model.b_enc_init_l0=%g) on %d tokens",
                     l0, start_l0, len(sample))

    # -- training -------------------------------------------------------------------------------------
    def l1_coeff_now(self) -> float:
        warm = self.hparams.l1_warmup_steps
        return float(self.l1_coeff_buf) * (min(1.0, (self.global_step + 1) / warm) if warm else 1.0)

    def per_input_loss(self, x_NM: torch.Tensor) -> torch.Tensor:
        """The training loss of each input (used to score inputs for resampling)."""
        x_hat, feats, pre = self.sae.forward_train(x_NM)
        return (x_hat - x_NM).pow(2).mean(-1) + self.l1_coeff_now() * self.sae.penalty(pre, feats)

    def dead_latents(self) -> torch.Tensor:
        """Indices of the features silent for ``aux_dead_tokens`` (else ``dead_window_tokens``) tokens: the ones
        AuxK and ghost grads train."""
        window = self.hparams.aux_dead_tokens or self.hparams.dead_window_tokens
        return (self.tokens_since_fired >= window).nonzero().squeeze(1)

    def _dead_pre_acts(self, x_BM: torch.Tensor, dead_D: torch.Tensor, detach_input: bool) -> torch.Tensor:
        """The dead features' pre-activations alone, ``[batch, n_dead]``."""
        xc_BM = self.sae.encoder_input(x_BM.float())
        return (xc_BM.detach() if detach_input else xc_BM) @ self.sae.W_enc[:, dead_D] + self.sae.b_enc[dead_D]

    def aux_k_loss(self, x_BM: torch.Tensor, x_hat_BM: torch.Tensor) -> torch.Tensor | None:
        """AuxK (Gao et al., 2024, appendix A.2): the residual ``e = x − x̂`` (no gradient) is reconstructed from
        the dead latents alone, ``ê = TopK_aux(pre_dead) W_dec[dead]``, and ``‖ê − e‖²`` (mean over elements,
        like our MSE; with ``aux_k_normalize`` times E[x²] / E[e²], Gao et al.'s weighting relative to the main
        loss) joins the loss. Only dead latents' pre-activations are computed, so live latents get no gradient
        from it; None when nothing is dead or it is off."""
        coeff = self.hparams.aux_k_coeff
        if not coeff:
            return None
        dead_D = self.dead_latents()
        if dead_D.numel() == 0:
            return None
        sae = self.sae
        k_aux = min(int(self.hparams.aux_k or max(1, sae.d_in // 2)), dead_D.numel())
        pre_BD = self._dead_pre_acts(x_BM, dead_D, detach_input=False)
        vals_BK, idx_BK = pre_BD.topk(k_aux, dim=-1, sorted=False)
        e_hat_BM = torch.zeros_like(pre_BD).scatter(-1, idx_BK, F.relu(vals_BK)) @ sae.W_dec[dead_D]
        e_BM = (x_BM.float() - x_hat_BM.float()).detach()
        aux = F.mse_loss(e_hat_BM, e_BM)
        if self.hparams.get("aux_k_normalize"):
            aux = aux * (x_BM.float().square().mean() / e_BM.square().mean().clamp_min(1e-12)).detach()
        return coeff * aux

    def ghost_grad_loss(self, x_BM: torch.Tensor, x_hat_BM: torch.Tensor,
                        mse: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]] | None:
        """Ghost grads (Anthropic, Circuits Updates, January 2024). The dead features' pre-activations pass
        through ``exp`` instead of ReLU, ``g = exp(pre_dead) W_dec[dead]``; each token's ``g`` is scaled to half
        the norm of its residual ``e = x − x̂`` (scale and residual held fixed), and ``‖g − e‖²`` (mean over
        elements) is rescaled to the main MSE's value, so the term weighs as much as the reconstruction
        whatever its own size. Dead features get a gradient toward the residual though none fires; live ones, and
        ``b_dec`` (the encoder's input is held fixed), get none from it. Each row's largest dead pre-activation
        is subtracted before ``exp``: the norm scaling cancels it exactly, and ``exp`` cannot overflow. Its cost
        is a dense ``[batch, n_dead]`` encoder product forward and backward, beside the sparse step's.
        Returns the term and what is logged of it: the ghost MSE over the main MSE before the rescaling (how
        well the dead features fit the residual: 0.25 for its direction exactly, 1.25 for an orthogonal one)
        and how many features it trained; None when off or nothing is dead."""
        if not self.hparams.get("ghost_grads"):
            return None
        dead_D = self.dead_latents()
        if dead_D.numel() == 0:
            return None
        sae = self.sae
        pre_BD = self._dead_pre_acts(x_BM, dead_D, detach_input=True)
        g_BM = torch.exp(pre_BD - pre_BD.detach().amax(-1, keepdim=True)) @ sae.W_dec[dead_D]
        e_BM = (x_BM.float() - x_hat_BM.float()).detach()
        scale_B1 = (e_BM.norm(dim=-1, keepdim=True) / (2 * g_BM.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)))
        ghost = F.mse_loss(g_BM * scale_B1, e_BM)
        stats = {"train/ghost_grad_ratio": ghost.detach() / mse.detach().float().clamp_min(1e-12),
                 "train/ghost_dead": float(dead_D.numel())}
        return ghost * (mse.detach().float() / ghost.detach().clamp_min(1e-12)), stats

    def train_loss(self, x_BM: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """One step's loss on a batch and what it logs; updates the firing counters. ``training_step`` logs
        it through Lightning; :class:`~monosemantic.models.sae_sweep.SAESweepModule` calls it for each of
        its SAEs on the same batch and logs each into that SAE's own run."""
        B, d_sae, sae = x_BM.shape[0], self.hparams.d_sae, self.sae
        if (self.hparams.sparse_step and sae.sparse_ok
                and self._path_l0(x_BM) < self.sparse_limit(x_BM) * d_sae):
            out = sparse_forward(sae, x_BM)
            x_hat = out.x_hat
            mse = F.mse_loss(x_hat, x_BM)
            l1 = sae.sparse_penalty(out.feats.cols, out.feats.vals, B)
            fires_F = torch.bincount(out.feats.cols, minlength=d_sae)
            active, feats = out.feats.vals, out.feats
        else:
            x_hat, feats, pre = sae.forward_train(x_BM)
            mse = F.mse_loss(x_hat.float(), x_BM)
            l1 = sae.penalty(pre, feats).mean()
            fires_F = (feats > 0).sum(0)
            active = feats[feats > 0] if sae.tracks_min_active else None
        # the reconstruction term: the MSE, or (Matryoshka) that plus its nested prefixes' MSEs
        recon = sae.recon_loss(x_BM, x_hat, feats) if sae.prefix_ends else mse
        loss = recon + self.l1_coeff_now() * l1 if sae.uses_penalty else recon
        aux = self.aux_k_loss(x_BM, x_hat)
        if aux is not None:
            loss = loss + aux
        ghost = self.ghost_grad_loss(x_BM, x_hat, mse)
        if ghost is not None:
            loss = loss + ghost[0]
        self._loss_finite = guards.all_finite(loss)  # on every rank alike (one scalar all-reduce under DDP)
        if not self._loss_finite:  # a bad batch: the counters and λ are left as they were, on every rank
            return loss, {}
        with torch.no_grad():
            l0 = float(fires_F.sum()) / B
            self.last_l0.fill_(l0)
            global_l0 = self._count_firing(fires_F, B)
            if sae.tracks_min_active:
                sae.observe_(self._global_min(active.detach().float()))
            self._steer_l1(global_l0)
            logs = {"train/loss": loss.detach(), "train/mse": mse.detach() / self.norm_scale**2,
                    "train/mse_normalized": mse.detach(), "train/l0": l0, "train/dead_frac": self.dead_frac()}
            if sae.uses_penalty:
                logs.update({"train/l1": l1.detach(), "train/l1_coeff": self.l1_coeff_now()})
            if sae.prefix_ends:  # the inner prefixes' mean MSE, on raw activations like train/mse
                inner = (recon.detach() - mse.detach()) / (len(sae.prefix_ends) - 1)
                logs["train/prefix_mse"] = inner / self.norm_scale**2
            if aux is not None:
                logs["train/aux_k_loss"] = aux.detach()
            if ghost is not None:  # the term equals the MSE by construction: log what it is made of
                logs.update(ghost[1])
            if hasattr(sae, "threshold") and torch.is_tensor(sae.threshold):
                logs["train/threshold_mean"] = sae.threshold.detach().float().mean()
        return loss, logs

    def _path_l0(self, x_BM: torch.Tensor) -> float:
        """The L0 that picks this step's path: the last step's; on the first step, this batch's (one encoder
        product without gradients), so an SAE started from trained weights is never given a dense step, whose
        [batch, d_sae] tensors are what bounds memory at large dictionaries."""
        if float(self.last_l0) < 0:
            with torch.no_grad():
                prod_BF = self.sae.encoder_input(x_BM.float()) @ self.sae.W_enc
                rows, _ = self.sae.select_biased(prod_BF, self.sae.b_enc)
                self.last_l0.fill_(rows.numel() / x_BM.shape[0])
                del prod_BF
        return float(self.last_l0)

    def sparse_limit(self, x_BM: torch.Tensor) -> float:
        """The L0 density (of d_sae) below which a step takes the sparse path: ``model.sparse_max_density``, or
        measured on this batch the first time it is asked (the mean over ranks, so every rank picks alike). A
        buffer: a resumed run keeps the value the original measured, and with it the original's choices."""
        if float(self.sparse_crossover) < 0:
            crossover, costs = crossover_for(self.sae, x_BM)
            value = torch.tensor(crossover, device=self.sparse_crossover.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(value)
                value /= dist.get_world_size()
            self.sparse_crossover.fill_(float(value))
            if costs is None:
                log.info("sparse step: the sparse path runs while L0 < %.1f (%.1f%% of d_sae), as measured "
                         "before on this machine (%s)", float(value) * self.hparams.d_sae, 100 * float(value),
                         cost_cache_path())
            elif self._trainer is None or self.trainer.is_global_zero:
                log.info("sparse step: a dense loss forward+backward on %d rows takes %.0f ms, the sparse one %s; "
                         "the sparse path runs while L0 < %.1f (%.1f%% of d_sae)", costs.rows, 1e3 * costs.dense_s,
                         ", ".join(f"{1e3 * t:.0f} ms at {100 * d:g}%" for d, t in costs.sparse_s),
                         float(value) * self.hparams.d_sae, 100 * float(value))
        return float(self.sparse_crossover)

    def _global_min(self, active: torch.Tensor) -> torch.Tensor:
        """The smallest active feature value over all ranks (inf where none fired)."""
        m = active.min() if active.numel() else active.new_tensor(float("inf"))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(m, op=dist.ReduceOp.MIN)
        return m

    def _steer_l1(self, l0: float) -> None:
        """``target_l0``: move λ toward the target L0 after the warm-up, until ``target_l0_until`` of training.

        A PD controller on log λ: ``u = log(L0_ema / target) + τ · d/dt log L0_ema`` and ``λ ← λ · exp(gain · u)``.
        L0 answers λ with a lag of tens to hundreds of steps (the SAE has to re-learn its encoder), so the
        proportional term alone keeps raising λ while L0 is already falling and overshoots; the derivative term
        (``τ = target_l0_damping`` steps) holds λ while L0 moves toward the target on its own. ``l0`` is the
        step's L0 over all ranks, so every rank moves λ alike."""
        target = self.hparams.target_l0
        if target is None:
            return
        log_l0 = math.log(max(l0, 1e-3))
        prev = float(self.l0_ema)
        ema = log_l0 if prev == -1.0 else 0.9 * prev + 0.1 * log_l0  # -1.0: the buffer's "unset" (L0 = e^-1 is not)
        self.l0_ema.fill_(ema)
        self.l0_rate.fill_(0.0 if prev == -1.0 else 0.9 * float(self.l0_rate) + 0.1 * (ema - prev))
        step = self.global_step
        until = int(self.hparams.target_l0_until * self.trainer.estimated_stepping_batches)
        if step + 1 < self.hparams.l1_warmup_steps or step >= until:
            return
        u = ema - math.log(target) + self.hparams.target_l0_damping * float(self.l0_rate)
        self.l1_coeff_buf.mul_(math.exp(self.hparams.target_l0_gain * u))
        # a λ that L0 does not answer (JumpReLU whose thresholds cannot rise fast enough) would run away: hold
        # it within 10^4 of where it started, and say so once
        lo, hi = self.hparams.l1_coeff * 1e-4, self.hparams.l1_coeff * 1e4
        if not lo <= float(self.l1_coeff_buf) <= hi:
            self.l1_coeff_buf.clamp_(lo, hi)
            if not self._target_warned and self.trainer.is_global_zero:
                self._target_warned = True
                log.warning("target_l0=%g: λ reached %.3g (10^4 from model.l1_coeff=%g) with L0 %.1f; L0 is not "
                            "following λ. Held there; check the architecture's settings (e.g. JumpReLU's "
                            "init threshold and learning rate)", target, float(self.l1_coeff_buf),
                            self.hparams.l1_coeff, l0)

    def on_fit_start(self) -> None:
        guards.check_action(self.hparams.nonfinite, int(self.trainer.world_size))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume checks: a checkpoint of another SAE (size, width, architecture) is refused, naming both; a
        buffer an older version did not write yet keeps its fresh value (with a warning), so such a checkpoint
        still loads strictly."""
        where = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        saved = checkpoint.get("hyper_parameters") or {}
        differ = {k: (saved.get(k, "standard" if k == "architecture" else None), self.hparams.get(k))
                  for k in ("d_in", "d_sae", "architecture", "k", "matryoshka_widths")
                  if saved.get(k, "standard" if k == "architecture" else None) != self.hparams.get(k)
                  and (k != "d_in" or saved.get(k) is not None)}
        if differ:
            what = "; ".join(f"{k}={a!r} there, {b!r} in this run" for k, (a, b) in differ.items())
            raise InputError(f"checkpoint {where or ''} holds another SAE ({what}): resume with the settings it "
                             "was trained with, or start a new run without ckpt_path")
        fill_missing_buffers(self, checkpoint, where)
        groups = [len(o.get("param_groups", [])) for o in checkpoint.get("optimizer_states", [])]
        if groups and groups[0] != self._n_param_groups():
            raise InputError(f"checkpoint {where or ''} trained with {groups[0]} optimizer parameter group(s), this "
                             f"run has {self._n_param_groups()}: model.jumprelu_threshold_lr_scale="
                             f"{saved.get('jumprelu_threshold_lr_scale')} there, "
                             f"{self.hparams.get('jumprelu_threshold_lr_scale')} here; resume with the same value")

    def training_step(self, x_BM: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        loss, logs = self.train_loss(x_BM)
        if not guards.nonfinite_loss(self, loss, self.hparams.nonfinite, finite=self._loss_finite):
            self.log("train/nonfinite_skipped", self.nonfinite_skipped.float(), on_step=True, on_epoch=False)
            return None
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False)
        self.log("train/tokens", self.tokens_seen.float(), on_step=True, on_epoch=False)
        return loss

    def _count_firing(self, fires_F: torch.Tensor, batch_tokens: int) -> float:
        """Add one step's per-feature fire counts (summed over ranks) to the counters; returns the step's L0
        over all ranks."""
        fires_F = fires_F.to(torch.int64, copy=True)  # reduced in place below; the caller keeps its local counts
        n = torch.tensor(batch_tokens, dtype=torch.int64, device=fires_F.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(fires_F)
            dist.all_reduce(n)
        self.tokens_since_fired += n
        self.tokens_since_fired[fires_F > 0] = 0
        self.tokens_seen += n
        self.window_fires += fires_F
        self.window_tokens += n
        return float(fires_F.sum()) / max(1, int(n))

    def dead_frac(self) -> torch.Tensor:
        """Fraction of features silent for the last ``dead_window_tokens`` tokens (all ranks)."""
        return (self.tokens_since_fired >= self.hparams.dead_window_tokens).float().mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.remove_parallel_grads_()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.normalize_decoder_()
        guards.check_parameters(self, self.sae.named_parameters())

    def lr_lambda(self, total_steps: int) -> Callable[[int], float]:
        """The LR schedule's factor at each step: constant, then linear decay to 0 from ``lr_decay_start``."""
        total = max(1, int(total_steps))
        start = int(self.hparams.lr_decay_start * total)

        def factor(step: int) -> float:
            return 1.0 if step < start else max(0.0, (total - step) / max(1, total - start))

        return factor

    def _n_param_groups(self) -> int:
        return 2 if self.hparams.get("jumprelu_threshold_lr_scale") is not None else 1

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The SAE's optimizer: one parameter group, or two when JumpReLU's thresholds have their own lr."""
        scale = self.hparams.get("jumprelu_threshold_lr_scale")
        theta = getattr(self.sae, "log_threshold", None)
        if theta is None or scale is None:
            return self.optimizer_factory(params=self.sae.parameters())
        rest = [p for n, p in self.sae.named_parameters() if n != "log_threshold"]
        opt = self.optimizer_factory(params=[{"params": rest}, {"params": [theta]}])
        opt.param_groups[1]["lr"] *= float(scale)
        return opt

    def configure_optimizers(self):
        opt = self.build_optimizer()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- validation -----------------------------------------------------------------------------------
    def reconstruct_raw(self, acts_BTM: torch.Tensor) -> torch.Tensor:
        """The SAE's reconstruction of *raw* activations (normalise in, un-normalise out)."""
        return raw_reconstruction(self.sae, acts_BTM, self.norm_scale)

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.val_metrics is None:
            return
        if dataloader_idx == 0:
            out = self.sae(batch)
            self.val_metrics.update_acts(batch, out.x_hat, out.feats)
        elif self.transformer is not None:
            net = self.transformer.to(self.device)
            self.val_metrics.update_tokens(net, batch, self.reconstruct_raw, self._mean_acts)

    def end_validation(self) -> dict[str, torch.Tensor]:
        """Compute and reset the held-out metrics; roll the training density window. Returns what to log
        (``val/…`` and ``train/density_window_tokens``, …) and sets ``last_log10_density`` for the plots."""
        if self.val_metrics is None:
            return {}
        metrics = self.val_metrics.compute_and_reset()
        density = {"val": metrics.pop("log10_density")}
        metrics["mse"] = metrics["mse"] / self.norm_scale**2  # reported on raw activations, like eval and export
        if "loss_recovered" not in metrics and not self._lr_warned and self.trainer.is_global_zero:
            log.warning("val/loss_recovered not logged: %s", self.lr_skip_reason or "no held-out token windows")
            self._lr_warned = True
        logs = {f"val/{k}": v for k, v in metrics.items()}
        if not self.trainer.sanity_checking and int(self.window_tokens) > 0:
            window = self.val_metrics.summarize_density(self.window_fires, self.window_tokens)
            density["train"] = window.pop("log10_density")
            # dead over this window is train/dead_frac's job (its own window, dead_window_tokens)
            logs.update({"train/density_window_tokens": window["n_tokens"],
                         **{f"train/{k}": window[k] for k in ("dense_frac", "ultralow_frac") if k in window}})
            self._warn_if_dense(float(window["dense_frac"]), int(window["n_tokens"]))
            self.last_window_fires.copy_(self.window_fires)
            self.last_window_tokens.copy_(self.window_tokens)
            self.window_fires.zero_()
            self.window_tokens.zero_()
        self.last_log10_density = density
        return logs

    def _warn_if_dense(self, dense_frac: float, n_tokens: int) -> None:
        """The paper's rule of thumb: many features firing on > 1% of tokens means λ is too low for this data.
        Warned once per run, on rank 0, with what to do."""
        if (dense_frac <= self.hparams.dense_warn_frac or self._dense_warned or not self.sae.uses_penalty
                or not self.trainer.is_global_zero):
            return
        self._dense_warned = True
        log.warning("%.0f%% of features fired on > 1%% of the last %s training tokens (more than "
                    "model.dense_warn_frac=%g): λ=%.3g is probably too low for these activations (L0 %.1f). Raise "
                    "model.l1_coeff, or set model.target_l0=<the L0 you want> to have λ found for you",
                    100 * dense_frac, f"{n_tokens:,}", self.hparams.dense_warn_frac, self.l1_coeff_now(),
                    float(self.last_l0))

    def on_validation_epoch_end(self) -> None:
        logs = self.end_validation()
        if logs:
            self.log_dict(logs, sync_dist=False)

    def density_window(self) -> tuple[torch.Tensor, int]:
        """The longer of the current and the last completed training density window: (fire counts, tokens)."""
        if int(self.window_tokens) >= int(self.last_window_tokens):
            return self.window_fires.clone(), int(self.window_tokens)
        return self.last_window_fires.clone(), int(self.last_window_tokens)
