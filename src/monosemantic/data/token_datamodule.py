"""``TokenDataModule``: random ``n_ctx`` windows of the token store for training (fresh ones each epoch),
fixed held-out ones for validation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from monosemantic.data.chunks import stream_batches
from monosemantic.data.corpus import CorpusConfig
from monosemantic.data.token_store import build_token_store, load_split, read_meta
from monosemantic.data.tokenizer import TokenizerConfig, load_tokenizer
from monosemantic.errors import InputError

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Windows of ``n_ctx + 1`` tokens (inputs and their next-token targets) at given start offsets."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, n_ctx: int) -> None:
        self.tokens, self.starts, self.n_ctx = tokens, starts, n_ctx

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return torch.from_numpy(self.tokens[s : s + self.n_ctx + 1].astype(np.int64))


class SlidingWindows(Dataset):
    """Every window of ``n_ctx + 1`` tokens: item ``i`` starts at token ``i`` (a sampler picks which)."""

    def __init__(self, tokens: np.ndarray, n_ctx: int) -> None:
        if len(tokens) < n_ctx + 1:
            raise InputError(f"{len(tokens)} tokens cannot hold one window of n_ctx={n_ctx}")
        self.tokens, self.n_ctx = tokens, n_ctx

    def __len__(self) -> int:
        return len(self.tokens) - self.n_ctx

    def __getitem__(self, start: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[start : start + self.n_ctx + 1].astype(np.int64))


def random_starts(n_tokens: int, n_ctx: int, n_windows: int, seed: int, epoch: int = 0) -> np.ndarray:
    """``n_windows`` random window starts, a pure function of (seed, epoch): epoch 0 draws from ``seed``
    alone (the draw every run made before windows were refreshed per epoch), later epochs from both."""
    if n_tokens < n_ctx + 1:
        raise InputError(f"{n_tokens} tokens cannot hold one window of n_ctx={n_ctx}")
    rng = np.random.default_rng(seed if epoch == 0 else [seed, epoch])
    return rng.integers(0, n_tokens - n_ctx, size=n_windows)


class RandomWindowSampler(Sampler[int]):
    """Draws ``n_windows`` fresh random starts into a :class:`SlidingWindows` at every epoch.

    The epoch is read when iteration starts (``epoch_fn``, e.g. the trainer's current epoch) or set with
    :meth:`set_epoch`; every rank draws the same starts, and under DDP Lightning's sampler wrapper then
    gives each rank its share of them."""

    def __init__(self, n_tokens: int, n_ctx: int, n_windows: int, seed: int,
                 epoch_fn: Callable[[], int] | None = None) -> None:
        self.n_tokens, self.n_ctx, self.n_windows, self.seed = n_tokens, n_ctx, n_windows, seed
        self.epoch_fn, self.epoch = epoch_fn, 0
        self.skip_next = 0  # starts to leave out of the next epoch's draw (a resume inside that epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_windows

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        skip, self.skip_next = self.skip_next, 0
        return iter(random_starts(self.n_tokens, self.n_ctx, self.n_windows, self.seed, epoch)[skip:].tolist())


def tiled_starts(n_tokens: int, n_ctx: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows (stride n_ctx + 1), in order: a fixed held-out set."""
    starts = np.arange(0, n_tokens - n_ctx, n_ctx + 1)
    return starts if max_windows is None else starts[:max_windows]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class TokenDataModule(L.LightningDataModule):
    def __init__(self, data_dir: str, corpus: dict | None = None, tokenizer: dict | None = None,
                 n_ctx: int = 128, batch_size: int = 64, val_fraction: float = 0.02,
                 train_windows: int | None = None, val_windows: int | None = 256, num_workers: int = 0,
                 seed: int = 0, store_dir: str | None = None) -> None:
        """
        Args:
            data_dir: root of cached artifacts (corpus, tokenizer, token store live under it).
            corpus: :class:`CorpusConfig` fields (kind, root, data_files, path, ...).
            tokenizer: :class:`TokenizerConfig` fields (kind, vocab_size, ...).
            n_ctx: context length of each window.
            val_fraction: share of documents held out for validation.
            train_windows: random windows per epoch, drawn afresh each epoch (default: train tokens // n_ctx).
            val_windows: held-out windows evaluated (tiled from the start of val.bin); None for all.
            store_dir: use this existing token store instead of building one from corpus + tokenizer.
        """
        super().__init__()
        # plain containers: a checkpoint's hyper-parameters then load with torch.load(weights_only=True)
        corpus, tokenizer = _plain(corpus), _plain(tokenizer)
        self.save_hyperparameters(logger=False)
        self.corpus_cfg = CorpusConfig(**(corpus or {}))
        self.tok_cfg = TokenizerConfig(**(tokenizer or {}))
        self.store_dir: Path | None = Path(store_dir) if store_dir else None
        self.meta: dict[str, Any] = {}
        self.train_set: SlidingWindows | None = None
        self.train_sampler: RandomWindowSampler | None = None
        self.val_set: TokenWindows | None = None

    def prepare_data(self) -> None:
        if self.store_dir is None:
            self.store_dir = build_token_store(self.corpus_cfg, self.tok_cfg, self.hparams.data_dir,
                                               self.hparams.val_fraction)
        self.meta = read_meta(self.store_dir)

    @property
    def vocab_size(self) -> int:
        if not self.meta:
            self.prepare_data()
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.store_dir) / self.meta["tokenizer"]

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.meta:
            self.prepare_data()
        n_ctx, seed = self.hparams.n_ctx, self.hparams.seed
        train, val = load_split(self.store_dir, "train"), load_split(self.store_dir, "val")
        n_train = self.hparams.train_windows or max(1, len(train) // n_ctx)
        self.train_set = SlidingWindows(train, n_ctx)
        self.train_sampler = RandomWindowSampler(len(train), n_ctx, n_train, seed, epoch_fn=self._current_epoch)
        self.val_set = TokenWindows(val, tiled_starts(len(val), n_ctx, self.hparams.val_windows), n_ctx)
        if len(self.val_set) == 0:
            raise InputError(f"{self.store_dir}/val.bin has too few tokens for one window of n_ctx={n_ctx}")

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else self.train_sampler.epoch

    def _loader(self, ds: Dataset, sampler: Sampler | None = None) -> DataLoader:
        # no shuffle: the train windows are already random (seeded per epoch), so the order is reproducible;
        # under DDP Lightning wraps the sampler and splits its starts between ranks
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.hparams.num_workers, drop_last=False,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_sampler)

    def _batches_per_epoch(self, trainer) -> int:
        """Training batches in one epoch on this rank, as Lightning counts them (``limit_train_batches``: an
        int caps the count, a fraction scales it)."""
        per_rank = -(-len(self.train_sampler) // int(trainer.world_size))  # DistributedSampler pads to equal
        n = max(1, -(-per_rank // self.hparams.batch_size))
        limit = getattr(trainer, "limit_train_batches", None)
        if isinstance(limit, int):
            n = min(n, limit)
        elif limit is not None:
            n = int(n * float(limit))
        return max(1, n)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the optimizer steps and the accumulation. A resume inside an epoch leaves the
        windows of that epoch already trained on out of its draw, so a killed run resumed with ``ckpt_path=last``
        trains on exactly the windows the uninterrupted one does (Lightning itself would restart the epoch's
        loader from its first batch). ``train_batches`` (steps × accumulation) is what versions before
        2026-12-04 wrote, and all they are resumed by."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        return {"train_batches": stream_batches(trainer),
                "global_step": int(trainer.global_step), "accumulate": int(trainer.accumulate_grad_batches),
                "batch_size": int(self.hparams.batch_size), "world_size": int(trainer.world_size)}

    def _done_in_epoch(self, state_dict: dict[str, Any], trainer) -> int:
        """Batches of the current epoch trained on at the checkpoint. Lightning steps the optimizer every
        ``accumulate`` batches and at an epoch's end, so an epoch of n batches is ⌈n / accumulate⌉ steps."""
        per_epoch = self._batches_per_epoch(trainer)
        if "global_step" not in state_dict:  # an older checkpoint: right when accumulate divides the epoch
            return int(state_dict["train_batches"]) % per_epoch
        accumulate = int(state_dict["accumulate"])
        steps_per_epoch = -(-per_epoch // accumulate)
        return min(per_epoch, (int(state_dict["global_step"]) % steps_per_epoch) * accumulate)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or self.train_sampler is None:
            return
        trainer = self.trainer
        if (int(state_dict["batch_size"]), int(state_dict["world_size"])) != (self.hparams.batch_size,
                                                                               int(trainer.world_size)):
            log.warning("resuming with another batch size or number of ranks than the checkpoint's: the rest of "
                        "this epoch's windows is drawn again from its start")
            return
        if int(trainer.world_size) > 1:
            # Lightning's DistributedSamplerWrapper shuffles the draw's positions over len(sampler): a shortened
            # draw would index past its end, and its first starts are not the ones already trained on
            log.warning("resuming a multi-rank transformer run inside an epoch: the rest of this epoch's windows "
                        "is drawn again from its start (the exact skip is single-process only)")
            return
        done = self._done_in_epoch(state_dict, trainer)
        self.train_sampler.skip_next = done * self.hparams.batch_size  # the starts already trained on

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
