"""``SAESweepModule``: k SAEs trained side by side on the same batches (``experiment=sae_sweep``).

Each member is a whole :class:`~monosemantic.models.sae_module.SAEModule` (its SAE, λ, warm-up, dead-feature
counters, density windows, validation metrics, dense-or-sparse step) and this module only fans each batch
out to them, so a member trains exactly as it would alone:

- the loss is the sum of the members' losses; their parameters are disjoint, so each member's gradient is
  its own loss's gradient;
- one Adam holds each member's parameters in the member's own param groups (its ``lr``, ``betas``, …, from
  its optimizer config) and per-parameter moments: Adam's update is elementwise, so this is k independent
  Adams. One optimizer, not k, because under Lightning's manual optimization every ``optimizer.step()`` would
  advance ``global_step``, which schedules resampling, validation and ``max_steps``; the LR schedule is one
  ``LambdaLR`` with a factor per param group;
- gradient clipping, when configured, is per member (a global norm would couple them);
- decoder hygiene (parallel-gradient removal, row renormalisation) runs on each member.

The neuron resampler and the density plots act on each member (``members``); each member's numbers go to
its own loggers (``member_loggers``, set by the stage: one W&B run per SAE, grouped), the sum of the losses
to the trainer's. ``tests/test_sweep.py`` checks each member ends equal to its solo run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from monosemantic.errors import ConfigError
from monosemantic.models import guards
from monosemantic.models.sae_module import SAEModule, fill_missing_buffers


class SAESweepModule(L.LightningModule):
    def __init__(self, members: Sequence[SAEModule], names: Sequence[str]) -> None:
        super().__init__()
        if len(members) != len(names) or not members:
            raise ConfigError(f"{len(members)} SAEs for {len(names)} names: a sweep needs one name per SAE")
        if len(set(names)) != len(names):
            raise ConfigError(f"sweep member names repeat: {list(names)}")
        d_in = {int(m.hparams.d_in) for m in members}
        if len(d_in) != 1:
            raise ConfigError(f"the SAEs of one sweep read one stream, so one d_in; got {sorted(d_in)}")
        self.members = nn.ModuleList(members)
        self.names = list(names)
        # set by the stage, not checkpointed: each member's own loggers and output folder (plots)
        self.member_loggers: list[list[Logger]] = [[] for _ in members]
        self.member_dirs: list[str] = ["." for _ in members]
        # the members' model.nonfinite (one stream: a batch is skipped for all or none); skipped batches here
        self.nonfinite = "skip" if all(m.hparams.nonfinite == "skip" for m in members) else "stop"
        self.register_buffer("nonfinite_skipped", torch.zeros((), dtype=torch.int64))

    # -- wiring ---------------------------------------------------------------------------------------
    @property
    def norm_scale(self) -> float:
        return self.members[0].norm_scale

    def attach_data(self, *args: Any, **kwargs: Any) -> None:
        for m in self.members:
            m.attach_data(*args, **kwargs)

    def _share_trainer(self) -> None:
        # members read global_step, sanity_checking and the datamodule through their own `trainer`
        for m in self.members:
            m.trainer = self.trainer

    def setup(self, stage: str) -> None:
        self._share_trainer()
        for m in self.members:
            m.setup(stage)

    def on_fit_start(self) -> None:
        self._share_trainer()  # also after a checkpoint restore
        guards.check_action(self.nonfinite, int(self.trainer.world_size))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """As :meth:`SAEModule.on_load_checkpoint` for the buffers: the members' hooks are not called."""
        fill_missing_buffers(self, checkpoint, getattr(self._trainer, "ckpt_path", None) if self._trainer else None)

    def log_member(self, i: int, metrics: dict[str, Any], step: int | None = None) -> None:
        """Send ``metrics`` to member ``i``'s own loggers (rank 0 only, as Lightning's loggers are)."""
        if not self.trainer.is_global_zero or not self.member_loggers[i]:
            return
        values = {k: float(v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        for lg in self.member_loggers[i]:
            lg.log_metrics(values, step=self.trainer.global_step if step is None else step)

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, x_BM: torch.Tensor, batch_idx: int) -> torch.Tensor:
        total = x_BM.new_zeros((), dtype=torch.float32)
        every = max(1, int(self.trainer.log_every_n_steps))
        log_now = (self.global_step + 1) % every == 0
        # a member's train_loss moves its counters (firing, tokens, λ, L0): a batch skipped for a later member
        # must leave the earlier ones as they were
        before = ([{n: b.clone() for n, b in m.named_buffers()} for m in self.members]
                  if self.nonfinite == "skip" else None)
        member_logs = []
        for i, m in enumerate(self.members):
            loss, logs = m.train_loss(x_BM)
            if not guards.nonfinite_loss(self, loss, self.nonfinite, what=f"loss of {self.names[i]}",
                                         finite=m._loss_finite):
                with torch.no_grad():
                    for earlier, saved in zip(self.members[:i], before or []):
                        for n, b in earlier.named_buffers():
                            b.copy_(saved[n])
                return None  # the whole batch, for every member: they share one optimizer step
            total = total + loss.float()
            member_logs.append({**logs, "train/tokens": m.tokens_seen})
        if log_now:
            for i, logs in enumerate(member_logs):
                self.log_member(i, logs)
        self.log("train/loss_sum", total.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for m in self.members:
            m.sae.remove_parallel_grads_()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if not gradient_clip_val:
            return
        for m in self.members:
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(m.sae.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(m.sae.parameters(), gradient_clip_val)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        for name, m in zip(self.names, self.members):
            m.sae.normalize_decoder_()
            guards.check_parameters(self, ((f"{name}.{n}", p) for n, p in m.sae.named_parameters()))

    def configure_optimizers(self):
        own = [m.build_optimizer() for m in self.members]
        kinds = {type(o) for o in own}
        if len(kinds) != 1:
            raise ConfigError(f"the SAEs of one sweep share one optimizer class (each its own settings); got "
                             f"{sorted(k.__name__ for k in kinds)}")
        groups = [g for o in own for g in o.param_groups]  # each group keeps its member's lr, betas, …
        opt = kinds.pop()(groups)
        total = self.trainer.estimated_stepping_batches
        factors = [m.lr_lambda(total) for m, o in zip(self.members, own) for _ in o.param_groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- validation -----------------------------------------------------------------------------------
    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        for m in self.members:
            m.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        for i, m in enumerate(self.members):
            logs = m.end_validation()
            if logs and not self.trainer.sanity_checking:
                self.log_member(i, logs)
        if self.trainer.is_global_zero:
            for lg in (lg for lgs in self.member_loggers for lg in lgs):
                lg.save()  # the trainer flushes only its own loggers
