"""Activation caching (DESIGN §4, §8): the shards hold exactly what the manifest says, the rows are the
transformer's own MLP hook output at the recorded positions, and a killed cache resumes into the same
set an uninterrupted run writes.

Shards are read back here with ``tarfile`` + ``np.load`` rather than with the project's readers, so these
tests check the on-disk contract, not the code against itself.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from monosemantic import activation_cache as cache_mod
from monosemantic.activation_cache import (
    CacheSettings,
    cache_dir_for,
    context_starts,
    gather_positions,
    shard_positions,
    write_activation_cache,
)
from monosemantic.data.shards.format import FORMAT, norm_scale, read_manifest, row_norms, shard_name
from monosemantic.data.shards.writer import SampleBatch, TarShardWriter, aligned_zeros
from monosemantic.data.token_store import load_split
from monosemantic.models.components.transformer import MLP_HOOK
from monosemantic.models.transformer_module import load_transformer

# the settings conftest's ``tiny_shards`` was written with
TINY = CacheSettings(n_contexts=96, tokens_per_context=8, contexts_per_shard=16, batch_size=16)
N_CTX, D_MLP = 32, 64


def read_shard(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{key: {"acts": …, "tokens": …, …}}`` for one tar shard, in file order."""
    samples: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            samples.setdefault(key, {})[ext.removesuffix(".npy")] = np.load(io.BytesIO(data), allow_pickle=False)
    return samples


