"""Activation caching: the frozen transformer's MLP activations → webdataset shards (DESIGN §4).

Contexts are non-overlapping ``n_ctx`` windows of the token store's train split, taken in a seeded random
order with no repeats (paper: "250 tokens sampled per context, shuffled across contexts, no repeats").
From each context ``tokens_per_context`` distinct positions are sampled (seeded per shard), so the
output is a pure function of the settings: a killed run that resumes writes exactly what an
uninterrupted one would have. Shards are written as ``*.tar.tmp`` and renamed when whole; the manifest
is written last. Normalisation: the scale that makes the mean activation norm √d_in is measured on the
first shard and stored in the manifest, so SAE training is scale-free. The stage that calls this
(``stages/cache.py``) holds a lock on ``out_dir``, so two jobs never write one set at once.

Speed (see ``data/shards/writer.py``): each batch's activations are converted straight into a reusable
buffer already laid out as tar samples, and one writer thread writes it (``O_DIRECT``) while the next
forward runs. On the 2-core dev CPU caching runs at ~0.8× a bare forward to the MLP; on a GPU it is
bound by the host's write speed (1 KB per float16 activation).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from monosemantic.data.contexts import block_positions, context_starts
from monosemantic.data.shards.format import FORMAT, VERSION, decode_context, row_norms, scale_from_norms, shard_name
from monosemantic.data.shards.writer import SampleBatch, TarShardWriter, aligned_zeros
from monosemantic.data.token_store import check_store_matches_model, load_split
from monosemantic.errors import ConfigError, InputError, NonFiniteError
from monosemantic.models.components.transformer import MLP_HOOK
from monosemantic.models.transformer_module import load_transformer
from monosemantic.utils.hydra_utils import config_key
from monosemantic.utils.io import raise_if_disk_full, write_json_atomic

log = logging.getLogger(__name__)
IDENTITY_FILE = "cache_identity.json"  # model + settings of the set in this directory


@dataclass
class CacheSettings:
    n_contexts: int
    tokens_per_context: int = 64
    contexts_per_shard: int = 512
    batch_size: int = 64
    dtype: str = "float16"
    split: str = "train"
    seed: int = 0


def cache_identity(model_dir: str | Path, settings: CacheSettings) -> dict:
    """What a shard set's contents depend on: the model's *weights* (not its folder name: two run exports are
    both called ``export``) and every setting but the batch size (which changes speed, not contents)."""
    s = asdict(settings)
    s.pop("batch_size")
    weights = Path(model_dir) / "model.safetensors"
    if weights.is_file():
        s["model_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    return s


def cache_dir_for(model_dir: str | Path, settings: CacheSettings, root: str | Path) -> Path:
    """The default directory of a shard set: keyed by :func:`cache_identity`."""
    return Path(root) / f"{Path(model_dir).name}-{config_key(cache_identity(model_dir, settings))}"


def check_identity(out_dir: str | Path, model_dir: str | Path, settings: CacheSettings) -> None:
    """An explicit ``out_dir`` that holds a set (whole or partial) written by another model or other settings
    is refused, naming what differs: reusing or resuming into it would mix two caches."""
    _check_identity(Path(out_dir), cache_identity(model_dir, settings))


def _differences(recorded: dict, asked: dict, keys: set[str]) -> str:
    return "; ".join(f"{k}: {recorded.get(k)!r} there, {asked.get(k)!r} asked for" for k in sorted(keys)
                     if recorded.get(k) != asked.get(k))


def _check_identity(out_dir: Path, identity: dict) -> None:
    """Refuse ``out_dir`` if it holds a set this model and these settings did not write. The identity file is
    written before the first shard, so a set without one (a manifest, or shards alone) came from elsewhere:
    another tool, an older version, a copy. Its manifest's settings are compared when it has one, to say what
    differs; when nothing can be compared its origin is unknown, and it is refused all the same."""
    recorded_file = out_dir / IDENTITY_FILE
    fix = "Choose another out_dir, or leave out_dir unset: the default directory is keyed by model and settings."
    if recorded_file.is_file():
        try:
            recorded = json.loads(recorded_file.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{recorded_file}: not valid JSON ({e}); the set's origin is unknown. {fix}") from e
        what = _differences(recorded, identity, set(recorded) | set(identity))
        if what:
            raise InputError(f"{out_dir} holds activations of another model or other settings ({what}). {fix}")
        return
    manifest_file = out_dir / "manifest.json"
    shards = sorted(p.name for p in out_dir.glob("shard-*.tar*")) if out_dir.is_dir() else []
    if not manifest_file.is_file() and not shards:
        return  # nothing of a shard set here
    what = ""
    if manifest_file.is_file():
        try:
            settings = json.loads(manifest_file.read_text()).get("settings") or {}
        except (json.JSONDecodeError, AttributeError):
            settings = {}
        what = _differences(settings, identity, set(identity) - {"model_sha256"})
    found = "a manifest.json" if manifest_file.is_file() else f"{len(shards)} shard file(s) ({shards[0]}, ...)"
    raise InputError(f"{out_dir} holds {found} but no {IDENTITY_FILE}: "
                     + (f"its settings differ ({what}). " if what else
                        "the model and settings that wrote it are unknown, so it can be neither reused nor resumed "
                        "into. ") + fix)


def shard_positions(shard_index: int, n: int, n_ctx: int, k: int, seed: int) -> np.ndarray:
    """``[n, k]`` sorted distinct positions for each of a shard's ``n`` contexts (a shard is one block of
    :func:`monosemantic.data.contexts.block_positions`, pass 0)."""
    return block_positions(shard_index, n, n_ctx, k, seed)


def gather_positions(acts_BTM: torch.Tensor, pos_BK: torch.Tensor) -> torch.Tensor:
    """``acts_BTM[b, pos_BK[b]]`` as one row gather: ``[B, K, M]``."""
    B, T, M = acts_BTM.shape
    rows = (torch.arange(B, device=acts_BTM.device)[:, None] * T + pos_BK.to(acts_BTM.device)).reshape(-1)
    return acts_BTM.reshape(B * T, M).index_select(0, rows).view(B, -1, M)


def _host_zeros(shape: tuple[int, ...], dtype: np.dtype, pinned: bool) -> np.ndarray:
    """Zeroed, page-aligned host memory; page-locked when the activations come from a GPU (faster copies)."""
    return torch.zeros(shape, dtype=torch.uint8, pin_memory=True).numpy() if pinned else aligned_zeros(shape, dtype)


def _nonfinite_activations(acts: torch.Tensor, dtype: str, shard: int, idx: np.ndarray, starts: np.ndarray,
                           out_dir: Path) -> NonFiniteError:
    """The error for a batch of activations that is not finite once cast to the shard dtype."""
    where = (f"shard {shard} ({shard_name(shard)}), contexts {int(idx[0])}–{int(idx[-1])} of the seeded order "
             f"(token offsets {int(starts[idx[0]])}…)")
    a = acts.float()
    if torch.isnan(a).any():
        cause = "the transformer's activations contain NaN: the model itself is broken (check its checkpoint)"
    elif not torch.isfinite(a).all():
        cause = "the transformer's activations contain inf: the model itself is broken (check its checkpoint)"
    else:
        cause = (f"activations up to |x| = {float(a.abs().max()):.6g} exceed {dtype}'s largest value (65,504) and "
                 "would be written as inf: cache with settings.dtype=float32 (into another out_dir, or the default)")
    return NonFiniteError(f"{where}: {cause}. Nothing of this shard was kept; the complete shards in {out_dir} "
                          "are intact.")


def _write_batch(sink: TarShardWriter, batch: SampleBatch, n: int) -> None:
    """The writer thread's job: the first ``n`` samples of ``batch``, already laid out as tar bytes."""
    sink.write(batch.rows(n))


