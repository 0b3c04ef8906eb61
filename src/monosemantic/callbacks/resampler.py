"""Neuron resampling (paper, appendix "Neuron resampling"), as pure functions and a Lightning callback.

At fixed steps (the paper: 25k, 50k, 75k, 100k) every feature that fired on none of the last
``dead_window_tokens`` tokens is re-initialised from an input the SAE reconstructs badly: score a sample
of inputs by the current loss, draw one input per dead feature with probability ∝ loss², point the
feature's dictionary vector at it (:meth:`SparseAutoencoder.resample_`), and zero the Adam moments of
every entry that changed, so stale momentum does not immediately drag the new feature away.

Optimizer state is found by parameter identity (``optimizer.state[sae.W_enc]``), never by position.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from monosemantic.errors import ConfigError
from monosemantic.models.components.sae import SparseAutoencoder

log = logging.getLogger(__name__)

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # max_exp_avg_sq: Adam(amsgrad=True)


def sample_inputs_by_loss(loss_N: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices ``[k]`` of distinct inputs drawn with probability ∝ ``loss²``, on the CPU.

    When fewer than ``k`` inputs have non-zero loss, all of those are taken and the rest are drawn
    uniformly from the zero-loss inputs (``torch.multinomial`` cannot draw zero-weight categories
    without replacement). ``generator`` must be a CPU generator; seed it identically on every rank.
    """
    weights_N = loss_N.detach().to(device="cpu", dtype=torch.float64).flatten().square()
    n = weights_N.numel()
    if k > n:
        raise ValueError(f"cannot draw {k} distinct inputs from {n}")
    if not torch.isfinite(weights_N).all() or (weights_N < 0).any():
        raise ValueError("per-input losses must be finite to resample (got NaN or inf)")
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    positive_N = weights_N > 0
    n_positive = int(positive_N.sum())
    if n_positive >= k:
        return torch.multinomial(weights_N, k, replacement=False, generator=generator)
    zeros_Z = (~positive_N).nonzero().squeeze(1)
    fill = zeros_Z[torch.randperm(zeros_Z.numel(), generator=generator)[: k - n_positive]]
    return torch.cat([positive_N.nonzero().squeeze(1), fill])


@torch.no_grad()
def reset_adam_moments_(optimizer: torch.optim.Optimizer, sae: SparseAutoencoder,
                        dead_F: torch.Tensor) -> None:
    """Zero the Adam moments of ``W_enc[:, dead]``, ``W_dec[dead, :]`` and ``b_enc[dead]`` (and a JumpReLU's
    ``log_threshold[dead]``); ``step`` is left alone. Parameters without state yet (no step taken) are skipped."""
    per_feature = [(sae.W_enc, (slice(None), dead_F)), (sae.W_dec, (dead_F,)), (sae.b_enc, (dead_F,))]
    if isinstance(getattr(sae, "log_threshold", None), torch.nn.Parameter):
        per_feature.append((sae.log_threshold, (dead_F,)))
    for param, select in per_feature:
        state = optimizer.state.get(param, {})
        for key in _MOMENT_KEYS:
            if key in state:
                state[key][select] = 0.0


def resample_dead_features(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead_F: torch.Tensor,
                           inputs_NM: torch.Tensor, loss_N: torch.Tensor, generator: torch.Generator,
                           enc_norm_scale: float = 0.2) -> int:
    """Resample the features ``dead_F`` from ``inputs_NM`` scored by ``loss_N``; returns how many.

    Draws ``len(dead_F)`` distinct inputs ∝ loss², hands them to ``sae.resample_`` (input ``k`` goes to
    feature ``dead_F[k]``) and resets the optimizer moments of exactly the modified entries.
    """
    dead_F = torch.as_tensor(dead_F, dtype=torch.long).flatten().to(sae.W_dec.device)
    idx_K = sample_inputs_by_loss(loss_N, dead_F.numel(), generator)
    _apply_resample(sae, optimizer, dead_F, inputs_NM[idx_K.to(inputs_NM.device)], enc_norm_scale)
    return int(dead_F.numel())


def _apply_resample(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead_F: torch.Tensor,
                    inputs_KM: torch.Tensor, enc_norm_scale: float) -> None:
    sae.resample_(dead_F, inputs_KM, enc_norm_scale=enc_norm_scale)
    reset_adam_moments_(optimizer, sae, dead_F)


