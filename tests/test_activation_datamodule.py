"""Streaming activation shards (DESIGN §4, §6, §8): token-level shuffling, every token read exactly once
across ranks × workers, determinism, foreign (synthetic) shard sets, and one clear error per bad input.

``tiny_shards`` holds 96 contexts × 8 tokens in 6 shards of 16 contexts; with the default
``val_shards=1`` the first 5 shards (contexts 0…79, 640 rows) are the training split.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import tarfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.data.shards.format import FORMAT, ShardSetError, shard_name
from monosemantic.data.shards.reader import ActivationStream

TPC, D_MLP, N_TRAIN_CTX = 8, 64, 80


def train_rows_by_context(shards_dir: Path, n_shards: int = 5) -> dict[int, np.ndarray]:
    """Raw rows of the training shards read with tarfile: ``{context id: acts [8, d_in] float16}``."""
    out = {}
    for i in range(n_shards):
        with tarfile.open(shards_dir / shard_name(i)) as tar:
            for m in tar:
                if m.name.endswith(".acts.npy"):
                    out[int(m.name.split(".")[0])] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return out


def sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_synthetic_set(out: Path, d_in: int = 24, n_shards: int = 4, contexts_per_shard: int = 8,
                        rows: int = 32, nan_at: tuple[int, int] | None = None) -> list[np.ndarray]:
    """A shard set from outside the project: ``acts.npy`` only, non-numeric keys, no normalisation,
    no model, no tokenizer (DESIGN §4). Rows are lognormal-scaled so their norms vary. Returns each
    shard's rows, in order."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards, per_shard = [], []
    for i in range(n_shards):
        acts = []
        with wds.TarWriter(str(out / shard_name(i))) as sink:
            for c in range(contexts_per_shard):
                norms = 37.0 * rng.lognormal(sigma=0.25, size=(rows, 1))
                a = (rng.standard_normal((rows, d_in)) * norms).astype(np.float32)
                if nan_at == (i, c):
                    a[3, 5] = np.nan
                sink.write({"__key__": f"s{i}-c{c}", "acts.npy": npy(a)})
                acts.append(a)
        per_shard.append(np.concatenate(acts))
        shards.append({"name": shard_name(i), "n_tokens": contexts_per_shard * rows})
    manifest = {"format": FORMAT, "version": 1, "d_in": d_in, "dtype": "float32", "hook": "synthetic",
                "n_tokens": n_shards * contexts_per_shard * rows, "tokens_per_context": rows,
                "shards": shards, "model": None, "tokenizer": None}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return per_shard


# ---- shuffling, splitting, determinism ---------------------------------------------------------------

def distinct_contexts_per_batch(dm: ActivationDataModule, **overrides) -> list[int]:
    stream = dm.stream("train", with_ids=True, infinite=False, **overrides)
    return [len(ids.unique()) for _, ids in stream]


def test_token_level_shuffle_draws_each_batch_from_many_contexts(tiny_shards: Path) -> None:
    """Measure: distinct context ids in a batch of 32 rows (8 rows per context).

    Unshuffled, a batch is 32/8 = 4 whole contexts. Shuffled with a 320-row (40-context) buffer, a batch
    is close to a random draw of 32 of ~320 rows, which hits 40·(1 − (1 − 32/320)^8) ≈ 23 contexts on
    average; we require every batch to reach 12 (3× the unshuffled span) and the mean to exceed 18.
    """
    dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, buffer_tokens=320)
    dm.setup()
    unshuffled = distinct_contexts_per_batch(dm, shuffle=False)
    shuffled = distinct_contexts_per_batch(dm)
    assert unshuffled == [32 // TPC] * 20  # 640 rows, 20 batches, each exactly 4 contexts
    assert len(shuffled) == 20
    assert min(shuffled) >= 12 and np.mean(shuffled) > 18, shuffled


def test_two_ranks_two_workers_read_every_token_exactly_once(tiny_shards: Path, monkeypatch) -> None:
    dm = ActivationDataModule(shards=str(tiny_shards), batch_size=16, buffer_tokens=64)
    dm.setup()
    expected = train_rows_by_context(tiny_shards)
    seen: dict[int, dict[int, list[np.ndarray]]] = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = dm.stream("train", with_ids=True, infinite=False, drop_last=False, shuffle=True, scale=1.0)
        rows = defaultdict(list)
        # forked workers inherit RANK/WORLD_SIZE; each reads its own share of this rank's shards
        for acts, ids in DataLoader(stream, batch_size=None, num_workers=2):
            for row, c in zip(acts.numpy(), ids.tolist()):
                rows[c].append(row)
        seen[rank] = rows

    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])  # ranks are disjoint
    union = {**seen[0], **seen[1]}
    assert sorted(union) == sorted(expected) == list(range(N_TRAIN_CTX))  # no train context missed
    for c, rows in union.items():  # each row of each context exactly once (as a multiset)
        np.testing.assert_array_equal(sorted_rows(np.stack(rows)), sorted_rows(expected[c].astype(np.float32)),
                                      err_msg=f"context {c}")
    # shards, not rows, are split: rank 0 reads 3 of the 5 shuffled shards, rank 1 the other 2
    assert sorted(len(seen[r]) for r in (0, 1)) == [2 * 16, 3 * 16]


