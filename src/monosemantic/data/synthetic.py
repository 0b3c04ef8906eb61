"""Synthetic activations with known sparse structure, written as a shard set (ground truth for SAEs).

Each token is a sparse non-negative combination of ``n_features`` random unit directions in ``d_in``
dimensions (the superposition picture SAEs are meant to undo). :class:`FeatureModel` says how often each
feature fires (a mean L0, spread evenly or by a power law), whether features fire together (a correlation
within groups), how strongly (a magnitude range) and with how much isotropic noise. A good SAE's decoder
should recover the directions, up to order: :func:`monosemantic.metrics.ground_truth_recovery` scores it
(mean max cosine similarity, MMCS, and the fraction recovered above 0.9), and the SAE stage reports both
whenever the shard set carries its directions (``directions.safetensors``).

``python src/ground_truth.py`` writes a set from ``configs/ground_truth.yaml``; any experiment then trains on
it through the usual entry point (``data.shards=<dir>``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import save_file

from monosemantic.data.shards.format import FORMAT, VERSION, shard_name
from monosemantic.errors import ConfigError
from monosemantic.utils.io import atomic_dir, write_json_atomic

DIRECTIONS_FILE = "directions.safetensors"


def random_directions(n_features: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n_features, d_in, generator=g)
    return d / d.norm(dim=1, keepdim=True)


@dataclass
class FeatureModel:
    """How tokens are drawn: ``x = Σ_i a_i m_i d_i + noise`` with ``a_i ~ Bernoulli(p_i)`` and ``m_i`` uniform in
    ``magnitude``. With ``correlation`` ρ > 0, features in the same group of ``group_size`` fire together: a
    Gaussian copula, ``a_i = [√ρ·u_group + √(1−ρ)·ε_i < Φ⁻¹(p_i)]``, which keeps each ``p_i``."""

    directions_KM: torch.Tensor
    p_K: torch.Tensor
    magnitude: tuple[float, float] = (0.5, 1.5)
    correlation: float = 0.0
    group_size: int = 8
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        K = self.directions_KM.shape[0]
        if self.p_K.shape != (K,) or not ((self.p_K >= 0) & (self.p_K <= 1)).all():
            raise ConfigError(f"p_K must be {K} probabilities in [0, 1]")
        lo, hi = self.magnitude
        if not 0 <= lo <= hi:
            raise ConfigError(f"magnitude must be [lo, hi] with 0 <= lo <= hi, got {list(self.magnitude)}")
        if not 0 <= self.correlation < 1:
            raise ConfigError(f"correlation must be in [0, 1), got {self.correlation}")
        if self.group_size < 1 or self.noise_std < 0:
            raise ConfigError(f"group_size must be >= 1 and noise_std >= 0, got {self.group_size}, {self.noise_std}")

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` tokens ``[n, d_in]``."""
        K = self.directions_KM.shape[0]
        if self.correlation > 0:
            n_groups = math.ceil(K / self.group_size)
            shared_NG = torch.randn(n, n_groups, generator=g)
            shared_NK = shared_NG.repeat_interleave(self.group_size, dim=1)[:, :K]
            z_NK = math.sqrt(self.correlation) * shared_NK + math.sqrt(1 - self.correlation) * torch.randn(
                n, K, generator=g)
            cut_K = torch.distributions.Normal(0.0, 1.0).icdf(self.p_K.clamp(1e-12, 1 - 1e-7))
            active_NK = z_NK < cut_K
        else:
            active_NK = torch.rand(n, K, generator=g) < self.p_K
        lo, hi = self.magnitude
        mags_NK = torch.rand(n, K, generator=g) * (hi - lo) + lo
        x_NM = (active_NK * mags_NK) @ self.directions_KM
        if self.noise_std:
            x_NM = x_NM + self.noise_std * torch.randn(x_NM.shape, generator=g)
        return x_NM

    def describe(self) -> dict:
        return {"n_features": int(self.directions_KM.shape[0]), "d_in": int(self.directions_KM.shape[1]),
                "l0": float(self.p_K.sum()), "p_min": float(self.p_K.min()), "p_max": float(self.p_K.max()),
                "magnitude": list(self.magnitude), "correlation": self.correlation, "group_size": self.group_size,
                "noise_std": self.noise_std}


