"""Chunked, token-level shuffling with a position that is a pure function of the batches delivered.

Both activation sources (the shard cache and the on-the-fly transformer) are streams of *units* whose row
counts are known before they are read: a shard (its rows are in the manifest) or a block of contexts
(contexts × tokens per context). Each pass, every stream slot (rank × DataLoader worker) takes its own units
(slot ``s`` of ``S`` takes units ``s, s+S, …`` of the pass's seeded order, with the ranks
interleaved so each gets its share ±1; slots never share a unit), groups
them into *chunks* of at least ``buffer_rows`` rows, and for each chunk loads all its rows into one buffer,
permutes them with a generator seeded by (seed, pass, slot, chunk) and emits whole batches.

Because no row is carried from one chunk to the next, where batch ``n`` of a slot comes from is arithmetic
on the row counts: resuming after ``n`` batches skips whole chunks without reading them and loads only the
chunk batch ``n`` is in (:meth:`ChunkedStream.position`). A resume at step 10⁶ costs what one at step 10
does — one buffer's load — and gives exactly the batches the uninterrupted run would have. The price: a
training chunk whose rows are not a multiple of the batch drops its remainder (fewer than one batch per
chunk; none at the shipped sizes, whose chunks hold whole batches), and a batch mixes only the contexts of
its chunk (a chunk of ``buffer_rows`` activations holds ``buffer_rows / tokens_per_context`` contexts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from monosemantic.errors import ConfigError

log = logging.getLogger(__name__)

# saved with the batch count in a datamodule's checkpoint state: the stream layout that count refers to
# ("chunked-v2": this module; before it, a carry-over buffer that a resume replayed from the start)
STREAM_STATE = "chunked-v2"


def stream_batches(trainer) -> int:
    """The training stream's index of the batch being trained on (one batch per micro-step): optimizer steps ×
    gradient accumulation. A batch ``model.nonfinite=skip`` drops counts as a step too (Lightning advances the
    step and the schedule; no parameter moves), so the checkpointed position stays right."""
    return int(trainer.global_step) * int(trainer.accumulate_grad_batches)


def stream_state(trainer, resume_batches: int, num_workers: int) -> dict:
    """A datamodule's checkpoint state: the batches this rank has trained on, the stream layout, and how many
    stream slots (ranks × DataLoader workers) split the units: the position means the same only for as many."""
    world = int(trainer.world_size) if trainer is not None else 1
    return {"train_batches": stream_batches(trainer) if trainer is not None else resume_batches,
            "stream": STREAM_STATE, "slots": world * max(1, num_workers)}


def check_slots_unchanged(saved: int | None, trainer, num_workers: int) -> None:
    """Warn when a run resumes with another number of ranks × workers than it was checkpointed with: the units
    are split another way, so the remaining stream is not the one the run would have seen."""
    now = (int(trainer.world_size) if trainer is not None else 1) * max(1, num_workers)
    if saved is not None and int(saved) != now:
        log.warning("resuming with %d stream slots (ranks × data.num_workers) where the checkpoint had %d: the "
                    "shards or blocks are split another way, so within this pass some activations may come twice "
                    "and others not at all; resume with the original devices and data.num_workers for the exact "
                    "stream", now, int(saved))


def check_stream_state(state: dict) -> int:
    """The batches already delivered, from a datamodule's checkpoint state; a checkpoint of the older stream
    layout resumes at the same count with a warning (its remaining batches are not the ones it would have
    seen: within the pass some activations may come twice)."""
    if state.get("stream", "replay-v1") != STREAM_STATE:
        log.warning("the checkpoint's data position was saved by the %s stream, this code reads %s: resuming "
                    "at the same batch count, but not with the exact batches the old run would have trained on",
                    state.get("stream", "replay-v1"), STREAM_STATE)
    return int(state.get("train_batches", 0))


def stream_slot(split_nodes: bool = True) -> tuple[int, int, int, int]:
    """(rank, world, worker, workers) of the calling process (``split_nodes=False``: as if rank 0 of 1)."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return (rank, world, worker, workers) if split_nodes else (0, 1, worker, workers)