class NeuronResampler(L.Callback):
    """Resample dead features at the given optimizer steps.

    Expects ``pl_module.sae`` (:class:`SparseAutoencoder`), ``pl_module.tokens_since_fired`` (int64 buffer
    ``[d_sae]``, already reduced across ranks), ``pl_module.per_input_loss(x_NM) -> loss_N``, and
    ``trainer.datamodule.sample_activations(n_tokens, seed) -> [n, d_in]`` normalised like training batches.

    Args:
        resample_steps: optimizer steps (``trainer.global_step``) after which to resample.
        dead_window_tokens: a feature is dead if it has not fired for this many tokens (paper: 12,500
            steps × 8,192 tokens).
        n_loss_inputs: inputs scored to choose from (paper: 819,200).
        enc_norm_scale: new encoder vectors get this × the mean alive encoder norm (paper: 0.2).
        score: ``"loss"`` scores inputs by ``per_input_loss``, ``"mse"`` by squared reconstruction error.
        seed: seeds the input draw and the choice, identically on every rank.

    Under DDP every rank makes the same decision: the counters are already reduced, inputs are drawn
    with the same seed, and the dead indices and chosen inputs are broadcast from rank 0 through
    ``trainer.strategy.broadcast`` (a no-op on one process), so ranks cannot drift apart numerically.
    """

    def __init__(self, resample_steps: list[int], dead_window_tokens: int, n_loss_inputs: int = 819_200,
                 enc_norm_scale: float = 0.2, score: str = "loss", seed: int = 0,
                 score_chunk: int = 8192) -> None:
        super().__init__()
        if score not in ("loss", "mse"):
            raise ConfigError(f"score must be 'loss' or 'mse', got {score!r}")
        if dead_window_tokens <= 0 or n_loss_inputs <= 0 or score_chunk <= 0:
            raise ConfigError("dead_window_tokens, n_loss_inputs and score_chunk must be positive, got "
                             f"{dead_window_tokens}, {n_loss_inputs}, {score_chunk}")
        self.resample_steps = sorted(int(s) for s in resample_steps)
        self.dead_window_tokens = int(dead_window_tokens)
        self.n_loss_inputs = int(n_loss_inputs)
        self.enc_norm_scale = float(enc_norm_scale)
        self.score = score
        self.seed = int(seed)
        self.score_chunk = int(score_chunk)
        self.done_steps: list[int] = []
        self.history: list[dict[str, int]] = []  # this process's events (logged, not checkpointed)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step not in self.resample_steps or step in self.done_steps:
            return
        self.done_steps.append(step)
        # an SAESweepModule resamples each of its SAEs from one draw of inputs (the draw a solo run makes)
        members = list(getattr(pl_module, "members", [pl_module]))
        inputs: list[torch.Tensor] = []
        for i, module in enumerate(members):
            n = self.resample(trainer, module, step, inputs)
            self.history.append({"step": step, "n_resampled": n, **({"member": i} if len(members) > 1 else {})})
            # straight to the loggers: `self.log` on_step would be dropped unless the step is a multiple of
            # trainer.log_every_n_steps, and every resampling event must be recorded
            if trainer.is_global_zero:
                loggers = pl_module.member_loggers[i] if module is not pl_module else trainer.loggers
                for lg in loggers:
                    lg.log_metrics({"resample/n_resampled": float(n), "resample/step": float(step)}, step=step)

    @torch.no_grad()
    def resample(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int,
                 inputs: list[torch.Tensor] | None = None) -> int:
        """Find dead features of ``pl_module`` (an :class:`SAEModule`), resample them and reset their counters;
        returns how many were resampled. ``inputs`` caches the step's scored-input draw across the SAEs of a
        sweep (empty: draw and fill it)."""
        sae: SparseAutoencoder = pl_module.sae
        counter_F: torch.Tensor = pl_module.tokens_since_fired
        dead_F = (counter_F >= self.dead_window_tokens).nonzero().squeeze(1)
        dead_F = trainer.strategy.broadcast(dead_F.cpu(), src=0)
        if dead_F.numel() == 0:
            log.info("resampling at step %d: no feature silent for %d tokens", step, self.dead_window_tokens)
            return 0

        seed = self.seed + step  # a fresh but reproducible draw at each resampling step
        if not inputs:
            inputs = [] if inputs is None else inputs
            inputs.append(trainer.datamodule.sample_activations(self.n_loss_inputs, seed=seed))
        inputs_NM = inputs[0].to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
        if inputs_NM.shape[0] < dead_F.numel():
            log.warning("resampling at step %d: only %d inputs for %d dead features; resampling %d",
                        step, inputs_NM.shape[0], dead_F.numel(), inputs_NM.shape[0])
            dead_F = dead_F[: inputs_NM.shape[0]]
        loss_N = self._score_inputs(pl_module, inputs_NM)
        generator = torch.Generator().manual_seed(seed)
        idx_K = sample_inputs_by_loss(loss_N, dead_F.numel(), generator)
        chosen_KM = trainer.strategy.broadcast(inputs_NM[idx_K.to(inputs_NM.device)].cpu(), src=0)
        # ranks may have drawn different numbers of inputs (each reads its own shards): rank 0's
        # features and inputs are the ones every rank applies
        dead_F = trainer.strategy.broadcast(dead_F.cpu(), src=0)

        dead_F = dead_F.to(sae.W_dec.device)
        # the optimizer's state is found by parameter identity: a sweep's one optimizer holds every member's
        _apply_resample(sae, trainer.optimizers[0], dead_F, chosen_KM.to(inputs_NM), self.enc_norm_scale)
        counter_F[dead_F.to(counter_F.device)] = 0
        log.info("resampled %d of %d features at step %d (dead: silent for >= %d tokens; %d inputs scored "
                 "by %s)", dead_F.numel(), sae.d_sae, step, self.dead_window_tokens, inputs_NM.shape[0],
                 self.score)
        return int(dead_F.numel())

    def _score_inputs(self, pl_module: L.LightningModule, inputs_NM: torch.Tensor) -> torch.Tensor:
        """Per-input score ``[N]`` in chunks, so 819,200 inputs never meet the SAE at once."""
        scores = []
        for x_CM in inputs_NM.split(self.score_chunk):
            if self.score == "loss":
                scores.append(pl_module.per_input_loss(x_CM).detach().reshape(-1))
            else:
                scores.append((pl_module.sae(x_CM).x_hat - x_CM).square().sum(dim=-1))
        return torch.cat(scores)

    def state_dict(self) -> dict[str, Any]:
        return {"done_steps": list(self.done_steps), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the steps already done (so a resumed run does not resample twice) and the seed."""
        self.done_steps = [int(s) for s in state_dict.get("done_steps", [])]
        self.seed = int(state_dict.get("seed", self.seed))
