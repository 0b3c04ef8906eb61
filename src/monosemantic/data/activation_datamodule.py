"""``ActivationDataModule``: stream a shard set with webdataset, shuffled at the token level.

- Shards are split by node and by DataLoader worker (``wds.split_by_node`` / ``wds.split_by_worker``),
  so in one pass every token is read exactly once across ranks × workers.
- A shuffle buffer measured in *tokens* mixes rows from many contexts before batching (paper: "shuffled
  across contexts"); a batch of 4,096 from a 262,144-token buffer draws from hundreds of contexts.
- Batches are float32 ``[batch, d_in]``, multiplied by the normalisation scale (mean norm √d_in).
- The training stream is endless (each pass re-orders the shards with ``seed + pass``); ``max_steps``
  bounds training, so ranks never disagree on when an epoch ends. Validation reads the held-out shards
  once, in order.
"""

from __future__ import annotations

import logging
import random
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from monosemantic.data.shards import ShardSetError, decode_context, norm_scale, read_manifest
from monosemantic.data.token_datamodule import TokenWindows, tiled_starts
from monosemantic.data.token_store import load_split

log = logging.getLogger(__name__)


def _shard_in(exn: Exception) -> str | None:
    """The shard a webdataset error is about: its args carry the url, or ``"... @ <file name='...tar'>"``."""
    for arg in reversed(exn.args):
        if isinstance(arg, str) and (m := re.search(r"([^\s'\"<>]+\.tar)\b", arg)):
            return m.group(1)
    return None


