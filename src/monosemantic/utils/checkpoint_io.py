"""Checkpoints written so that a kill at any moment leaves every ``*.ckpt`` whole (DESIGN §8).

Lightning's own ``TorchCheckpointIO`` serialises into memory and writes through an fsspec transaction, whose
local temporary file is made in ``$TMPDIR`` (mode 0600) and moved into place with ``shutil.move``: where the
run directory is on another filesystem than ``/tmp`` (a cluster's shared disk) that move is a copy, and a kill
during it leaves a truncated checkpoint under its final name; where it is not, the checkpoint still ends up
readable by its owner alone. This plugin writes a temporary file *beside* the checkpoint, fsyncs it and
renames it into place (atomic on POSIX), with the mode a new file gets (umask), and streams ``torch.save``
into it rather than holding a second copy of the checkpoint in memory. Remote paths (``s3://``…) are left to
Lightning. A temporary file left by a kill (``.<name>.<random>.tmp``) is never a ``*.ckpt``, so nothing
resumes from it; the next save in that folder removes those older than a minute.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from monosemantic.errors import OutputExistsError
from monosemantic.utils.io import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the checkpoint's folder, fsync, ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise OutputExistsError(f"{path} is a folder: a checkpoint cannot be written there")
        self._remove_stale(path.parent)
        atomic_write(path, lambda f: self._write(checkpoint, f), f"the checkpoint {path.name}")
        _fsync_dir(path.parent)

    def _write(self, checkpoint: dict[str, Any], f: Any) -> None:
        torch.save(checkpoint, f)

    @staticmethod
    def _remove_stale(folder: Path, age_s: float = 60.0) -> None:
        now = time.time()
        for p in folder.glob(".*.ckpt.*.tmp"):
            try:
                if now - p.stat().st_mtime > age_s:  # not a save in progress in another process
                    p.unlink()
                    log.info("removed %s, a checkpoint a killed run left half-written", p)
            except FileNotFoundError:
                pass


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
