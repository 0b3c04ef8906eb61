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

import functools
import io
import logging
import os
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


class _PageDroppingFile(io.RawIOBase):
    """A shard opened for one sequential read that drops the pages it has read from the page cache.

    A shard set is read once per pass and, at scale, is far larger than RAM: cached pages would only evict
    more useful ones. On the 2-core dev VM, where each fresh page costs a fault to the host, recycling the
    same pages also makes reading ~6× cheaper in kernel time (0.10 vs 2.8 s per 1.7 GB)."""

    DROP_EVERY = 32 << 20

    def __init__(self, path: str) -> None:
        self.name = path
        self._fd = os.open(path, os.O_RDONLY)
        self._pos = self._dropped = 0
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = os.readv(self._fd, [b])
        self._pos += n
        if self._pos - self._dropped >= self.DROP_EVERY:
            os.posix_fadvise(self._fd, 0, self._pos, os.POSIX_FADV_DONTNEED)
            self._dropped = self._pos
        return n

    def close(self) -> None:
        if not self.closed:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self._fd)
        super().close()


def _open_shards(urls: Iterator[dict], handler, drop_page_cache: bool = True) -> Iterator[dict]:
    """webdataset's ``url_opener`` for local shards: a 1 MiB buffer (tarfile reads 10 KiB at a time) over a
    file that drops the pages it has read; each shard is closed once the next is asked for."""
    for sample in urls:
        url = sample["url"]
        try:
            raw = _PageDroppingFile(url) if drop_page_cache and hasattr(os, "posix_fadvise") else io.FileIO(url)
        except Exception as exn:
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break
        with io.BufferedReader(raw, buffer_size=1 << 20) as stream:
            yield {**sample, "stream": stream}


class _RowBuffer:
    """The token-level shuffle buffer: rows appended in place (no per-refill concatenation or permuted
    copy of the whole buffer: on the dev VM those fresh 134 MB allocations cost ~7 ms per 4,096-row
    batch), and the rows kept for the next round compacted into a second buffer that is then swapped in."""

    def __init__(self, capacity: int, d_in: int, dtype: np.dtype, with_ids: bool) -> None:
        tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
        self.acts, self._spare = (torch.empty(capacity, d_in, dtype=tdtype) for _ in range(2))
        self.ids = torch.empty(capacity, dtype=torch.int64) if with_ids else None
        self.n = 0

    def append(self, acts: np.ndarray, ctx_id: int) -> None:
        r = len(acts)
        if self.n + r > len(self.acts):  # a context longer than the first: grow (rare)
            grow = max(self.n + r, len(self.acts) * 3 // 2)
            self.acts = torch.cat([self.acts[: self.n], self.acts.new_empty(grow - self.n, self.acts.shape[1])])
            self._spare = torch.empty_like(self.acts)
            if self.ids is not None:
                self.ids = torch.cat([self.ids[: self.n], self.ids.new_empty(grow - self.n)])
        self.acts[self.n : self.n + r].numpy()[:] = acts
        if self.ids is not None:
            self.ids[self.n : self.n + r] = ctx_id
        self.n += r

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (in that order) at the front."""
        m = len(rows)
        torch.index_select(self.acts, 0, rows, out=self._spare[:m])
        self.acts, self._spare = self._spare, self.acts
        if self.ids is not None:
            self.ids[:m] = self.ids.index_select(0, rows)
        self.n = m


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
                 skip_batches: int = 0, drop_page_cache: bool = True) -> None:
        super().__init__()
        if not urls:
            raise ShardSetError("no shards to stream")
        self.urls, self.d_in, self.batch_size = list(urls), d_in, batch_size
        self.buffer_tokens = max(buffer_tokens, batch_size) if shuffle else batch_size
        self.scale, self.seed, self.shuffle, self.infinite = scale, seed, shuffle, infinite
        self.drop_last, self.skip_corrupt, self.with_ids = drop_last, skip_corrupt, with_ids
        self.shard_tokens, self.split_nodes = dict(shard_tokens or {}), split_nodes
        self.skip_batches = skip_batches  # batches of this rank's stream already trained on (resume)
        self.drop_page_cache = drop_page_cache
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
        # webdataset's ``tarfile_to_samples`` with our opener (wds.gopen for any url that is not a file)
        local = not any("://" in u or u.startswith("pipe:") for u in urls)
        opener = (functools.partial(_open_shards, handler=self._handler, drop_page_cache=self.drop_page_cache)
                  if local else functools.partial(wds.tariterators.url_opener, handler=self._handler))
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls), *([wds.split_by_node] if self.split_nodes else []), wds.split_by_worker,
            opener, functools.partial(wds.tariterators.tar_file_expander, handler=self._handler),
            functools.partial(wds.tariterators.group_by_keys, handler=self._handler),
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

    def _emit(self, buf: _RowBuffer, order: torch.Tensor) -> Iterator[Any]:
        """Batches of the buffer's rows in ``order`` (fresh float32 tensors, scaled)."""
        for b in range(0, len(order), self.batch_size):
            rows = order[b : b + self.batch_size]
            x = buf.acts.index_select(0, rows).float()  # a copy: the buffer is refilled while x is in use
            if self.scale != 1.0:
                x.mul_(self.scale)
            yield (x, buf.ids.index_select(0, rows)) if buf.ids is not None else x

    def _order(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """The order the buffer's ``n`` rows leave in: shuffled for training, as read otherwise."""
        return torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)

    def _one_pass(self, pass_index: int) -> Iterator[Any]:
        rank, world, worker, n_workers = wds.utils.pytorch_worker_info()
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed + pass_index).shuffle(urls)  # same order on every rank, then split
        if self.infinite and len(urls) < world * n_workers:
            raise ShardSetError(f"{len(urls)} training shards cannot feed {world} ranks × {n_workers} workers; "
                                "cache more shards (smaller contexts_per_shard) or use fewer workers")
        gen = torch.Generator().manual_seed(hash((self.seed, pass_index, rank, worker)) % 2**62)
        buf = None
        for acts, ctx_id in self._contexts(urls):
            if buf is None:  # allocated once per pass, in the shards' dtype (float16: half the memory)
                buf = _RowBuffer(self.buffer_tokens + len(acts), acts.shape[1], acts.dtype, self.with_ids)
            buf.append(acts, ctx_id)
            if buf.n >= self.buffer_tokens:
                order = self._order(buf.n, gen)
                # emit all but half a buffer, which stays to mix with the next contexts
                keep = self.buffer_tokens // 2 if self.shuffle else 0
                n_out = (buf.n - keep) // self.batch_size * self.batch_size
                yield from self._emit(buf, order[:n_out])
                buf.keep(order[n_out:])
        if buf is not None and buf.n:
            order = self._order(buf.n, gen)
            n_out = buf.n // self.batch_size * self.batch_size if self.drop_last else buf.n
            yield from self._emit(buf, order[:n_out])

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
                 lr_windows: int = 64, lr_batch_size: int = 16, drop_page_cache: bool = True) -> None:
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
            drop_page_cache: drop each shard's pages from the page cache as it is read (a shard set is read
                once per pass and at scale is far larger than RAM); false keeps a small, re-read set cached.
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
                  drop_page_cache=self.hparams.drop_page_cache,
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
