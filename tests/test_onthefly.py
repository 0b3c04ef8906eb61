"""On-the-fly activations (DESIGN §6): the same activations the cache writes, disjoint across ranks × workers,
seeded, and a position that resumes in O(1) — for the on-the-fly stream and the cached one alike."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.data.chunks import group_units
from monosemantic.data.contexts import block_positions, distinct_passes
from monosemantic.data.onthefly import OnTheFlyDataModule
from monosemantic.data.shards.format import decode_context, read_manifest

N_CTX, K, CPB, N_CONTEXTS = 32, 8, 16, 96  # the tiny_shards fixture's settings (seed 0)


def _otf(model_dir: Path, **kw) -> OnTheFlyDataModule:
    args = dict(model_dir=str(model_dir), n_contexts=N_CONTEXTS, tokens_per_context=K, contexts_per_block=CPB,
                batch_size=32, buffer_tokens=256, seed=0, lr_windows=0, device="cpu")
    dm = OnTheFlyDataModule(**{**args, **kw})
    dm.setup()
    return dm


def _cached_rows(shards: Path) -> dict[int, np.ndarray]:
    """Every row of the cache, keyed by context index · n_ctx + position."""
    out = {}
    urls = [str(shards / s["name"]) for s in read_manifest(shards)["shards"]]
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        d = decode_context(sample, 64)
        for row, pos in zip(d["acts"], d["positions"]):
            out[int(sample["__key__"]) * N_CTX + int(pos)] = row
    return out


def _rows(stream) -> tuple[list[int], np.ndarray]:
    ids, rows = [], []
    for x, i in stream:
        ids += i.tolist()
        rows.append(x.numpy())
    return ids, np.concatenate(rows)


def test_on_the_fly_pass_is_the_caches_activations(tiny_shards, transformer_export) -> None:
    cached = _cached_rows(tiny_shards)
    dm = _otf(transformer_export, normalize=True)
    # block 0 of the on-the-fly stream is the cache's shard 0: the same normalisation scale
    assert dm.scale == pytest.approx(read_manifest(tiny_shards)["normalization"]["scale"], rel=1e-5)
    ids, rows = _rows(dm.stream("train", with_ids=True, infinite=False, drop_last=False, scale=1.0))
    assert len(ids) == len(set(ids)) == N_CONTEXTS * K  # one pass, no activation twice
    assert set(ids) == set(cached)  # the same (context, position) pairs as the cache
    expected = np.stack([cached[i] for i in ids]).astype(np.float32)
    np.testing.assert_allclose(rows, expected, rtol=2e-3, atol=2e-3)  # float16 rounding of one forward
    assert np.abs(rows).max() > 0.1  # real activations, not zeros on both sides


def test_two_ranks_two_workers_get_disjoint_contexts(transformer_export, monkeypatch) -> None:
    dm = _otf(transformer_export)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = dm.stream("train", with_ids=True, infinite=False, drop_last=False)
        ids = []
        for _, i in DataLoader(stream, batch_size=None, num_workers=2):  # forked workers inherit RANK
            ids += i.tolist()
        seen[rank] = ids
    both = seen[0] + seen[1]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert len(both) == len(set(both)) == N_CONTEXTS * K  # every activation of the pass exactly once
    contexts = {r: {i // N_CTX for i in seen[r]} for r in (0, 1)}
    assert not contexts[0] & contexts[1]  # ranks hold disjoint contexts, not just disjoint rows
    # 6 blocks over 4 slots: the ranks get 3 blocks each
    assert sorted(len(c) for c in contexts.values()) == [3 * CPB, 3 * CPB]


def test_passes_take_new_positions_until_they_run_out(transformer_export) -> None:
    dm = _otf(transformer_export)
    stream = dm.stream("train", with_ids=True, drop_last=False)
    per_pass = N_CONTEXTS * K // 32
    ids = []
    for n, (_, i) in enumerate(stream):
        ids += i.tolist()
        if n + 1 == distinct_passes(N_CTX, K) * per_pass:
            break
    assert len(ids) == len(set(ids)) == N_CONTEXTS * N_CTX  # 4 passes: every position of every context once
    p0 = block_positions(3, CPB, N_CTX, K, seed=0)
    p1 = block_positions(3, CPB, N_CTX, K, seed=0, pass_index=1)
    assert all(not set(a) & set(b) for a, b in zip(p0, p1))  # each context's pass-1 positions are new
    # after the distinct passes a fresh draw starts (not pass 0 again)
    assert not np.array_equal(block_positions(3, CPB, N_CTX, K, 0, 4), p0)


def test_same_seed_same_stream_other_seed_other_stream(transformer_export) -> None:
    def first(seed: int) -> list[torch.Tensor]:
        s = _otf(transformer_export, seed=seed).stream("train")
        return [x for _, x in zip(range(5), s)]

    a, b, c = first(1), first(1), first(2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("source", ["on_the_fly", "cache"])
def test_resume_gives_the_remaining_stream_and_costs_one_chunk(source, tiny_shards, transformer_export) -> None:
    def make(skip: int):
        if source == "cache":
            dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, buffer_tokens=256, lr_windows=0, seed=3)
            dm.setup()
        else:
            dm = _otf(transformer_export, seed=3)
        return dm.stream("train", skip_batches=skip)

    full_stream = make(0)
    full = [x for _, x in zip(range(80), full_stream)]  # over 3 passes
    costs = {}
    for skip in (3, 61):  # early, and late (two passes on)
        stream = make(skip)
        got = [x for _, x in zip(range(10), stream)]
        for a, b in zip(full[skip : skip + 10], got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        costs[skip] = stream.units_loaded
    # the late resume read or generated no more units (shards / blocks) than the early one
    assert costs[61] == costs[3] <= 2 * max(len(u) for u, _ in make(0).plan(0))
    assert full_stream.units_loaded > costs[61]


def test_chunks_group_whole_units_of_at_least_the_buffer() -> None:
    assert group_units([4, 4, 4, 4, 4], 8) == [[0, 1], [2, 3], [4]]
    assert group_units([10, 1, 7], 8) == [[0], [1, 2]]
    assert group_units([], 8) == []


def test_validation_comes_from_held_out_documents(transformer_export) -> None:
    dm = _otf(transformer_export, val_tokens=64)
    ids, rows = _rows(dm.stream("val", with_ids=True, scale=1.0))
    assert len(ids) == 64 and len(set(ids)) == 64
    # each row is the transformer's activation at that position of a val.bin context (held-out documents)
    ctx = torch.from_numpy(np.stack([dm.val_tokens[dm.val_starts[i // N_CTX]:][:N_CTX] for i in ids]).astype(np.int64))
    with torch.no_grad():
        acts = dm.net.mlp_acts(ctx)
    expected = acts[torch.arange(len(ids)), torch.tensor([i % N_CTX for i in ids])].numpy()
    np.testing.assert_allclose(rows, expected, rtol=2e-3, atol=2e-3)
    ids2, rows2 = _rows(dm.stream("val", with_ids=True, scale=1.0))  # a fixed held-out set
    assert ids == ids2 and np.array_equal(rows, rows2)


@pytest.mark.parametrize("source", ["on_the_fly", "cache"])
def test_resumes_with_workers_give_the_uninterrupted_order_every_time(source, tiny_shards, transformer_export):
    """With 2 DataLoader workers, a run resumed at 5 and again at 12 (counts not divisible by 2) gets exactly
    the batches of the uninterrupted run, in its order."""
    def loader(skip: int):
        if source == "cache":
            dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, buffer_tokens=64, lr_windows=0, seed=3)
            dm.setup()
        else:
            dm = _otf(transformer_export, seed=3, buffer_tokens=128)
        return DataLoader(dm.stream("train", skip_batches=skip), batch_size=None, num_workers=2)

    def take(skip: int, n: int) -> list[torch.Tensor]:
        return [x for _, x in zip(range(n), loader(skip))]

    full = take(0, 30)
    resumed = take(0, 5) + take(5, 7) + take(12, 18)
    assert len(resumed) == 30
    for i, (a, b) in enumerate(zip(full, resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"batch {i}")


def test_a_resume_with_other_slots_warns(caplog) -> None:
    from monosemantic.data.chunks import check_slots_unchanged

    class Trainer:
        world_size = 2

    check_slots_unchanged(2, Trainer(), 1)
    assert "stream slots" not in caplog.text
    check_slots_unchanged(2, Trainer(), 4)
    assert "resuming with 8 stream slots" in caplog.text and "had 2" in caplog.text


def test_bad_settings_are_named(transformer_export) -> None:
    with pytest.raises(ValueError, match="data.model_dir is not set"):
        OnTheFlyDataModule().setup()
    with pytest.raises(ValueError, match="tokens_per_context=64 must be"):
        _otf(transformer_export, tokens_per_context=64)
    with pytest.raises(ValueError, match="n_contexts=100,000 but the token split holds only"):
        _otf(transformer_export, n_contexts=100_000)
    with pytest.raises(ValueError, match="d_in=512 but the transformer"):
        _otf(transformer_export, d_in=512)


def test_workers_split_batches_round_robin_on_resume(transformer_export) -> None:
    dm = _otf(transformer_export, num_workers=2)
    loader = DataLoader(dm.stream("train", with_ids=True), batch_size=None, num_workers=2)
    counts = Counter()
    for n, (_, ids) in enumerate(loader):
        counts.update(ids.tolist())
        if n == 23:  # one pass: 768 rows in 24 batches
            break
    assert max(counts.values()) == 1 and len(counts) == N_CONTEXTS * K