def _finish_shard(sink: TarShardWriter, final: Path) -> None:
    """The shard's end-of-archive, then its final name: only whole shards ever carry it."""
    sink.close()
    sink.path.rename(final)


@torch.inference_mode()
def write_activation_cache(model_dir: str | Path, out_dir: str | Path, settings: CacheSettings,
                           device: str = "cpu", progress: bool = True, max_pending: int = 4,
                           direct_io: bool = True) -> Path:
    """Write (or finish, or find) the shard set for this model and these settings; returns ``out_dir``.

    Up to ``max_pending`` batches wait for the writer thread, each in its own reusable buffer;
    ``direct_io`` writes the shards with ``O_DIRECT`` where the filesystem allows (see ``TarShardWriter``).
    One writer per ``out_dir`` at a time: it removes the ``*.tar.tmp`` a killed run left, so the pipeline calls
    it under the artifact store's lock (``stages/artifacts.py``), which concurrent jobs share."""
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    identity = cache_identity(model_dir, settings)
    _check_identity(out_dir, identity)
    if (out_dir / "manifest.json").is_file():
        log.info("activation cache complete, nothing to do: %s", out_dir)
        return out_dir
    net, mcfg = load_transformer(model_dir, device)
    check_store_matches_model(mcfg["token_store"], net.cfg.vocab_size,
                              model_dir / mcfg["tokenizer"] if mcfg.get("tokenizer") else None, model_dir)
    n_ctx = int(mcfg["model"]["n_ctx"])
    tokens = np.asarray(load_split(mcfg["token_store"], settings.split))  # a plain view of the memmap
    window = np.arange(n_ctx)
    starts = context_starts(len(tokens), n_ctx, settings.n_contexts, settings.seed)
    k, cps = settings.tokens_per_context, settings.contexts_per_shard
    n_shards = math.ceil(settings.n_contexts / cps)
    torch_dtype = {"float16": torch.float16, "float32": torch.float32}.get(settings.dtype)
    if torch_dtype is None:
        raise ConfigError(f"settings.dtype={settings.dtype!r}: the shard format allows float16 or float32")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / IDENTITY_FILE, identity)  # before any shard: a resumed run is checked against it
    for stale in out_dir.glob("*.tar.tmp"):  # a shard a killed run left half-written
        stale.unlink()

    done = [i for i in range(n_shards) if (out_dir / shard_name(i)).is_file()]
    if done:
        log.info("resuming activation cache %s: %d of %d shards already complete", out_dir, len(done), n_shards)
    todo = [i for i in range(n_shards) if i not in set(done)]
    n_todo_ctx = sum(min(cps, settings.n_contexts - i * cps) for i in todo)
    start_time, fwd_tokens = time.time(), 0
    bar = tqdm(total=n_todo_ctx * n_ctx, unit="tok", unit_scale=True, desc="caching activations",
               disable=not progress)
    norms0: list[np.ndarray] = []  # the row norms of shard 0, for the normalisation scale (no read-back)
    # ``max_pending`` reusable batch buffers, each holding its contexts as finished tar samples: fresh
    # memory per batch would be page-faulted in each time (on the dev VM ~2.3 s of kernel time per GB).
    members = {"acts": (np.dtype(settings.dtype), (k, net.cfg.d_mlp)), "tokens": (np.int32, (k,)),
               "positions": (np.int32, (k,)), "context": (np.int32, (n_ctx,))}
    pinned = torch.device(device).type == "cuda"
    ring = [SampleBatch(settings.batch_size, members, allocate=functools.partial(_host_zeros, pinned=pinned))
            for _ in range(max_pending)]
    ring_acts = [torch.from_numpy(batch.arrays["acts"]) for batch in ring]
    n_batches, sinks = 0, []
    # One writer thread takes batch b (one ``write``, which releases the GIL) and closes and renames
    # finished shards while the main thread runs the forward of batch b+1. On a GPU the forward is
    # asynchronous; on 2 CPU cores the writer competes with it, but its share is small (an O_DIRECT write
    # of an 8.6 MB batch costs ~0.25 ms of CPU). At most ``max_pending`` jobs are queued, so at most that
    # many ring buffers are in use.
    pending: deque[Future] = deque()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as writer:
            try:
                for i in todo:
                    lo, hi = i * cps, min((i + 1) * cps, settings.n_contexts)
                    tmp = out_dir / (shard_name(i) + ".tmp")
                    sink = TarShardWriter(tmp, direct=direct_io)
                    sinks.append(sink)
                    pos_NK = shard_positions(i, hi - lo, n_ctx, k, settings.seed)
                    for b in range(lo, hi, settings.batch_size):
                        idx = np.arange(b, min(b + settings.batch_size, hi))
                        n = len(idx)
                        ctx_BT = tokens[starts[idx, None] + window].astype(np.int64)
                        acts_BTM = net.mlp_acts(torch.from_numpy(ctx_BT).to(device))
                        pos_BK = pos_NK[b - lo : b - lo + n]
                        picked_BKM = acts_BTM if k == n_ctx else gather_positions(acts_BTM, torch.from_numpy(pos_BK))
                        raw_BKM = picked_BKM  # before the cast: an overflow is told apart from a broken model
                        if picked_BKM.device.type != "cpu":
                            picked_BKM = picked_BKM.to(torch_dtype)  # convert on the device: half the bytes to copy
                        while len(pending) >= max_pending:  # frees the buffer this batch is about to fill
                            pending.popleft().result()  # re-raises a writer error, before its shard is renamed
                        slot = n_batches % max_pending
                        batch, n_batches = ring[slot], n_batches + 1
                        ring_acts[slot][:n].copy_(picked_BKM)  # float16 (or 32) straight into the tar stream
                        # NaN from the model, or |x| > 65,504 cast to float16 (inf): stop before it is written.
                        # Checked where the data is (on a GPU there, before the host copy is used; on the CPU the
                        # cast buffer): one pass over a batch, small beside the forward.
                        written = picked_BKM if picked_BKM.device.type != "cpu" else ring_acts[slot][:n]
                        if not bool(torch.isfinite(written).all()):
                            raise _nonfinite_activations(raw_BKM, settings.dtype, i, idx, starts, out_dir)
                        del acts_BTM, picked_BKM, raw_BKM  # freed before the next forward allocates its own
                        batch.arrays["context"][:n] = ctx_BT
                        batch.arrays["positions"][:n] = pos_BK
                        batch.arrays["tokens"][:n] = np.take_along_axis(ctx_BT, pos_BK, axis=1)
                        batch.set_keys(idx)
                        if i == 0:
                            norms0.append(row_norms(ring_acts[slot][:n].reshape(n * k, -1)))
                        pending.append(writer.submit(_write_batch, sink, batch, n))
                        fwd_tokens += ctx_BT.size
                        bar.update(ctx_BT.size)
                    pending.append(writer.submit(_finish_shard, sink, out_dir / shard_name(i)))
                while pending:
                    pending.popleft().result()
            finally:  # on an error: wait for the writer, close what is open (the .tmp files are redone next run)
                for job in pending:
                    job.exception()
                for sink in sinks:
                    sink.abandon()
    except OSError as e:  # a full disk: one clear message; the complete shards stay, the partial ones go
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            for partial in out_dir.glob("*.tar.tmp"):  # redone by the next run anyway: free their space now
                partial.unlink(missing_ok=True)
        raise_if_disk_full(e, f"shard set {out_dir.name}", out_dir)
        raise
    bar.close()
    elapsed = time.time() - start_time
    if fwd_tokens:
        log.info("cached %d contexts in %.1f s: %.0f tokens/s forwarded, %.0f activations/s written",
                 n_todo_ctx, elapsed, fwd_tokens / elapsed, n_todo_ctx * k / elapsed)

    if not norms0:  # resumed after shard 0 was written: read it back (the same rows, so the same scale)
        first = wds.DataPipeline(wds.SimpleShardList([str(out_dir / shard_name(0))]), wds.tarfile_to_samples())
        norms0 = [row_norms(decode_context(s, net.cfg.d_mlp, extras=())["acts"]) for s in first]
    norms0_N = np.concatenate(norms0)
    shards = [{"name": shard_name(i), "n_tokens": (min((i + 1) * cps, settings.n_contexts) - i * cps) * k}
              for i in range(n_shards)]
    manifest = {
        "format": FORMAT, "version": VERSION, "d_in": net.cfg.d_mlp, "dtype": settings.dtype, "hook": MLP_HOOK,
        "n_tokens": sum(s["n_tokens"] for s in shards), "tokens_per_context": k, "n_ctx": n_ctx,
        "n_contexts": settings.n_contexts, "shards": shards,
        "normalization": {"scale": scale_from_norms(norms0_N, net.cfg.d_mlp),
                          "target_mean_norm": math.sqrt(net.cfg.d_mlp), "n_sample_tokens": len(norms0_N)},
        "model": {"checkpoint": str(model_dir.resolve()), "config": mcfg["model"]},
        "tokenizer": str((model_dir / mcfg["tokenizer"]).resolve()) if mcfg.get("tokenizer") else None,
        "token_store": mcfg["token_store"], "settings": asdict(settings),
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    log.info("activation cache complete: %s (%s tokens in %d shards)", out_dir, f"{manifest['n_tokens']:,}",
             n_shards)
    return out_dir


def describe(out_dir: str | Path) -> str:
    m = json.loads((Path(out_dir) / "manifest.json").read_text())
    return f"{out_dir}: {m['n_tokens']:,} tokens, d_in {m['d_in']}, {len(m['shards'])} shards, {m['dtype']}"