def group_units(rows: list[int], buffer_rows: int) -> list[list[int]]:
    """Consecutive unit indices grouped into chunks of at least ``buffer_rows`` rows (the last may hold fewer)."""
    chunks, cur, n = [], [], 0
    for i, r in enumerate(rows):
        cur.append(i)
        n += r
        if n >= buffer_rows:
            chunks.append(cur)
            cur, n = [], 0
    if cur:
        chunks.append(cur)
    return chunks


class RowBuffer:
    """One chunk's rows, appended in place into memory allocated once (fresh 100 MB+ allocations cost the dev
    VM ~7 ms per 4,096-row batch in page faults), on the CPU or on the device that produced them."""

    def __init__(self, capacity: int, d_in: int, dtype: torch.dtype, with_ids: bool,
                 device: str | torch.device = "cpu") -> None:
        self.acts = torch.empty(capacity, d_in, dtype=dtype, device=device)
        self.ids = torch.empty(capacity, dtype=torch.int64, device=device) if with_ids else None
        self.n, self.device = 0, str(device)

    def append(self, acts: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor | int | None = None) -> None:
        r = len(acts)
        if self.n + r > len(self.acts):  # a unit longer than planned (a context of another length): grow
            grow = max(self.n + r, len(self.acts) * 3 // 2)
            self.acts = torch.cat([self.acts[: self.n], self.acts.new_empty(grow - self.n, self.acts.shape[1])])
            if self.ids is not None:
                self.ids = torch.cat([self.ids[: self.n], self.ids.new_empty(grow - self.n)])
        dst = self.acts[self.n : self.n + r]
        if isinstance(acts, np.ndarray) and dst.device.type == "cpu":
            dst.numpy()[:] = acts  # no torch dispatch for a plain host copy (float16 → float16)
        else:
            dst.copy_(torch.as_tensor(acts))
        if self.ids is not None:
            self.ids[self.n : self.n + r] = torch.as_tensor(ids) if not isinstance(ids, int) else ids
        self.n += r


class ChunkedStream(IterableDataset):
    """Batches of a stream of units, chunk by chunk (see the module docstring). Subclasses give the units of a
    pass (:meth:`units`, ``(unit, rows)`` in the pass's order, before slots take their share) and load a
    chunk's units into a :class:`RowBuffer` (:meth:`load`)."""

    def __init__(self, batch_size: int, buffer_rows: int, scale: float = 1.0, seed: int = 0, shuffle: bool = True,
                 infinite: bool = False, drop_last: bool = True, with_ids: bool = False, split_nodes: bool = True,
                 skip_batches: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.buffer_rows = max(buffer_rows, batch_size)
        self.scale, self.seed, self.shuffle, self.infinite = scale, seed, shuffle, infinite
        self.drop_last, self.with_ids, self.split_nodes = drop_last, with_ids, split_nodes
        self.skip_batches = skip_batches  # batches of this rank's stream already trained on (resume)
        self.units_loaded = 0  # units read or generated by this process (resume cost, for tests and logs)
        self._buf: RowBuffer | None = None

    def row_buffer(self, capacity: int, d_in: int, dtype: torch.dtype, device: str | torch.device = "cpu"
                   ) -> RowBuffer:
        """An empty buffer for the next chunk: the last one again when it fits (its batches are copies)."""
        b = self._buf
        if (b is None or len(b.acts) < capacity or b.acts.shape[1] != d_in or b.acts.dtype != dtype
                or b.device != str(device)):
            self._buf = b = None  # freed before the new one is allocated
            b = self._buf = RowBuffer(capacity, d_in, dtype, self.with_ids, device)
        b.n = 0
        return b

    # -- what a subclass provides -----------------------------------------------------------------------
    def units(self, pass_index: int) -> list[tuple[Any, int]]:
        raise NotImplementedError

    def load(self, units: list[Any], pass_index: int) -> RowBuffer | None:
        """All rows of ``units`` in one buffer (None: nothing could be read)."""
        raise NotImplementedError

    def check_slots(self, n_units: int, n_slots: int) -> None:
        """Raise when an endless stream has fewer units than slots (a slot would get nothing)."""

    # -- the plan -----------------------------------------------------------------------------------------
    def role(self) -> tuple[int, int]:
        """(this worker's role, DataLoader workers). A DataLoader takes batches from its workers in turn,
        starting with worker 0, so role ``r`` of ``k`` owns the rank's batches ``r, r+k, …``. A stream resumed
        after ``n`` batches starts at batch ``n``, which the uninterrupted run took from role ``n % k``: worker
        ``w`` plays role ``(w + n) % k``, and the resumed batches come in exactly the uninterrupted order, however
        many times the run is resumed."""
        _, _, worker, workers = stream_slot(self.split_nodes)
        return (worker + self.skip_batches) % workers, workers

    def _slot(self) -> tuple[int, int, int]:
        """(this slot, slots, DataLoader workers)."""
        rank, world, _, _ = stream_slot(self.split_nodes)
        role, workers = self.role()
        # role-major: the ranks take turns unit by unit, so they get as many units as each other ±1
        return role * world + rank, world * workers, workers

    def plan(self, pass_index: int) -> list[tuple[list[Any], int]]:
        """This slot's chunks in a pass: (units, batches it emits)."""
        slot, n_slots, _ = self._slot()
        units = self.units(pass_index)
        if self.infinite:
            self.check_slots(len(units), n_slots)
        mine = units[slot::n_slots]
        out = []
        for chunk in group_units([r for _, r in mine], self.buffer_rows):
            rows = sum(mine[i][1] for i in chunk)
            n = rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
            out.append(([mine[i][0] for i in chunk], n))
        return out

    def position(self, batches: int) -> tuple[int, int, int]:
        """(pass, chunk, batch within it) of this slot's batch number ``batches``: arithmetic on the plan,
        nothing is read."""
        pass_index, empty = 0, 0
        while True:
            counts = [n for _, n in self.plan(pass_index)]
            total = sum(counts)
            if batches < total or not self.infinite:
                for c, n in enumerate(counts):
                    if batches < n:
                        return pass_index, c, batches
                    batches -= n
                return pass_index, len(counts), 0  # past the end of a finite stream
            empty = empty + 1 if total == 0 else 0  # a slot may draw no unit in one pass, not in every pass
            if empty > 64:
                raise ConfigError("this stream slot gets no whole batch pass after pass: fewer rows per slot than "
                                 "batch_size (fewer ranks × workers, or a smaller batch)")
            batches -= total
            pass_index += 1

    # -- emitting -----------------------------------------------------------------------------------------
    def _order(self, n: int, pass_index: int, chunk: int, device: torch.device) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(n, device=device)
        slot, n_slots, _ = self._slot()
        gen = torch.Generator().manual_seed(hash((self.seed, pass_index, slot, n_slots, chunk)) % 2**62)
        return torch.randperm(n, generator=gen).to(device)

    def _emit(self, buf: RowBuffer, order: torch.Tensor, first: int) -> Iterator[Any]:
        n_out = len(order) // self.batch_size * self.batch_size if self.drop_last else len(order)
        for b in range(first * self.batch_size, n_out, self.batch_size):
            rows = order[b : b + self.batch_size]
            x = buf.acts.index_select(0, rows).float()  # a copy: the buffer is refilled while x is in use
            if self.scale != 1.0:
                x.mul_(self.scale)
            yield (x, buf.ids.index_select(0, rows)) if buf.ids is not None else x

    def __iter__(self) -> Iterator[Any]:
        role, workers = self.role()
        skip = max(0, -(-(self.skip_batches - role) // workers))  # this role's batches before skip_batches
        pass_index, chunk0, first = self.position(skip)
        while True:
            for c, (units, _) in enumerate(self.plan(pass_index)):
                if c < chunk0:
                    continue
                buf = None  # the last chunk's buffer may be freed before a bigger one is allocated
                buf = self.load(units, pass_index)
                self.units_loaded += len(units)
                if buf is not None and buf.n:
                    yield from self._emit(buf, self._order(buf.n, pass_index, c, buf.acts.device), first)
                first = 0
            if not self.infinite:
                return
            pass_index, chunk0 = pass_index + 1, 0
