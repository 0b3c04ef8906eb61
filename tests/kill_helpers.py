"""Test-only plugins for real runs that are SIGKILLed at a chosen moment (``tests/`` on PYTHONPATH): each writes
a marker file when it reaches that moment and then waits to be killed, so the test kills a process that is
exactly there."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import lightning as L
import torch

from monosemantic.utils.checkpoint_io import AtomicCheckpointIO


def _wait_for_the_kill(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(600)
    raise SystemExit("not killed")


class PauseMidStep(L.Callback):
    """At optimizer step ``step``: after the backward, before the optimizer moves anything."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = int(step), marker

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            _wait_for_the_kill(self.marker)


class StallingCheckpointIO(AtomicCheckpointIO):
    """The project's checkpoint writer, except that save number ``stall_at`` (counting from 1) writes half of its
    bytes into the temporary file and then waits: a kill in the middle of writing a checkpoint."""

    def __init__(self, stall_at: int, marker: str) -> None:
        super().__init__()
        self.stall_at, self.marker, self.saves = int(stall_at), marker, 0

    def _write(self, checkpoint, f) -> None:
        self.saves += 1
        if self.saves != self.stall_at:
            return super()._write(checkpoint, f)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        _wait_for_the_kill(self.marker)
