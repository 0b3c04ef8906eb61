"""The ground-truth benchmark's data stage: ``python src/ground_truth.py`` (``configs/ground_truth.yaml``).

Writes a shard set of synthetic activations from :class:`~monosemantic.data.synthetic.FeatureModel` with its
true directions beside it; the SAE stage scores any SAE trained on it (``data.shards=``) by MMCS and the
fraction of features recovered (:func:`monosemantic.metrics.ground_truth_recovery`). A folder that already
holds a complete set with the same settings is reused, not rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from monosemantic.data.synthetic import (
    DIRECTIONS_FILE,
    FeatureModel,
    feature_probabilities,
    random_directions,
    write_synthetic_shards,
)
from monosemantic.errors import ConfigError, OutputExistsError

log = logging.getLogger(__name__)

SETTINGS = ("n_features", "d_in", "l0", "density_exponent", "correlation", "group_size", "magnitude", "noise_std",
            "n_tokens", "dtype", "seed")


def settings(cfg: DictConfig) -> dict:
    out = {k: cfg[k] for k in SETTINGS}
    out["magnitude"] = [float(v) for v in cfg.magnitude]
    for key in ("n_features", "d_in", "group_size", "n_tokens", "seed"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < (0 if key == "seed" else 1):
            raise ConfigError(f"{key}={out[key]!r}: expected a positive integer")
    if len(out["magnitude"]) != 2:
        raise ConfigError(f"magnitude={out['magnitude']}: expected [lo, hi]")
    if out["dtype"] not in ("float16", "float32"):
        raise ConfigError(f"dtype={out['dtype']!r}: expected float16 or float32")
    return out


def default_dir(cfg: DictConfig, s: dict) -> Path:
    # the main settings readable, all of them (magnitude, noise, dtype, …) in the hash
    digest = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    name = (f"k{s['n_features']}_d{s['d_in']}_l0{s['l0']:g}_a{s['density_exponent']:g}_rho{s['correlation']:g}"
            f"_n{s['n_tokens']}_s{s['seed']}-{digest}")
    return Path(cfg.paths.data_dir) / "ground_truth" / name


def run(cfg: DictConfig) -> dict:
    s = settings(cfg)
    out = Path(cfg.out_dir) if cfg.get("out_dir") else default_dir(cfg, s)
    manifest = out / "manifest.json"
    if manifest.is_file() and (out / DIRECTIONS_FILE).is_file():
        recorded = json.loads(manifest.read_text()).get("synthetic", {}).get("settings")
        if recorded == s:
            log.info("ground truth %s already written with these settings: reused", out)
            print(f"ground truth: {out} (reused)\ntrain on it: python src/train.py experiment=sae_4096 "
                  f"data.shards={out}")
            return {"out_dir": str(out), "reused": True}
        raise OutputExistsError(f"{out} holds a shard set written with other settings ({recorded}); pass another "
                              "out_dir= or remove it")
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out} exists and is not a ground-truth set written by this command: pass another "
                              "out_dir=")
    directions_KM = random_directions(s["n_features"], s["d_in"], seed=s["seed"])
    p_K = feature_probabilities(s["n_features"], float(s["l0"]), float(s["density_exponent"]))
    model = FeatureModel(directions_KM, p_K, tuple(s["magnitude"]), float(s["correlation"]), s["group_size"],
                         float(s["noise_std"]))
    write_synthetic_shards(out, directions_KM, s["n_tokens"], rows_per_sample=int(cfg.rows_per_sample),
                           samples_per_shard=int(cfg.samples_per_shard), seed=s["seed"], dtype=s["dtype"],
                           model=model, progress=True, settings=s)
    log.info("wrote %s tokens from %d planted features (L0 %.2g) to %s", f"{s['n_tokens']:,}", s["n_features"],
             float(p_K.sum()), out)
    print(f"ground truth: {out}\ntrain on it: python src/train.py experiment=sae_4096 data.shards={out}")
    return {"out_dir": str(out), "reused": False}
