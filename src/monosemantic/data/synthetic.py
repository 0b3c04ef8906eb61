"""Synthetic activations with known sparse structure, written as a shard set (ground truth for SAEs).

Each token is a sparse non-negative combination of ``n_features`` random unit directions in ``d_in``
dimensions: feature i is active with probability ``p_active`` and, when active, has a magnitude drawn
uniformly from [0.5, 1.5]. A good SAE's decoder should recover the directions (up to order).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from monosemantic.data.shards.format import FORMAT, VERSION, shard_name
from monosemantic.utils.io import write_json_atomic


def random_directions(n_features: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n_features, d_in, generator=g)
    return d / d.norm(dim=1, keepdim=True)


def sample_sparse_acts(directions_KM: torch.Tensor, n: int, p_active: float, g: torch.Generator) -> torch.Tensor:
    K = directions_KM.shape[0]
    active_NK = torch.rand(n, K, generator=g) < p_active
    mags_NK = torch.rand(n, K, generator=g) + 0.5
    return (active_NK * mags_NK) @ directions_KM


def write_synthetic_shards(out_dir: str | Path, directions_KM: torch.Tensor, n_tokens: int, p_active: float,
                           rows_per_sample: int = 256, samples_per_shard: int = 64, seed: int = 0,
                           dtype: str = "float32") -> Path:
    """A shard set following DESIGN §4 with only ``acts.npy`` per sample (no tokens, no model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed + 1)
    n_samples = math.ceil(n_tokens / rows_per_sample)
    shards = []
    for s in range(math.ceil(n_samples / samples_per_shard)):
        count = 0
        with wds.TarWriter(str(out_dir / shard_name(s))) as sink:
            for j in range(s * samples_per_shard, min((s + 1) * samples_per_shard, n_samples)):
                rows = min(rows_per_sample, n_tokens - j * rows_per_sample)
                acts = sample_sparse_acts(directions_KM, rows, p_active, g).numpy().astype(np.dtype(dtype))
                sink.write({"__key__": f"{j:09d}", "acts.npy": acts})
                count += rows
        shards.append({"name": shard_name(s), "n_tokens": count})
    write_json_atomic(out_dir / "manifest.json", {
        "format": FORMAT, "version": VERSION, "d_in": int(directions_KM.shape[1]), "dtype": dtype,
        "hook": "synthetic", "n_tokens": sum(x["n_tokens"] for x in shards), "tokens_per_context": rows_per_sample,
        "shards": shards, "model": {"checkpoint": None, "config": {}}, "tokenizer": None,
        "synthetic": {"n_features": int(directions_KM.shape[0]), "p_active": p_active, "seed": seed},
    })
    return out_dir
