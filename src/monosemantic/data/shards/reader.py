"""Reading a shard set: a webdataset stream of activation batches, shuffled at the token level.

- Shards are split by node and by DataLoader worker (``wds.split_by_node`` / ``wds.split_by_worker``),
  so in one pass every token is read exactly once across ranks × workers.
- A shuffle buffer measured in *tokens* mixes rows from many contexts before batching (paper: "shuffled
  across contexts"); a batch of 4,096 from a 262,144-token buffer draws from hundreds of contexts.
- Local shards are read through a 1 MiB buffer and dropped from the page cache as they are read
  (:mod:`.pagecache`); any other url goes through webdataset's own opener (``pipe:``, HTTP, object stores).
- A damaged shard stops the stream with a :class:`ShardSetError` naming it, or with ``skip_corrupt`` is
  skipped: logged (``logging``, so ``extras.ignore_warnings`` cannot hide it) and recorded in a
  :class:`SkippedShards` shared with the DataLoader's workers, which the training run writes to
  ``metrics.json``.
"""

from __future__ import annotations

import functools
import io
import logging
import multiprocessing
import os
import random
import re
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from monosemantic.data.shards import pagecache
from monosemantic.data.shards.format import ShardSetError, decode_context

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
        pagecache.sequential(self._fd)  # a larger read-ahead

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = os.readv(self._fd, [b])
        self._pos += n
        if self._pos - self._dropped >= self.DROP_EVERY:
            pagecache.drop(self._fd, 0, self._pos)
            self._dropped = self._pos
        return n

    def close(self) -> None:
        if not self.closed:
            pagecache.drop(self._fd)
            os.close(self._fd)
        super().close()


def _open_shards(urls: Iterator[dict], handler, drop_page_cache: bool = True) -> Iterator[dict]:
    """webdataset's ``url_opener`` for local shards: a 1 MiB buffer (tarfile reads 10 KiB at a time) over a
    file that drops the pages it has read; each shard is closed once the next is asked for."""
    for sample in urls:
        url = sample["url"]
        try:
            raw = _PageDroppingFile(url) if drop_page_cache and pagecache.HAS_FADVISE else io.FileIO(url)
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


class SkippedShards:
    """Which shards of a set were skipped as damaged, by any stream over the set, in any DataLoader worker:
    one shared flag per shard (a damaged shard counts once, however often it is read) and a count of the
    skips webdataset could not attribute to a shard. Shared memory, inherited by forked workers and handed
    to spawned ones when they start."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        self._index = {u: i for i, u in enumerate(self.urls)}
        self.flags = multiprocessing.Array("b", max(1, len(self.urls)))
        self.unattributed = multiprocessing.Value("q", 0)

    def add(self, url: str | None) -> None:
        i = self._index.get(url) if url is not None else None
        if i is None:
            with self.unattributed.get_lock():
                self.unattributed.value += 1
        else:
            self.flags[i] = 1

    def names(self) -> list[str]:
        return [os.path.basename(u) for u, f in zip(self.urls, self.flags[: len(self.urls)]) if f]

    def count(self) -> int:
        return len(self.names()) + int(self.unattributed.value)

    def as_tensor(self) -> torch.Tensor:
        """``[n_shards + 1]`` int64: the flags, then the unattributed count (to sum across ranks)."""
        return torch.tensor([*self.flags[: len(self.urls)], self.unattributed.value], dtype=torch.int64)


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
                 skip_batches: int = 0, drop_page_cache: bool = True,
                 skipped: SkippedShards | None = None) -> None:
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
        # shared with the DataLoader's workers (they run copies of this stream) and the datamodule's other
        # streams, so the process that trains can report which shards were skipped
        self.skipped = skipped if skipped is not None else SkippedShards(self.urls)
        self._reported: set[str] = set()  # shards already reported this pass (one problem, one count)

    def _handler(self, exn: Exception, url: str | None = None) -> bool:
        where = url or _shard_in(exn)
        msg = str(exn) if isinstance(exn, ShardSetError) else (
            f"shard {where or '?'} is truncated or corrupt: {exn.args[0] if exn.args else exn!r}")
        if self.skip_corrupt:
            if where is None or where not in self._reported:  # one damaged shard counts once per pass
                self.skipped.add(where)
                log.warning("skipping: %s (skipped so far: %d)", msg, self.n_skipped)
            if where is not None:
                self._reported.add(where)
            return True
        raise ShardSetError(msg) from exn

    @property
    def n_skipped(self) -> int:
        """Damaged shards skipped so far (each counted once) by any stream sharing ``skipped``."""
        return self.skipped.count()

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
