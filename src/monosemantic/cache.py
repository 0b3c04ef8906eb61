"""Activation caching: the frozen transformer's MLP activations → webdataset shards (DESIGN §4).

Contexts are non-overlapping ``n_ctx`` windows of the token store's train split, taken in a seeded random
order with no repeats (paper: "250 tokens sampled per context, shuffled across contexts, no repeats").
From each context ``tokens_per_context`` distinct positions are sampled (seeded per context), so the
output is a pure function of the settings: a killed run that resumes writes exactly what an
uninterrupted one would have. Shards are written as ``*.tar.tmp`` and renamed when whole; the manifest
is written last. Normalisation: the scale that makes the mean activation norm √d_in is estimated from
the first shard and stored in the manifest, so SAE training is scale-free.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from monosemantic.data.shards import FORMAT, VERSION, decode_context, norm_scale, shard_name
from monosemantic.data.token_store import load_split
from monosemantic.models.components.transformer import MLP_HOOK
from monosemantic.models.transformer_module import load_transformer
from monosemantic.utils.hydra_utils import config_key
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class CacheSettings:
    n_contexts: int
    tokens_per_context: int = 64
    contexts_per_shard: int = 512
    batch_size: int = 64
    dtype: str = "float16"
    split: str = "train"
    seed: int = 0


def cache_dir_for(model_dir: str | Path, settings: CacheSettings, root: str | Path) -> Path:
    """Shard sets are keyed by the model's *weights* (not its folder name: two run exports are both called
    ``export``) and by every setting that changes their contents."""
    s = asdict(settings)
    s.pop("batch_size")  # changes speed, not contents
    weights = Path(model_dir) / "model.safetensors"
    if weights.is_file():
        s["model_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    return Path(root) / f"{Path(model_dir).name}-{config_key(s)}"


def context_starts(n_tokens: int, n_ctx: int, n_contexts: int, seed: int) -> np.ndarray:
    tiles = np.arange(0, n_tokens - n_ctx + 1, n_ctx)
    if n_contexts > len(tiles):
        raise ValueError(f"n_contexts={n_contexts} but the token split holds only {len(tiles)} "
                         f"non-overlapping contexts of {n_ctx} tokens (contexts are never repeated)")
    return np.random.default_rng(seed).permutation(tiles)[:n_contexts]


def sample_positions(ctx_index: int, n_ctx: int, k: int, seed: int) -> np.ndarray:
    if k > n_ctx:
        raise ValueError(f"tokens_per_context={k} exceeds n_ctx={n_ctx}")
    return np.sort(np.random.default_rng([seed, ctx_index]).choice(n_ctx, size=k, replace=False))


@functools.lru_cache(maxsize=64)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    """The bytes of ``np.save(arr)``; the header is cached per dtype and shape (every context has the same),
    which makes encoding ~3× cheaper than building it per array."""
    arr = np.ascontiguousarray(arr)
    return _npy_header(np.lib.format.dtype_to_descr(arr.dtype), arr.shape) + arr.tobytes()


def _write_batch(sink: tarfile.TarFile, idx: np.ndarray, picked_BKM: np.ndarray, ctx_BT: np.ndarray,
                 pos_BK: np.ndarray) -> None:
    """One tar sample per context (webdataset's layout: members ``<key>.<name>``, grouped by key)."""
    for j, c in enumerate(idx):
        key = f"{int(c):09d}"
        for name, arr in (("acts", picked_BKM[j]), ("tokens", ctx_BT[j, pos_BK[j]].astype(np.int32)),
                          ("positions", pos_BK[j].astype(np.int32)), ("context", ctx_BT[j].astype(np.int32))):
            data = npy_bytes(arr)
            info = tarfile.TarInfo(f"{key}.{name}.npy")
            info.size, info.mode = len(data), 0o444
            sink.addfile(info, io.BytesIO(data))


@torch.inference_mode()
def write_activation_cache(model_dir: str | Path, out_dir: str | Path, settings: CacheSettings,
                           device: str = "cpu", progress: bool = True) -> Path:
    """Write (or finish, or find) the shard set for this model and these settings; returns ``out_dir``."""
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    if (out_dir / "manifest.json").is_file():
        log.info("activation cache complete, nothing to do: %s", out_dir)
        return out_dir
    net, mcfg = load_transformer(model_dir, device)
    n_ctx = int(mcfg["model"]["n_ctx"])
    tokens = load_split(mcfg["token_store"], settings.split)
    starts = context_starts(len(tokens), n_ctx, settings.n_contexts, settings.seed)
    k, cps = settings.tokens_per_context, settings.contexts_per_shard
    n_shards = math.ceil(settings.n_contexts / cps)
    np_dtype = np.dtype(settings.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    for i in todo:
        lo, hi = i * cps, min((i + 1) * cps, settings.n_contexts)
        tmp = out_dir / (shard_name(i) + ".tmp")
        # The standard library's tarfile writes the shard (webdataset reads it): plain USTAR headers with
        # mtime 0 cost 1.6× less than webdataset's TarWriter (which adds a PAX header per member) and give
        # byte-identical shards when a run is repeated or resumed. A writer thread encodes and writes
        # batch b while the main thread runs the forward of batch b+1: on a GPU the forward runs
        # asynchronously and the writing hides behind it; on 2 CPU cores both compete for the cores.
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as sink, ThreadPoolExecutor(1) as writer:
            pending = []
            for b in range(lo, hi, settings.batch_size):
                idx = np.arange(b, min(b + settings.batch_size, hi))
                ctx_BT = np.stack([tokens[s : s + n_ctx] for s in starts[idx]]).astype(np.int64)
                acts_BTM = net.mlp_acts(torch.from_numpy(ctx_BT).to(device))
                pos_BK = np.stack([sample_positions(int(c), n_ctx, k, settings.seed) for c in idx])
                picked_BKM = torch.gather(acts_BTM, 1, torch.from_numpy(pos_BK).to(device)[..., None]
                                          .expand(-1, -1, acts_BTM.shape[-1]))
                picked_BKM = picked_BKM.to("cpu", torch.float16 if np_dtype == np.float16 else torch.float32)
                pending.append(writer.submit(_write_batch, sink, idx, picked_BKM.numpy(), ctx_BT, pos_BK))
                fwd_tokens += ctx_BT.size
                bar.update(ctx_BT.size)
            for job in pending:
                job.result()  # re-raises a writer error here, before the shard is renamed
        tmp.rename(out_dir / shard_name(i))
    bar.close()
    elapsed = time.time() - start_time
    if fwd_tokens:
        log.info("cached %d contexts in %.1f s: %.0f tokens/s forwarded, %.0f activations/s written",
                 n_todo_ctx, elapsed, fwd_tokens / elapsed, n_todo_ctx * k / elapsed)

    first = next(iter(wds.DataPipeline(wds.SimpleShardList([str(out_dir / shard_name(0))]),
                                       wds.tarfile_to_samples(), wds.batched(10**9, collation_fn=list))))
    sample_NM = np.concatenate([decode_context(s, net.cfg.d_mlp)["acts"] for s in first])
    shards = [{"name": shard_name(i), "n_tokens": (min((i + 1) * cps, settings.n_contexts) - i * cps) * k}
              for i in range(n_shards)]
    manifest = {
        "format": FORMAT, "version": VERSION, "d_in": net.cfg.d_mlp, "dtype": settings.dtype, "hook": MLP_HOOK,
        "n_tokens": sum(s["n_tokens"] for s in shards), "tokens_per_context": k, "n_ctx": n_ctx,
        "n_contexts": settings.n_contexts, "shards": shards,
        "normalization": {"scale": norm_scale(sample_NM), "target_mean_norm": math.sqrt(net.cfg.d_mlp),
                          "n_sample_tokens": len(sample_NM)},
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