def feature_probabilities(n_features: int, l0: float, density_exponent: float = 0.0) -> torch.Tensor:
    """Firing probabilities with mean L0 ``l0``: equal (exponent 0) or ``p_i ∝ (i+1)^−exponent`` (a few common
    features, a long tail of rare ones, as in language models), capped at 1 with the excess spread over the
    others so the L0 holds."""
    if not 0 < l0 <= n_features:
        raise ConfigError(f"l0 must be in (0, n_features={n_features}], got {l0}")
    w = torch.arange(1, n_features + 1, dtype=torch.float64) ** -float(density_exponent)
    p = torch.zeros(n_features, dtype=torch.float64)
    free = torch.ones(n_features, dtype=torch.bool)
    for _ in range(n_features):  # water-filling: fix the capped ones at 1, rescale the rest
        p[free] = w[free] * (l0 - (~free).sum()) / w[free].sum()
        over = free & (p > 1)
        if not over.any():
            break
        p[over], free[over] = 1.0, False
    return p.float()


def write_synthetic_shards(out_dir: str | Path, directions_KM: torch.Tensor, n_tokens: int,
                           p_active: float | None = None, rows_per_sample: int = 256, samples_per_shard: int = 64,
                           seed: int = 0, dtype: str = "float32", model: FeatureModel | None = None,
                           progress: bool = False, settings: dict | None = None) -> Path:
    """A shard set following DESIGN §4 with only ``acts.npy`` per sample (no tokens, no model), and the true
    directions in ``directions.safetensors``. Tokens come from ``model``, or every feature at ``p_active``.
    Written under a temporary name and renamed into place; ``settings`` (what made ``model``) is recorded in the
    manifest so a rerun can tell whether the set is the one asked for."""
    out_dir = Path(out_dir)
    if model is None:
        if p_active is None:
            raise ValueError("pass p_active or a FeatureModel")
        model = FeatureModel(directions_KM, torch.full((directions_KM.shape[0],), float(p_active)))
    g = torch.Generator().manual_seed(seed + 1)
    n_samples = math.ceil(n_tokens / rows_per_sample)
    n_shards = math.ceil(n_samples / samples_per_shard)
    shards = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="ground truth")
    with atomic_dir(out_dir) as tmp:
        for s in range(n_shards):
            count = 0
            with wds.TarWriter(str(tmp / shard_name(s))) as sink:
                for j in range(s * samples_per_shard, min((s + 1) * samples_per_shard, n_samples)):
                    rows = min(rows_per_sample, n_tokens - j * rows_per_sample)
                    acts = model.sample(rows, g).numpy().astype(np.dtype(dtype))
                    if dtype == "float16" and not np.isfinite(acts).all():
                        raise ConfigError("activations overflow float16: lower magnitude or use dtype=float32")
                    sink.write({"__key__": f"{j:09d}", "acts.npy": acts})
                    count += rows
                    if bar is not None:
                        bar.update(rows)
            shards.append({"name": shard_name(s), "n_tokens": count})
        save_file({"directions": directions_KM.float().contiguous(), "p": model.p_K.float().contiguous()},
                  str(tmp / DIRECTIONS_FILE))
        write_json_atomic(tmp / "manifest.json", {
            "format": FORMAT, "version": VERSION, "d_in": int(directions_KM.shape[1]), "dtype": dtype,
            "hook": "synthetic", "n_tokens": sum(x["n_tokens"] for x in shards),
            "tokens_per_context": rows_per_sample, "shards": shards, "model": {"checkpoint": None, "config": {}},
            "tokenizer": None,
            "synthetic": {**model.describe(), "seed": seed, "directions": DIRECTIONS_FILE,
                          **({"settings": settings} if settings else {}),
                          **({"p_active": p_active} if p_active is not None else {})},
        })
    if bar is not None:
        bar.close()
    return out_dir


def load_directions(shards_dir: str | Path) -> torch.Tensor | None:
    """The true directions ``[n_features, d_in]`` of a synthetic shard set, or None for any other set."""
    path = Path(shards_dir) / DIRECTIONS_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file
    return load_file(str(path))["directions"]
