"""Hydra plumbing shared by the entry points: instantiation that fails loudly, run wrapping, resolvers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_offline() -> bool:
    """True when W&B has no credentials (no WANDB_API_KEY, no netrc entry) or WANDB_MODE says offline.

    W&B then writes the run into the run directory (``wandb sync`` uploads it later) instead of
    prompting for a key or waiting on the network.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "wandb" in netrc.read_text(errors="ignore"))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)


register_resolvers()


def _instantiate_group(group: DictConfig | None, kind: str, base: type) -> list[Any]:
    out: list[Any] = []
    if not group:
        log.warning("no %s configured", kind)
        return out
    if not isinstance(group, DictConfig):
        raise TypeError(f"{kind} config must be a mapping of name -> config, got {type(group).__name__}")
    for name, conf in group.items():
        if conf is None:  # disabled with `callbacks.name=null`
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ValueError(f"{kind} entry {name!r} has no _target_; every {kind} entry must name a class "
                             f"(or be set to null to disable it)")
        obj = hydra.utils.instantiate(conf)
        if not isinstance(obj, base):
            raise TypeError(f"{kind} entry {name!r} ({conf._target_}) is not a {base.__name__}")
        out.append(obj)
    return out


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_group(cfg, "callbacks", Callback)


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_group(cfg, "logger", Logger)


def log_hyperparameters(cfg: DictConfig, loggers: list[Logger], extra: dict | None = None) -> None:
    """Send the whole resolved config to every logger (not a hand-picked subset)."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params.update(extra or {})
    for lg in loggers:
        lg.log_hyperparams(params)


def config_key(obj: Any, n: int = 10) -> str:
    """A short stable hash of a config (mapping or DictConfig), for keying artifacts by what made them."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def finish_wandb() -> None:
    """Close the W&B run of this job, so each multirun job is its own run."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


def task_wrapper(fn: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """Run a task; log the failure with its output dir, always close W&B, log the wall time."""

    @wraps(fn)
    def wrapped(cfg: DictConfig) -> dict:
        start = time.time()
        try:
            return fn(cfg)
        except Exception:
            log.exception("task failed; outputs so far in %s", cfg.paths.get("output_dir"))
            raise
        finally:
            finish_wandb()
            log.info("%s finished in %.1f s; output dir %s", fn.__name__, time.time() - start,
                     cfg.paths.get("output_dir"))

    return wrapped


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        from rich.console import Console
        from rich.syntax import Syntax

        Console().print(Syntax(OmegaConf.to_yaml(cfg, resolve=False), "yaml", theme="ansi_dark"))
    if extras.get("save_config", True):
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def metric_value(metrics: dict, name: str | None) -> float | None:
    """The optimized metric for a Hydra sweeper; None, with a warning naming what was logged, when this run
    could not log it (e.g. val/loss_recovered on a shard set with no transformer behind it)."""
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric=%r was not logged by this run; logged: %s", name, sorted(metrics))
        return None
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)
