"""The global random generators' states in every checkpoint, put back on resume (DESIGN §8).

Lightning's ``Trainer`` saves the model, optimizer, schedules, loops and callbacks but not the random state, so
a resumed run draws other numbers than the uninterrupted one from its first random call. Our SAE and
transformer runs draw nothing global after ``setup`` (the stream and the resampler use their own seeded
generators); this keeps a component that does (dropout, a stochastic resampler, a user's callback) on the
uninterrupted run's numbers too. Saved: torch's CPU generator, every CUDA device's, numpy's and Python's, for
every rank (gathered when a checkpoint is written; each rank gets its own back). Stored as tensors, ints and
lists only, so a checkpoint still loads with ``torch.load(weights_only=True)`` (Lightning's own collector keeps
numpy's state as an array, which that refuses). Restored at the first training batch after the resume (see
:class:`RNGState`): what ``setup`` draws (the b_dec sample) is the fresh run's, as it was in the original.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

KEY = "rng_states"


def collect_rng_state() -> dict[str, Any]:
    """This process's generators, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": [int(version), list(state), gauss]}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("torch.cuda") and torch.cuda.is_available() and len(s["torch.cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["torch.cuda"])
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))


class RNGState(L.Callback):
    """Writes ``checkpoint["rng_states"]`` (a list, one entry per rank) and restores this rank's entry at the
    first training batch after the resume: a ``DataLoader`` draws its workers' base seed from torch's generator
    when its iterator is made, which a resumed run does again after loading, so restoring any earlier would
    leave torch's numbers one draw off. Inside an epoch the resumed run then draws exactly what the uninterrupted
    one did; a checkpoint taken at an epoch's end misses the next epoch's iterator draw."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        mine = collect_rng_state()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(states, mine)  # every rank dumps the checkpoint; rank 0 writes it
        else:
            states = [mine]
        checkpoint[KEY] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(KEY)
        if not states:
            log.info("the checkpoint holds no random state (an older version wrote it): the generators start "
                     "from this run's seed")
            return
        rank = trainer.global_rank
        if len(states) != trainer.world_size:
            log.warning("the checkpoint holds the random state of %d ranks, this run has %d: rank %d takes "
                        "entry %d", len(states), trainer.world_size, rank, rank % len(states))
        self._pending = states[rank % len(states)]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None
