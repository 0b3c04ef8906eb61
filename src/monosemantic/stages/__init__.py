"""The pipeline's stages (DESIGN §1), one module each: ``transformer``, ``cache``, ``sae``, ``eval``; and what
they share: ``compose`` (building an upstream stage with this run's settings), ``artifacts`` (keys, locks,
built vs reused) and ``summary``. Each stage module has ``run(cfg) -> dict``; :func:`run_training` picks the
one ``src/train.py`` runs from the experiment's ``stage`` key."""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from monosemantic.errors import ConfigError, MissingInputError
from monosemantic.utils.hydra_utils import finish_wandb

TRAINING_STAGES = {"transformer": "monosemantic.stages.transformer", "sae": "monosemantic.stages.sae"}


def run_training(cfg: DictConfig) -> dict:
    """``src/train.py``: the stage the experiment names. Each stage's W&B run is finished when it ends, so a
    multirun job or an upstream stage built inside this run never writes into another's run."""
    stage = cfg.get("stage")
    if stage not in TRAINING_STAGES:
        raise ConfigError(f"stage={stage!r} is not one of {sorted(TRAINING_STAGES)} (set by the experiment config)")
    if cfg.get("ckpt_path") == "last" and not (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file():
        raise MissingInputError(
            f"ckpt_path=last: {cfg.paths.output_dir}/checkpoints/last.ckpt does not exist. Each run gets a new "
            "directory: resume in the old one with hydra.run.dir=logs/<task>/runs/<stamp> ckpt_path=last")
    try:
        return importlib.import_module(TRAINING_STAGES[stage]).run(cfg)
    finally:
        finish_wandb()