def test_same_seed_same_batches_other_seed_other_order(tiny_shards: Path) -> None:
    def first_batches(seed: int, n: int = 30) -> list[torch.Tensor]:  # 20 batches per pass: spans 2 passes
        dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, buffer_tokens=128, seed=seed)
        dm.setup()
        return [ids for _, ids in itertools.islice(dm.stream("train", with_ids=True), n)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # both orders are of the same rows: one pass reads each training row once
    assert Counter(torch.cat(a[:20]).tolist()) == Counter(torch.cat(c[:20]).tolist()) == {
        i: TPC for i in range(N_TRAIN_CTX)}
    assert not torch.equal(torch.cat(a[:10]), torch.cat(a[20:30]))  # a new pass, a new order


def test_batches_are_normalised_float32(tiny_shards: Path) -> None:
    dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, buffer_tokens=128)
    dm.setup()
    scale = dm.manifest["normalization"]["scale"]
    assert dm.scale == scale
    x = next(iter(dm.train_dataloader()))
    assert x.shape == (32, D_MLP) and x.dtype == torch.float32
    raw = np.concatenate(list(train_rows_by_context(tiny_shards).values())).astype(np.float32)
    # every batch row is some raw training row times the manifest's scale
    raw_scaled = {tuple(r) for r in (torch.from_numpy(raw) * scale).numpy()}
    assert all(tuple(r) in raw_scaled for r in x.numpy())


# ---- sample_activations ------------------------------------------------------------------------------

def test_sample_activations_returns_n_normalised_rows(tiny_shards: Path) -> None:
    dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, buffer_tokens=128)
    dm.setup()
    x = dm.sample_activations(200, seed=3)
    assert x.shape == (200, D_MLP) and x.dtype == torch.float32
    # the manifest's scale was fitted on shard 0 alone; over other training rows it holds within 10%
    assert x.norm(dim=1).mean().item() == pytest.approx(math.sqrt(D_MLP), rel=0.10)
    assert torch.equal(x, dm.sample_activations(200, seed=3))
    assert not torch.equal(x, dm.sample_activations(200, seed=4))

    everything = dm.sample_activations(10_000, seed=3)  # more than the training split holds
    raw = np.concatenate(list(train_rows_by_context(tiny_shards).values()))
    expected = (torch.from_numpy(raw).float() * dm.scale).numpy()
    np.testing.assert_array_equal(sorted_rows(everything.numpy()), sorted_rows(expected))


# ---- a shard set from outside the project ------------------------------------------------------------

def test_synthetic_shard_set_without_tokens_loads_and_batches(tmp_path: Path) -> None:
    rows = write_synthetic_set(tmp_path / "synthetic", d_in=24)
    dm = ActivationDataModule(shards=str(tmp_path / "synthetic"), batch_size=32, buffer_tokens=128)
    dm.setup()
    assert dm.d_in == 24 and "normalization" not in dm.manifest
    assert dm.lr_windows() is None
    # the scale is estimated from the training rows so their mean norm is √d_in …
    train = torch.from_numpy(np.concatenate(rows[:3]))
    assert dm.scale == pytest.approx(math.sqrt(24) / train.norm(dim=1).mean().item(), rel=1e-5)
    # … and it carries over to the held-out shard within a few percent
    val_batches = list(dm.val_dataloader()[0])
    val = torch.cat(val_batches)
    assert len(dm.val_dataloader()) == 1  # no transformer: no loss-recovered windows
    torch.testing.assert_close(val, torch.from_numpy(rows[3]) * dm.scale)  # in order, every row once
    assert val.norm(dim=1).mean().item() == pytest.approx(math.sqrt(24), rel=0.05)

    batches = list(itertools.islice(iter(dm.train_dataloader()), 25))  # 24 per pass: into the second
    assert all(b.shape == (32, 24) and b.dtype == torch.float32 and torch.isfinite(b).all() for b in batches)
    assert torch.cat(batches[:24]).norm(dim=1).mean().item() == pytest.approx(math.sqrt(24), rel=1e-4)


