"""The activation-cache stage: the frozen transformer's MLP activations → a shard set (DESIGN §4).

``run(cfg)`` is ``python src/cache_activations.py``; ``ensure(cfg, ledger)`` builds or reuses the set a
``cache_activations`` config describes (and the transformer it needs); ``for_sae_run(parent, ledger)``
composes that config for an SAE run with ``data.shards=null``. The writing itself is
:func:`monosemantic.activation_cache.write_activation_cache`; this stage decides where, and holds the lock.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from monosemantic.activation_cache import CacheSettings, check_identity, write_activation_cache
from monosemantic.stages import artifacts, preflight
from monosemantic.stages import transformer as transformer_stage
from monosemantic.stages.compose import cache_config
from monosemantic.stages.summary import print_ledger

log = logging.getLogger(__name__)


def ensure(cfg: DictConfig, ledger: artifacts.Ledger | None = None) -> Path:
    """The shard set a ``cache_activations`` config describes; built (with its transformer) if missing."""
    model_dir = Path(cfg.model_dir) if cfg.model_dir else transformer_stage.ensure(cfg, ledger)
    settings = CacheSettings(**OmegaConf.to_container(cfg.settings, resolve=True))
    out_dir = preflight.cache_out_dir(cfg, model_dir)

    def build() -> None:
        write_activation_cache(model_dir, out_dir, settings, device=cfg.device, direct_io=cfg.get("direct_io", True))

    if cfg.out_dir:  # a set there from another model or other settings is an error, not something to reuse
        check_identity(out_dir, model_dir, settings)
    return artifacts.ensure("activation cache", out_dir, artifacts.shards_complete, build, ledger)


def for_sae_run(parent: DictConfig, ledger: artifacts.Ledger | None = None) -> Path:
    """For an SAE run with ``data.shards=null``: the shard set of
    :func:`~monosemantic.stages.compose.cache_config`, built if missing."""
    return ensure(cache_config(parent), ledger)


def run(cfg: DictConfig) -> dict:
    report = preflight.check(cfg, "cache")
    ledger: artifacts.Ledger = []
    out = ensure(cfg, ledger)
    print_ledger(ledger)
    return {"shards": str(out), "stages": [r.as_dict() for r in ledger], "preflight": report.as_dict()}