class ActivationStream(IterableDataset):
    """Batches of activations from tar shards. ``with_ids`` also yields each row's context id (for tests).

    ``shard_tokens`` (url → rows, from the manifest) lets a shard that ends early be caught: a tar cut at a
    512-byte block boundary reads as a clean end of archive. ``split_nodes=False`` reads the same shards on
    every rank (for estimates that all ranks must share).
    """

    def __init__(self, urls: list[str], d_in: int, batch_size: int, buffer_tokens: int = 0, scale: float = 1.0,
                 seed: int = 0, shuffle: bool = True, infinite: bool = False, drop_last: bool = True,
                 skip_corrupt: bool = False, with_ids: bool = False,
                 shard_tokens: dict[str, int] | None = None, split_nodes: bool = True,
                 skip_batches: int = 0) -> None:
        super().__init__()
        if not urls:
            raise ShardSetError("no shards to stream")
        self.urls, self.d_in, self.batch_size = list(urls), d_in, batch_size
        self.buffer_tokens = max(buffer_tokens, batch_size) if shuffle else batch_size
        self.scale, self.seed, self.shuffle, self.infinite = scale, seed, shuffle, infinite
        self.drop_last, self.skip_corrupt, self.with_ids = drop_last, skip_corrupt, with_ids
        self.shard_tokens, self.split_nodes = dict(shard_tokens or {}), split_nodes
        self.skip_batches = skip_batches  # batches of this rank's stream already trained on (resume)
        self.n_skipped = 0
        self._reported: set[str] = set()  # shards already reported this pass (one problem, one count)

    def _handler(self, exn: Exception, url: str | None = None) -> bool:
        where = url or _shard_in(exn)
        msg = str(exn) if isinstance(exn, ShardSetError) else (
            f"shard {where or '?'} is truncated or corrupt: {exn.args[0] if exn.args else exn!r}")
        if self.skip_corrupt:
            if where is None or where not in self._reported:  # one damaged shard counts once
                self.n_skipped += 1
                warnings.warn(f"skipping: {msg} (skipped so far: {self.n_skipped})", stacklevel=2)
            if where is not None:
                self._reported.add(where)
            return True
        raise ShardSetError(msg) from exn

    def _check_shard_size(self, url: str | None, n_rows: int) -> None:
        expected = self.shard_tokens.get(url) if url is not None else None
        if expected is None or n_rows == expected or url in self._reported:
            return
        self._handler(ShardSetError(f"shard {url} holds {n_rows} rows but manifest.json lists {expected}: "
                                    "it is truncated or corrupt"), url)

    def _contexts(self, urls: list[str]) -> Iterator[tuple[np.ndarray, int]]:
        self._reported = set()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls), *([wds.split_by_node] if self.split_nodes else []),
            wds.split_by_worker, wds.tarfile_to_samples(handler=self._handler),
        )
        url, n_rows = None, 0  # rows read from the current shard (a worker reads each shard whole)
        for sample in pipeline:
            if sample.get("__url__") != url:
                self._check_shard_size(url, n_rows)
                url, n_rows = sample.get("__url__"), 0
            try:
                acts = decode_context(sample, self.d_in, extras=())["acts"]
            except ShardSetError as e:
                self._handler(e, url)
                continue
            n_rows += len(acts)
            key = sample["__key__"]
            ctx_id = int(key) if key.isdigit() else zlib.crc32(f"{sample.get('__url__')}/{key}".encode())
            yield acts, ctx_id
        self._check_shard_size(url, n_rows)

    def _emit(self, acts: torch.Tensor, ids: torch.Tensor | None, n: int) -> Iterator[Any]:
        for b in range(0, n, self.batch_size):
            x = acts[b : b + self.batch_size].float()
            if self.scale != 1.0:
                x.mul_(self.scale)
            yield (x, ids[b : b + self.batch_size]) if ids is not None else x

    def _mix(self, pend_acts: list[torch.Tensor], pend_ids: list[torch.Tensor], n: int,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Concatenate the pending rows and, when shuffling, permute them (ids only kept when asked for)."""
        acts = torch.cat(pend_acts)
        ids = torch.cat(pend_ids) if pend_ids else None
        if self.shuffle:
            perm = torch.randperm(n, generator=gen)
            acts = acts[perm]
            ids = ids[perm] if ids is not None else None
        return acts, ids

    def _one_pass(self, pass_index: int) -> Iterator[Any]:
        rank, world, worker, n_workers = wds.utils.pytorch_worker_info()
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed + pass_index).shuffle(urls)  # same order on every rank, then split
        if self.infinite and len(urls) < world * n_workers:
            raise ShardSetError(f"{len(urls)} training shards cannot feed {world} ranks × {n_workers} workers; "
                                "cache more shards (smaller contexts_per_shard) or use fewer workers")
        gen = torch.Generator().manual_seed(hash((self.seed, pass_index, rank, worker)) % 2**62)
        pend_acts: list[torch.Tensor] = []
        pend_ids: list[torch.Tensor] = []  # context id per row, tracked only for with_ids (tests)
        n = 0
        for acts, ctx_id in self._contexts(urls):
            pend_acts.append(torch.from_numpy(acts))
            if self.with_ids:
                pend_ids.append(torch.full((len(acts),), ctx_id, dtype=torch.int64))
            n += len(acts)
            if n >= self.buffer_tokens:
                acts_all, ids_all = self._mix(pend_acts, pend_ids, n, gen)
                # emit all but half a buffer, which stays to mix with the next contexts
                keep = self.buffer_tokens // 2 if self.shuffle else 0
                n_out = (n - keep) // self.batch_size * self.batch_size
                yield from self._emit(acts_all, ids_all, n_out)
                pend_acts = [acts_all[n_out:]]
                pend_ids = [ids_all[n_out:]] if ids_all is not None else []
                n -= n_out
        if n:
            acts_all, ids_all = self._mix(pend_acts, pend_ids, n, gen)
            n_out = n // self.batch_size * self.batch_size if self.drop_last else n
            yield from self._emit(acts_all, ids_all, n_out)

    def __iter__(self) -> Iterator[Any]:
        # On resume, replay this rank's stream (it is deterministic for the seed) without yielding the
        # batches already trained on: nothing is seen twice or skipped. A DataLoader takes batches from its
        # workers in turn, so worker w of k owns batches w, w+k, …; it always starts at worker 0, so with k
        # workers the order within a round of k batches may differ from the original run's.
        _, _, worker, n_workers = wds.utils.pytorch_worker_info()
        to_skip = max(0, -(-(self.skip_batches - worker) // n_workers))
        pass_index = 0
        while True:
            for batch in self._one_pass(pass_index):
                if to_skip:
                    to_skip -= 1
                    continue
                yield batch
            if not self.infinite:
                return
            pass_index += 1


class ActivationDataModule(L.LightningDataModule):
    def __init__(self, shards: str | None = None, batch_size: int = 4096, buffer_tokens: int = 262_144,
                 val_shards: int = 1, val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 d_in: int | None = None, normalize: bool = True, skip_corrupt: bool = False,
                 lr_windows: int = 64, lr_batch_size: int = 16) -> None:
        """
        Args:
            shards: the shard-set directory (``data.shards=<dir>``); set by the pipeline when null.
            batch_size: activations per training batch (paper: 8,192).
            buffer_tokens: token-level shuffle buffer, in activations.
            val_shards: the last N shards of the manifest are held out for validation.
            d_in: expected activation width; null takes the manifest's (a mismatch is an error).
            normalize: scale activations so their mean norm is √d_in (the manifest's scale, or estimated).
            skip_corrupt: skip truncated or corrupt shards with a warning instead of failing.
            lr_windows: held-out token windows for loss recovered (when the manifest names a transformer).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.manifest: dict[str, Any] = {}
        self._resume_batches = 0
        self.scale = 1.0
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []

    @property
    def shards_dir(self) -> Path:
        if self.hparams.shards is None:
            raise ShardSetError("data.shards is not set: name a shard-set directory (data.shards=<dir>)")
        return Path(self.hparams.shards)

    @property
    def d_in(self) -> int:
        if not self.manifest:
            self.setup()
        return int(self.manifest["d_in"])

    def setup(self, stage: str | None = None) -> None:
        if self.manifest:
            return
        m = read_manifest(self.shards_dir, self.hparams.d_in)
        names = [s["name"] for s in m["shards"]]
        n_val = self.hparams.val_shards
        if len(names) <= n_val:
            raise ShardSetError(f"{self.shards_dir}: {len(names)} shards cannot give {n_val} held-out "
                                "validation shard(s) and at least one for training")
        urls = [str(self.shards_dir / n) for n in names]
        self.train_urls, self.val_urls = urls[: len(urls) - n_val], urls[len(urls) - n_val :]
        self.manifest = m
        if self.hparams.normalize:
            norm = m.get("normalization") or {}
            self.scale = float(norm["scale"]) if "scale" in norm else self._estimate_scale()
        log.info("shard set %s: %s tokens, d_in %d, %d train / %d val shards, scale %.4f", self.shards_dir,
                 f"{m['n_tokens']:,}", m["d_in"], len(self.train_urls), len(self.val_urls), self.scale)

    def _estimate_scale(self, n_tokens: int = 65_536) -> float:
        # every rank reads the same shards (no split by node), so all ranks normalise alike
        stream = self.stream("train", urls=self.train_urls[:4], batch_size=n_tokens, scale=1.0, shuffle=False,
                             infinite=False, drop_last=False, split_nodes=False)
        return norm_scale(next(iter(stream)))

    def stream(self, split: str, **overrides: Any) -> ActivationStream:
        train = split == "train"
        kw = dict(urls=self.train_urls if train else self.val_urls, d_in=self.d_in,
                  batch_size=self.hparams.batch_size if train else (self.hparams.val_batch_size
                                                                    or self.hparams.batch_size),
                  buffer_tokens=self.hparams.buffer_tokens, scale=self.scale, seed=self.hparams.seed,
                  shuffle=train, infinite=train, drop_last=train, skip_corrupt=self.hparams.skip_corrupt,
                  shard_tokens={str(self.shards_dir / s["name"]): int(s["n_tokens"])
                                for s in self.manifest["shards"]})
        kw.update(overrides)
        return ActivationStream(**kw)

    def _loader(self, ds: IterableDataset) -> DataLoader:
        # batches are formed in the stream (batch_size=None); workers each read their own shards
        return DataLoader(ds, batch_size=None, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.stream("train", skip_batches=self._resume_batches))

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: how many batches this rank's training stream has delivered (one per step)."""
        trainer = getattr(self, "trainer", None)
        return {"train_batches": int(trainer.global_step) if trainer is not None else self._resume_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored by Lightning before the dataloaders are built, so a resumed run continues the stream."""
        self._resume_batches = int(state_dict.get("train_batches", 0))

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        lr = self.lr_loader()
        return [self._loader(self.stream("val"))] + ([lr] if lr is not None else [])

    def lr_windows(self, n_windows: int | None = None) -> TokenWindows | None:
        """Held-out token windows (val split of the token store) for loss recovered, if the set came from text.

        ``n_windows`` overrides ``lr_windows`` (e.g. more windows for the final evaluation than during training).
        """
        store = self.manifest.get("token_store")
        n_ctx = self.manifest.get("n_ctx")
        n_windows = n_windows or self.hparams.lr_windows
        if not store or not n_ctx or not n_windows or not Path(store, "meta.json").is_file():
            return None
        val = load_split(store, "val")
        return TokenWindows(val, tiled_starts(len(val), int(n_ctx), n_windows), int(n_ctx) - 1)

    def lr_loader(self, n_windows: int | None = None) -> DataLoader | None:
        windows = self.lr_windows(n_windows)
        if windows is None:
            return None
        return DataLoader(windows, batch_size=self.hparams.lr_batch_size, shuffle=False)

    def sample_activations(self, n_tokens: int, seed: int) -> torch.Tensor:
        """``[n_tokens, d_in]`` normalised activations from the training shards, shuffled with ``seed``
        (used by neuron resampling); fewer if the shards hold fewer."""
        stream = self.stream("train", batch_size=min(n_tokens, 65_536), seed=seed, infinite=False,
                             drop_last=False)
        out, n = [], 0
        for x in stream:
            out.append(x)
            n += len(x)
            if n >= n_tokens:
                break
        return torch.cat(out)[:n_tokens]