def test_estimated_scale_is_the_same_on_every_rank(tmp_path: Path, monkeypatch) -> None:
    """Under DDP each rank runs ``setup``; ranks must normalise alike, and ranks beyond the shards
    read for the estimate must not fail."""
    write_synthetic_set(tmp_path / "synthetic", n_shards=6)
    scales = []
    for rank, world in [(0, 1), (0, 2), (1, 2), (5, 8)]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        dm = ActivationDataModule(shards=str(tmp_path / "synthetic"))
        dm.setup()
        scales.append(dm.scale)
    assert scales == [scales[0]] * 4


# ---- one clear error per bad input -------------------------------------------------------------------

def test_missing_manifest(tiny_shards: Path, tmp_path: Path) -> None:
    d = copy_set(tiny_shards, tmp_path / "set")
    (d / "manifest.json").unlink()
    with pytest.raises(ShardSetError, match="has no manifest.json") as e:
        ActivationDataModule(shards=str(d)).setup()
    assert str(d) in str(e.value)


def test_d_in_differs_from_the_models(tiny_shards: Path) -> None:
    with pytest.raises(ShardSetError, match=r"d_in=64 but the model expects d_in=512") as e:
        ActivationDataModule(shards=str(tiny_shards), d_in=512).setup()
    assert str(tiny_shards / "manifest.json") in str(e.value)


def test_unknown_format_version(tiny_shards: Path, tmp_path: Path) -> None:
    d = copy_set(tiny_shards, tmp_path / "set")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "version": 7}))
    with pytest.raises(ShardSetError, match=r"format version 7 is unknown") as e:
        ActivationDataModule(shards=str(d)).setup()
    assert str(d / "manifest.json") in str(e.value)


def test_shard_listed_but_missing(tiny_shards: Path, tmp_path: Path) -> None:
    d = copy_set(tiny_shards, tmp_path / "set")
    (d / shard_name(3)).unlink()
    with pytest.raises(ShardSetError, match=r"missing: \['shard-000003.tar'\]") as e:
        ActivationDataModule(shards=str(d)).setup()
    assert str(d) in str(e.value)