def read_set(shards_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """All samples of a shard set keyed by context id; fails on a duplicate key across shards."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in sorted(shards_dir.glob("shard-*.tar")):
        for key, sample in read_shard(path).items():
            assert key not in out, f"context {key} appears twice (again in {path.name})"
            out[key] = sample
    return out


# ---- the pure helpers --------------------------------------------------------------------------------

def test_context_starts_are_distinct_aligned_tiles_and_never_repeat() -> None:
    starts = context_starts(n_tokens=1000, n_ctx=32, n_contexts=31, seed=3)
    assert sorted(starts.tolist()) == list(range(0, 31 * 32, 32))  # all 31 tiles, each once
    assert not np.array_equal(starts, np.sort(starts))  # in a shuffled order
    np.testing.assert_array_equal(starts, context_starts(1000, 32, 31, seed=3))
    with pytest.raises(ValueError, match="n_contexts=32 but the token split holds only 31"):
        context_starts(1000, 32, 32, seed=3)


def test_positions_are_sorted_distinct_and_seeded_per_shard() -> None:
    pos = shard_positions(shard_index=5, n=200, n_ctx=32, k=8, seed=0)
    assert pos.shape == (200, 8) and pos.min() >= 0 and pos.max() < 32
    assert np.all(np.diff(pos, axis=1) > 0)  # ascending, so distinct
    assert len({tuple(p) for p in pos.tolist()}) > 190  # contexts get their own draws
    np.testing.assert_array_equal(pos, shard_positions(5, 200, 32, 8, 0))  # what a resumed run draws
    assert not np.array_equal(pos, shard_positions(6, 200, 32, 8, 0))
    assert not np.array_equal(pos, shard_positions(5, 200, 32, 8, 1))
    counts = np.bincount(shard_positions(0, 4000, 32, 8, 0).ravel(), minlength=32)
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000  # uniform over positions: 4000·8/32 each
    np.testing.assert_array_equal(shard_positions(0, 3, 32, 32, 0), np.tile(np.arange(32), (3, 1)))
    with pytest.raises(ValueError, match="tokens_per_context=33 exceeds n_ctx=32"):
        shard_positions(0, 1, 32, 33, 0)


def test_norm_scale_known_value() -> None:
    acts_NM = np.array([[3.0, 4.0], [6.0, 8.0]])  # norms 5 and 10, mean 7.5
    assert norm_scale(acts_NM) == pytest.approx(math.sqrt(2) / 7.5)


def test_row_norms_do_not_depend_on_batching() -> None:
    """The cache takes shard 0's norms batch by batch while writing, and context by context when a resumed
    run reads shard 0 back: both must give the same bits, or the two manifests would differ."""
    acts_NM = np.random.default_rng(0).standard_normal((4096, 512)).astype(np.float16)
    whole = row_norms(acts_NM)
    assert np.array_equal(np.concatenate([row_norms(acts_NM[i : i + 100]) for i in range(0, 4096, 100)]), whole)
    assert np.array_equal(np.concatenate([row_norms(acts_NM[i : i + 1]) for i in range(4096)]), whole)


def test_gather_positions_picks_each_contexts_rows() -> None:
    acts_BTM = torch.randn(3, 32, 5)
    pos_BK = torch.from_numpy(shard_positions(0, 3, 32, 8, 0))
    expected = torch.stack([acts_BTM[b, pos_BK[b]] for b in range(3)])
    assert torch.equal(gather_positions(acts_BTM, pos_BK), expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sample_batches_write_exactly_what_tarfile_writes(tmp_path, dtype) -> None:
    """The fast writer lays samples out from one template and patches keys and checksums in: the file
    must be byte-identical to the standard library's USTAR writer (so tarfile and webdataset read it)."""
    rng = np.random.default_rng(0)
    members = {"acts": (np.dtype(dtype), (5, 3)), "tokens": (np.int32, (5,)), "context": (np.int32, (11,))}
    batches = [[(c, {name: rng.standard_normal(shape).astype(dt) if name == "acts" else
                     rng.integers(0, 2**31 - 1, shape).astype(dt) for name, (dt, shape) in members.items()})
                for c in cs] for cs in ([7, 123_456_789, 42], [999_999_999, 0])]
    batch = SampleBatch(3, members)
    with TarShardWriter(tmp_path / "fast.tar") as sink:
        for samples in batches:
            for j, (_, arrays) in enumerate(samples):
                for name, arr in arrays.items():
                    batch.arrays[name][j] = arr
            batch.set_keys([c for c, _ in samples])
            sink.write(batch.rows(len(samples)))
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for c, arrays in (s for samples in batches for s in samples):
            for name, arr in arrays.items():
                data = io.BytesIO()
                np.save(data, arr)
                info = tarfile.TarInfo(f"{c:09d}.{name}.npy")
                info.size, info.mode = data.tell(), 0o444
                data.seek(0)
                tar.addfile(info, data)
    assert (tmp_path / "fast.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    with pytest.raises(ValueError, match="outside"):
        batch.set_keys([10**9])


def test_cache_dir_is_keyed_by_contents_not_speed(tmp_path) -> None:
    a = cache_dir_for("models/tiny", TINY, tmp_path)
    assert a == cache_dir_for("models/tiny", CacheSettings(**{**vars(TINY), "batch_size": 3}), tmp_path)
    assert a != cache_dir_for("models/tiny", CacheSettings(**{**vars(TINY), "seed": 1}), tmp_path)
    assert a.parent == tmp_path and a.name.startswith("tiny-")


# ---- the written set ---------------------------------------------------------------------------------

def test_manifest_counts_equal_rows_in_shards(tiny_shards: Path) -> None:
    m = read_manifest(tiny_shards)
    assert m["format"] == FORMAT and m["version"] == 1 and m["hook"] == MLP_HOOK
    assert (m["d_in"], m["dtype"], m["tokens_per_context"], m["n_ctx"]) == (D_MLP, "float16", 8, N_CTX)
    on_disk = sorted(p.name for p in tiny_shards.glob("shard-*.tar"))
    assert [s["name"] for s in m["shards"]] == on_disk == [shard_name(i) for i in range(6)]

    total, keys = 0, []
    for entry in m["shards"]:
        samples = read_shard(tiny_shards / entry["name"])
        rows = sum(len(s["acts"]) for s in samples.values())
        assert rows == entry["n_tokens"] == 16 * 8, entry["name"]
        for s in samples.values():
            assert s["acts"].dtype == np.float16 and s["acts"].shape == (8, D_MLP)
            assert {k: (v.dtype, v.shape) for k, v in s.items() if k != "acts"} == {
                "tokens": (np.int32, (8,)), "positions": (np.int32, (8,)), "context": (np.int32, (N_CTX,))}
        total += rows
        keys += list(samples)
    assert total == m["n_tokens"] == TINY.n_contexts * TINY.tokens_per_context
    assert sorted(int(k) for k in keys) == list(range(TINY.n_contexts))  # every context once, no repeats
    assert not list(tiny_shards.glob("*.tmp"))

    # normalisation: the stored scale brings the first shard's mean norm to exactly √d_in
    first = np.concatenate([s["acts"] for s in read_shard(tiny_shards / shard_name(0)).values()])
    mean_norm = np.linalg.norm(first.astype(np.float64) * m["normalization"]["scale"], axis=1).mean()
    assert mean_norm == pytest.approx(math.sqrt(D_MLP), rel=1e-5)


def test_rows_are_the_transformers_hook_output_at_the_recorded_positions(tiny_shards: Path,
                                                                        transformer_export: Path) -> None:
    net, cfg = load_transformer(transformer_export)
    train = load_split(cfg["token_store"], "train")
    starts = context_starts(len(train), N_CTX, TINY.n_contexts, TINY.seed)
    samples = {**read_shard(tiny_shards / shard_name(0)), **read_shard(tiny_shards / shard_name(5))}
    checked = 0
    for key in sorted(samples)[:3] + sorted(samples)[-3:]:  # first and last shard
        s, c = samples[key], int(key)
        # the context is the c-th window of the seeded order; the positions are the seeded draw
        np.testing.assert_array_equal(s["context"], train[starts[c] : starts[c] + N_CTX].astype(np.int32))
        shard, row = divmod(c, TINY.contexts_per_shard)
        np.testing.assert_array_equal(s["positions"], shard_positions(shard, TINY.contexts_per_shard, N_CTX, 8,
                                                                      TINY.seed)[row])
        np.testing.assert_array_equal(s["tokens"], s["context"][s["positions"]])

        # the MLP hook's output in a full forward (independent of mlp_acts' early stop)
        captured = []
        with torch.no_grad():
            net.forward_with_mlp_hook(torch.from_numpy(s["context"]).long()[None], captured.append)
        hook_TM = captured[0][0]
        acts_KM = torch.from_numpy(s["acts"]).float()
        torch.testing.assert_close(acts_KM, hook_TM[s["positions"]], rtol=2e-3, atol=1e-3)  # fp16 rounding
        torch.testing.assert_close(net.mlp_acts(torch.from_numpy(s["context"]).long()[None])[0], hook_TM)
        assert (acts_KM > 0).any() and (acts_KM == 0).any()  # real post-ReLU rows, not a vacuous match
        checked += 1
    assert checked == 6


def test_rerunning_a_finished_cache_is_a_no_op(tiny_shards: Path, transformer_export: Path,
                                               monkeypatch) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_shards.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("a finished cache must not even load the transformer")

    monkeypatch.setattr(cache_mod, "load_transformer", fail)
    t0 = time.perf_counter()
    out = write_activation_cache(transformer_export, tiny_shards, TINY, progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert out == tiny_shards
    assert {p.name: p.stat().st_mtime_ns for p in tiny_shards.iterdir()} == before


def test_an_out_dir_of_another_model_or_settings_is_refused(tiny_shards: Path, transformer_export: Path,
                                                           tmp_path) -> None:
    """An explicit out_dir holding another cache, whole or partial, is never reported as done or resumed into."""
    other_seed = CacheSettings(**{**vars(TINY), "seed": 1})
    with pytest.raises(ValueError, match=r"holds activations of another model or other settings \(seed: 0 there, 1"):
        write_activation_cache(transformer_export, tiny_shards, other_seed, progress=False)
    # the batch size changes speed, not contents: the finished set is found
    assert write_activation_cache(transformer_export, tiny_shards, CacheSettings(**{**vars(TINY), "batch_size": 5}),
                                  progress=False) == tiny_shards
    partial = copy_tree_without_manifest(tiny_shards, tmp_path / "partial")
    with pytest.raises(ValueError, match="tokens_per_context: 8 there, 4"):
        write_activation_cache(transformer_export, partial, CacheSettings(**{**vars(TINY), "tokens_per_context": 4}),
                               progress=False)
    assert sorted(p.name for p in partial.glob("shard-*.tar")) == [shard_name(i) for i in range(6)]  # untouched


def copy_tree_without_manifest(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    return dst


# A real process, really killed: the child slows each context write down so the kill lands mid-run
# (after two whole shards, while the third is a half-written ``.tar.tmp``).
KILLED_CHILD = """
import json, sys, time
import monosemantic.activation_cache as cache
from monosemantic.activation_cache import CacheSettings, write_activation_cache
write = cache._write_batch
def slow_write(sink, batch, n):  # 50 ms per context, so the kill lands mid-shard
    time.sleep(0.05 * n)
    return write(sink, batch, n)
cache._write_batch = slow_write
write_activation_cache(sys.argv[1], sys.argv[2], CacheSettings(**json.loads(sys.argv[3])), progress=False)
"""


@pytest.mark.slow
def test_killed_cache_resumes_into_the_uninterrupted_set(tiny_shards: Path, transformer_export: Path,
                                                        tmp_path) -> None:
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(transformer_export), str(out),
                              json.dumps(vars(TINY))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while not ((out / shard_name(1)).is_file() and (out / (shard_name(2) + ".tmp")).is_file()):
            assert child.poll() is None, f"child exited early: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard appeared within 60 s"
            time.sleep(0.005)
        child.kill()  # SIGKILL: no cleanup runs
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    assert child.returncode == -9

    complete = sorted(p.name for p in out.glob("shard-*.tar"))
    assert not (out / "manifest.json").exists()  # the interrupted set is visibly incomplete
    assert 2 <= len(complete) < 6 and list(out.glob("*.tar.tmp"))
    mtimes = {n: (out / n).stat().st_mtime_ns for n in complete}
    with pytest.raises(Exception, match="no manifest.json"):
        read_manifest(out)

    write_activation_cache(transformer_export, out, TINY, progress=False)

    assert not list(out.glob("*.tmp"))
    assert {n: (out / n).stat().st_mtime_ns for n in complete} == mtimes  # whole shards kept, not redone
    resumed, reference = read_set(out), read_set(tiny_shards)  # read_set fails on any duplicate context
    assert sorted(resumed) == sorted(reference) and len(resumed) == TINY.n_contexts
    for key, sample in reference.items():
        for name, arr in sample.items():
            np.testing.assert_array_equal(resumed[key][name], arr, err_msg=f"{key}.{name}")
    assert read_manifest(out) == read_manifest(tiny_shards)


@pytest.mark.parametrize("direct", [True, False])
def test_shard_writer_direct_and_buffered_write_the_same_bytes_and_leave_no_cache(tmp_path, direct,
                                                                                  resident_bytes) -> None:
    """O_DIRECT for page-aligned batches, the page cache (then dropped) otherwise; same bytes either way."""
    rng = np.random.default_rng(1)
    aligned = aligned_zeros((4, 4096))
    aligned[:] = rng.integers(0, 256, aligned.shape)
    odd = rng.integers(0, 256, (3, 512)).astype(np.uint8)  # not a multiple of a page: leaves O_DIRECT
    path = tmp_path / "s.tar"
    with TarShardWriter(path, direct=direct) as sink:
        sink.write(aligned)
        sink.write(aligned[:2])
        assert sink.direct == direct  # ext4 (the test machine) accepts O_DIRECT
        sink.write(odd)
        assert not sink.direct
        sink.write(aligned)
    data = path.read_bytes()
    body = aligned.tobytes() + aligned[:2].tobytes() + odd.tobytes() + aligned.tobytes()
    assert data[: len(body)] == body and not any(data[len(body) :])
    assert len(data) % tarfile.RECORDSIZE == 0 and len(data) - len(body) >= 2 * tarfile.BLOCKSIZE
    # (read_bytes above cached the file; a fresh write is what the check below is about)
    path.unlink()
    with TarShardWriter(path, direct=direct) as sink:
        for _ in range(256):
            sink.write(aligned)
    assert resident_bytes(path) == 0  # (without the drop: all 4 MB)


def test_a_failed_write_never_completes_its_shard(tmp_path, monkeypatch) -> None:
    import errno

    import monosemantic.data.shards.writer as sw

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    sink = TarShardWriter(tmp_path / "s.tar.tmp")
    sink.write(aligned_zeros((1, 4096)))
    monkeypatch.setattr(sw.os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        sink.write(aligned_zeros((1, 4096)))
    monkeypatch.undo()
    with pytest.raises(OSError, match="earlier write failed"):
        sink.close()  # no end-of-archive is written: the shard cannot pass for whole
    assert (tmp_path / "s.tar.tmp").stat().st_size == 4096


def test_a_platform_without_fadvise_o_direct_or_fdatasync_writes_and_reads_the_same_set(
        tiny_shards: Path, transformer_export: Path, tmp_path, monkeypatch) -> None:
    """As on macOS (no posix_fadvise, O_DIRECT or fdatasync): the cache writes the same bytes through the page
    cache, and the reader streams them; nothing calls what the platform lacks."""
    import os

    from monosemantic.data.activation_datamodule import ActivationDataModule
    from monosemantic.data.shards import pagecache

    for name in ("posix_fadvise", "fdatasync", "O_DIRECT"):
        monkeypatch.delattr(os, name)
    monkeypatch.setattr(pagecache, "HAS_FADVISE", False)
    monkeypatch.setattr(pagecache, "HAS_O_DIRECT", False)
    m = read_manifest(tiny_shards)
    settings = CacheSettings(**{k: m["settings"][k] for k in ("n_contexts", "tokens_per_context",
                                                               "contexts_per_shard", "batch_size", "seed")})
    out = write_activation_cache(transformer_export, tmp_path / "acts", settings, progress=False, direct_io=True)
    for s in m["shards"]:
        assert (out / s["name"]).read_bytes() == (tiny_shards / s["name"]).read_bytes(), s["name"]
    dm = ActivationDataModule(shards=str(out), batch_size=32, buffer_tokens=128, lr_windows=0)
    dm.setup()
    rows = sum(len(x) for x in dm.stream("train", infinite=False, drop_last=False))
    assert rows == sum(s["n_tokens"] for s in m["shards"][:-1])
