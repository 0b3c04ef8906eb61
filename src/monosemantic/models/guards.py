"""Numerical guards for SAE training (DESIGN §8): a NaN or inf in the loss or the parameters never trains on.

``model.nonfinite=stop`` (the default) raises :class:`~monosemantic.errors.NonFiniteError` at once, naming the
step, where the batch came from (its pass, chunk and shards, from the stream's arithmetic) and the last
checkpoint written before it, which is the one to resume from once the cause is fixed. ``skip`` drops the batch
(no backward; no parameter moves; the firing counters and λ ignore it), counts it (``train/nonfinite_skipped``,
checkpointed) and goes on. Lightning still counts the step (and the LR schedule advances), so the stream's
checkpointed position, optimizer steps × accumulation, stays right and a resume starts at the right batch.
The parameters are checked after every optimizer step (one reduction per tensor): a step that made them
non-finite always stops the run, since there is nothing to skip back to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from monosemantic.data.chunks import stream_batches
from monosemantic.errors import ConfigError, NonFiniteError

log = logging.getLogger(__name__)
ACTIONS = ("stop", "skip")


def check_action(action: str, world_size: int = 1) -> None:
    if action not in ACTIONS:
        raise ConfigError(f"model.nonfinite={action!r}: expected one of {', '.join(ACTIONS)}")
    if action == "skip" and world_size > 1:
        raise ConfigError("model.nonfinite=skip needs a single process: under DDP a rank that skips a batch "
                          "leaves the others waiting in the gradient all-reduce; use model.nonfinite=stop")


def last_checkpoint(trainer) -> str:
    """The newest checkpoint this run wrote, or the one it resumed from; a sentence when there is none."""
    paths = []
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        paths += [p for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")) if p]
        dirpath = getattr(cb, "dirpath", None)
        if dirpath and Path(dirpath).is_dir():
            paths += [str(p) for p in Path(dirpath).glob("*.ckpt")]
    if getattr(trainer, "ckpt_path", None):
        paths.append(str(trainer.ckpt_path))
    existing = [p for p in paths if Path(p).is_file()]
    if not existing:
        return "none written yet (the run has to start again from the beginning)"
    return max(existing, key=lambda p: Path(p).stat().st_mtime)


def batch_source(trainer, stream_batch: int) -> str:
    """Where training batch ``stream_batch`` of this rank came from, as far as the datamodule can say."""
    dm = getattr(trainer, "datamodule", None)
    describe = getattr(dm, "describe_batch", None)
    if describe is None:
        return f"training batch {stream_batch}"
    try:
        return describe(stream_batch)
    except Exception as e:  # the description is a courtesy: never hide the error it is part of
        return f"training batch {stream_batch} (its source could not be worked out: {e})"


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` is finite on every rank: under DDP one scalar all-reduce, so every rank takes the same
    branch (a rank that stopped or skipped alone would leave the others waiting in a collective)."""
    ok = torch.isfinite(t.detach()).all()
    if dist.is_available() and dist.is_initialized():
        ok = ok.to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def nonfinite_loss(module, loss: torch.Tensor, action: str, what: str = "loss", finite: bool | None = None) -> bool:
    """True when ``loss`` is finite. Otherwise, under ``action="stop"``, raise naming the step, the batch and the
    last checkpoint; under ``"skip"``, count the batch in ``module.nonfinite_skipped`` and return False (the
    caller returns None: Lightning then skips the backward and the optimizer step). ``module`` has the buffer
    ``nonfinite_skipped``. ``finite``: :func:`all_finite` of ``loss``, when
    the caller has it already (it is a collective under DDP: every rank calls it once per loss)."""
    if finite is None:
        finite = all_finite(loss)
    if finite:
        return True
    value = float(loss.detach().float().sum())
    shown = f"{value}" if not torch.isfinite(torch.tensor(value)) else f"{value} here (non-finite on another rank)"
    trainer = module.trainer
    stream_batch = stream_batches(trainer)
    where = batch_source(trainer, stream_batch)
    if action == "skip":
        module.nonfinite_skipped += 1
        log.warning("step %d: %s is %s on %s; batch skipped (%d so far, model.nonfinite=skip)",
                    module.global_step, what, shown, where, int(module.nonfinite_skipped))
        return False
    raise NonFiniteError(
        f"step {module.global_step}: the {what} is {shown} on {where}. The run stopped "
        f"before training on it; last checkpoint: {last_checkpoint(trainer)}. Look at that batch (NaN or huge "
        "activations?), lower the learning rate, or set model.nonfinite=skip to drop such batches and count them.")


def check_parameters(module, params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise when an optimizer step left a parameter non-finite (one reduction per tensor, no copy)."""
    for name, p in params:
        if bool(torch.isfinite(p.detach().sum())):
            continue
        n_bad = int((~torch.isfinite(p.detach())).sum())
        if n_bad:  # not merely a sum too large for its dtype
            raise NonFiniteError(
                f"step {module.global_step}: after the optimizer step on "
                f"{batch_source(module.trainer, stream_batches(module.trainer))}, {name} has {n_bad} "
                f"non-finite entries. Last checkpoint: {last_checkpoint(module.trainer)}. Resume from it with a "
                "lower learning rate (or gradient clipping: trainer.gradient_clip_val).")