# Cut points in the 153,600-byte shard: the exact half falls on a tar header boundary (tar works in
# 512-byte blocks), where Python's tarfile sees a clean end of archive; the others cut inside a header
# and inside an array.
@pytest.mark.parametrize("cut", ["half", "mid_header", "mid_data"])
def test_truncated_shard_is_named_or_skipped_and_counted(tiny_shards: Path, tmp_path: Path, cut: str, caplog) -> None:
    d = copy_set(tiny_shards, tmp_path / "set")
    bad = d / shard_name(1)
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.truncate({"half": size // 2, "mid_header": size // 2 + 700, "mid_data": size // 2 + 2000}[cut])

    dm = ActivationDataModule(shards=str(d), batch_size=32, buffer_tokens=128)
    dm.setup()
    with pytest.raises(ShardSetError, match="shard-000001.tar"):
        list(dm.stream("train", infinite=False, shuffle=False))

    dm = ActivationDataModule(shards=str(d), batch_size=32, buffer_tokens=128, skip_corrupt=True)
    dm.setup()
    stream = dm.stream("train", infinite=False, shuffle=False, with_ids=True, drop_last=False)
    # warnings ignored, as extras.ignore_warnings does: the skip must still be reported
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="monosemantic.data.shards.reader"):
        warnings.simplefilter("ignore")
        ids = Counter(torch.cat([i for _, i in stream]).tolist())
    assert [r for r in caplog.records if re.search(r"skipping: .*shard-000001.tar", r.getMessage())]
    assert stream.n_skipped == 1 and dm.n_skipped == 1
    intact = [c for c in range(N_TRAIN_CTX) if not 16 <= c < 32]  # contexts of shards 0, 2, 3, 4
    assert all(ids[c] == TPC for c in intact)
    assert sum(ids[c] for c in range(16, 32)) < 16 * TPC  # the damaged shard gave less than a whole one


def test_skipped_shards_are_counted_across_dataloader_workers(tiny_shards: Path, tmp_path: Path) -> None:
    """Workers read copies of the stream: the datamodule's count still sees every skip (it goes to metrics.json)."""
    d = copy_set(tiny_shards, tmp_path / "set")
    for i in (0, 2):
        with open(d / shard_name(i), "r+b") as f:
            f.truncate(f.seek(0, 2) // 2 + 700)
    dm = ActivationDataModule(shards=str(d), batch_size=32, buffer_tokens=128, skip_corrupt=True, num_workers=2)
    dm.setup()
    loader = torch.utils.data.DataLoader(dm.stream("train", infinite=False, drop_last=False), batch_size=None,
                                         num_workers=2)
    n_rows = sum(len(x) for x in loader)
    assert dm.n_skipped == 2 and dm.skipped.names() == [shard_name(0), shard_name(2)]
    assert n_rows < N_TRAIN_CTX * TPC
    sum(len(x) for x in loader)  # a second pass reads them again: still two damaged shards
    assert dm.n_skipped == 2


def test_nan_activations_name_the_shard_and_sample(tmp_path: Path) -> None:
    write_synthetic_set(tmp_path / "synthetic", nan_at=(1, 3))
    dm = ActivationDataModule(shards=str(tmp_path / "synthetic"), batch_size=32, normalize=False)
    dm.setup()
    with pytest.raises(ShardSetError, match=r"shard-000001.tar sample s1-c3: acts contain NaN"):
        list(dm.stream("train", infinite=False))


def test_contexts_of_any_length_stream_exactly_once(tmp_path: Path) -> None:
    """The shuffle buffer is sized from the first context and grows when a longer one arrives."""
    rng = np.random.default_rng(0)
    lengths = [2, 5, 300, 1, 77, 513, 9, 40]  # the first is the shortest but one
    urls, everything = [], []
    for s in range(2):
        url = tmp_path / shard_name(s)
        with wds.TarWriter(str(url)) as sink:
            for j, n in enumerate(lengths):
                acts = rng.standard_normal((n, 6)).astype(np.float16)
                sink.write({"__key__": f"{s}-{j}", "acts.npy": acts})
                everything.append(acts)
        urls.append(str(url))
    stream = ActivationStream(urls, d_in=6, batch_size=16, buffer_tokens=64, shuffle=True, infinite=False,
                              drop_last=False)
    got = torch.cat(list(stream)).numpy()
    expected = np.concatenate(everything).astype(np.float32)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(expected))


def test_streaming_leaves_the_shards_out_of_the_page_cache(tiny_shards: Path, tmp_path: Path,
                                                          resident_bytes) -> None:
    """A pass reads each shard once and drops its pages (a shard set at scale is far larger than RAM)."""
    shards = copy_set(tiny_shards, tmp_path / "set")  # copying leaves them cached …
    os.sync()  # … and written back (dirty pages cannot be dropped, only clean ones)
    urls = [str(shards / shard_name(i)) for i in range(5)]

    def resident() -> int:
        return sum(resident_bytes(u) for u in urls)

    size = sum(Path(u).stat().st_size for u in urls)
    assert resident() > 0.9 * size
    rows = sum(len(b) for b in ActivationStream(urls, d_in=D_MLP, batch_size=32, buffer_tokens=128,
                                                infinite=False, drop_last=False))
    assert rows == N_TRAIN_CTX * TPC
    assert resident() == 0
    kept = ActivationStream(urls, d_in=D_MLP, batch_size=32, infinite=False, drop_page_cache=False)
    sum(len(b) for b in kept)
    assert resident() > 0.9 * size  # the option keeps them


@pytest.mark.parametrize("arr", [np.arange(12, dtype=np.float16).reshape(3, 4),
                                 np.asfortranarray(np.arange(12.0).reshape(3, 4)),
                                 np.array(5, dtype=np.int32), np.zeros((0, 3), np.float32)])
def test_npy_decoding_reuses_headers_and_still_refuses_damage(arr: np.ndarray) -> None:
    from monosemantic.data.shards.format import load_npy

    data = npy(arr)
    for _ in range(2):  # the second decode takes the header seen before
        out = load_npy(data, "s")
        assert out.dtype == arr.dtype and out.shape == arr.shape and out.flags.writeable
        np.testing.assert_array_equal(out, arr)
    with pytest.raises(ShardSetError, match="s: not a plain .npy array"):
        load_npy(data[:-2], "s")
    with pytest.raises(ShardSetError, match="not a plain .npy array"):
        pickled = io.BytesIO()
        np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        load_npy(pickled.getvalue(), "s")  # pickled objects: never


def test_all_finite_agrees_with_isfinite() -> None:
    from monosemantic.data.shards.format import all_finite

    every_half = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # all 65,536 bit patterns
    finite = np.isfinite(every_half)
    assert finite.sum() == 2**16 - 2 * 1024  # 2 signs × (inf + 1,023 NaN payloads) per exponent-all-ones
    np.testing.assert_array_equal([all_finite(every_half[i : i + 1]) for i in range(2**16)], finite)
    assert all_finite(np.zeros((0, 4), np.float16)) and all_finite(np.ones((3, 4), np.float32))
    assert not all_finite(np.array([[1.0, np.inf]], np.float32))
