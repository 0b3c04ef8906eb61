"""What both activation datamodules share (the shard cache's and the on-the-fly one): loaders over a
:class:`~monosemantic.data.chunks.ChunkedStream`, the stream's checkpointed position, loss-recovered windows and
activation samples. A subclass provides ``setup``, ``stream(split, **overrides)`` and ``lr_windows``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from monosemantic.data.chunks import check_slots_unchanged, check_stream_state, stream_state


class StreamDataModule(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.manifest: dict[str, Any] = {}
        self._resume_batches, self._resume_slots = 0, None
        self.skipped = None  # SkippedShards: shared by every stream and worker

    @property
    def d_in(self) -> int:
        if not self.manifest:
            self.setup()
        return int(self.manifest["d_in"])

    @property
    def n_skipped(self) -> int:
        """Damaged shards skipped (``skip_corrupt=true``) by any stream of this datamodule in this process
        and its workers, each counted once; the SAE stage sums the ranks' records."""
        return self.skipped.count() if self.skipped is not None else 0

    def _loader(self, ds: IterableDataset) -> DataLoader:
        # batches are formed in the stream (batch_size=None); workers each take their own units
        return DataLoader(ds, batch_size=None, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if self._resume_batches:
            check_slots_unchanged(self._resume_slots, getattr(self, "trainer", None), self.hparams.num_workers)
        return self._loader(self.stream("train", skip_batches=self._resume_batches))

    def val_dataloader(self) -> list[DataLoader]:
        lr = self.lr_loader()
        return [self._loader(self.stream("val"))] + ([lr] if lr is not None else [])

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: how many batches this rank's training stream has delivered; where the next one
        comes from is arithmetic on the units' row counts (``data/chunks.py``)."""
        return stream_state(getattr(self, "trainer", None), self._resume_batches, self.hparams.num_workers)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored by Lightning before the dataloaders are built: the resumed stream skips the chunks already
        trained on without reading them and loads only the chunk it resumes in."""
        self._resume_batches = check_stream_state(state_dict)
        self._resume_slots = state_dict.get("slots")

    def describe_batch(self, batch: int) -> str:
        """Where this rank's training batch number ``batch`` comes from: its pass, chunk and the chunk's units
        (shards, or blocks of contexts on the fly), by the stream's arithmetic (nothing is read). With DataLoader
        workers the worker is named; their plans are their own, so the units are not."""
        workers = max(1, int(self.hparams.num_workers))
        if workers > 1:
            return (f"training batch {batch} (worker {batch % workers} of data.num_workers={workers}, its batch "
                    f"{batch // workers})")
        stream = self.stream("train")
        pass_index, chunk, within = stream.position(batch)
        plan = stream.plan(pass_index)
        units = plan[chunk][0] if chunk < len(plan) else []
        names = [Path(u).name if isinstance(u, str) else f"context block {u}" for u in units]
        shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
        return f"training batch {batch} (pass {pass_index}, chunk {chunk} of [{shown}], batch {within} in it)"

    def lr_loader(self, n_windows: int | None = None) -> DataLoader | None:
        windows = self.lr_windows(n_windows)
        return None if windows is None else DataLoader(windows, batch_size=self.hparams.lr_batch_size)

    def _sample_overrides(self, n_tokens: int) -> dict[str, Any]:
        """Extra stream settings for :meth:`sample_activations`."""
        return {}

    def sample_activations(self, n_tokens: int, seed: int) -> torch.Tensor:
        """``[n_tokens, d_in]`` normalised training activations in an order shuffled with ``seed`` (for the
        decoder-bias init and neuron resampling); fewer if a pass holds fewer."""
        out, n = [], 0
        for x in self.stream("train", batch_size=min(n_tokens, 65_536), seed=seed, infinite=False,
                             drop_last=False, **self._sample_overrides(n_tokens)):
            out.append(x)
            n += len(x)
            if n >= n_tokens:
                break
        return torch.cat(out)[:n_tokens]
