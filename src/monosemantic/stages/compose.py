"""Composing the stages a run builds, so that every setting of the run reaches them.

A stage whose input is missing composes the upstream stage's own entry config (``hydra.compose``) and runs
it inside this process. What carries over, in this order (later wins):

1. the run's ``scale`` and ``paths`` (resolved: ``scale.*`` overrides reach every stage);
2. the run's *shared settings* (:func:`shared_overrides`): its ``trainer`` and ``logger`` group choices, the
   overrides it was given for the trainer's hardware keys (:data:`SHARED_TRAINER_KEYS`) and for its
   loggers, and its ``seed`` — so ``trainer=gpu``, ``trainer=ddp_sim``, ``trainer.precision=…``,
   ``logger=csv`` or ``seed=7`` on an SAE run also train its transformer that way. Step counts, validation
   intervals and the like are each stage's own and do not carry over;
3. the stage's own overrides (``transformer_overrides``, ``cache_overrides``), which win over both; a group
   the stage chooses itself (``logger=csv``) drops the run's settings for that group (:func:`stage_overrides`).

Each upstream run writes its logs inside the run that built it (``<run>/upstream/<stage>/``): all ranks of
a DDP job agree on that folder, and the run's provenance stays in one place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from monosemantic.utils.checkpoint_io import AtomicCheckpointIO
from monosemantic.utils.hydra_utils import instantiate_callbacks, instantiate_loggers

log = logging.getLogger(__name__)

# trainer keys that describe the hardware and numerics a run asked for, not one stage's schedule
SHARED_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "sync_batchnorm", "plugins")
SHARED_GROUPS = ("trainer", "logger")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_shared(override: str) -> bool:
    """``trainer.<hardware key>=…`` and ``logger.<…>=…`` (the group choices themselves come from Hydra's
    record of the job, so ``trainer=…`` / ``logger=…`` are not taken twice)."""
    parts = _override_key(override).split(".")
    if len(parts) < 2:
        return False
    return parts[0] == "logger" or (parts[0] == "trainer" and parts[1] in SHARED_TRAINER_KEYS)


def stage_overrides(inherited: list[str], own: list[str]) -> list[str]:
    """The inherited settings, then the stage's own overrides. Where the stage chooses a group itself
    (``logger=csv``, ``trainer=gpu``), nothing of the run's for that group is kept: ``logger.wandb.project``
    would name a logger the stage no longer has. Otherwise the stage's key overrides simply come later."""
    own_groups = {_override_key(o) for o in own if _override_key(o) in SHARED_GROUPS}
    kept = [o for o in inherited if _override_key(o).split(".")[0] not in own_groups]
    return [*kept, *own]


def shared_overrides(cfg: DictConfig) -> list[str]:
    """The overrides that carry this run's trainer, logger and seed to the stages it builds.

    A config that was itself composed as an upstream stage carries them in ``inherited_overrides``. A
    top-level run reads them from Hydra's record of this job (its group choices and command-line
    overrides, sweep parameters included); a cache run has no trainer group, so only its seed carries.
    """
    if cfg.get("inherited_overrides"):
        return list(cfg.inherited_overrides)
    out: list[str] = []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        for group in SHARED_GROUPS:
            if group in cfg:
                out.append(f"{group}={hc.runtime.choices.get(group) or 'null'}")
        out += [o for o in hc.overrides.task if _is_shared(o)]
    if cfg.get("seed") is not None:
        out.append(f"seed={cfg.seed}")
    return out


def upstream_dir(parent: DictConfig, stage: str) -> Path:
    """The log folder of an upstream stage built by ``parent``: ``<run>/upstream/<stage>`` of the top-level
    run, also for a stage built by another upstream stage (``upstream_root``, set when it was composed)."""
    root = parent.get("upstream_root") or Path(parent.paths.output_dir) / "upstream"
    return Path(root) / stage


def compose_stage(config_name: str, overrides: list[str], parent: DictConfig, output_dir: Path) -> DictConfig:
    """Compose another entry point's config inside this run (GlobalHydra is initialised by the caller).

    ``overrides`` are applied after ``scale=<parent's>``; the caller's resolved ``scale`` and ``paths`` then
    replace the composed ones, and ``output_dir`` becomes the stage's run directory.
    """
    cfg = hydra.compose(config_name=config_name, overrides=[f"scale={parent.scale.name}", *overrides])
    with open_dict(cfg):
        cfg.scale = OmegaConf.create(OmegaConf.to_container(parent.scale, resolve=True))
        for key in ("root_dir", "data_dir", "log_dir"):
            cfg.paths[key] = str(parent.paths[key])
        cfg.paths.output_dir = str(output_dir)
    return cfg


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None,
                  loggers: list | None = None) -> tuple[L.Trainer, list]:
    """The run's trainer with its callbacks and loggers (``loggers``: these instead of ``cfg.logger``'s).
    Checkpoints are written by :class:`~monosemantic.utils.checkpoint_io.AtomicCheckpointIO` (whole or absent,
    whenever a kill comes) unless ``trainer.plugins`` names other plugins."""
    callbacks = instantiate_callbacks(cfg.get("callbacks")) + (extra_callbacks or [])
    loggers = instantiate_loggers(cfg.get("logger")) if loggers is None else loggers
    extra = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)
    return trainer, loggers


def trainer_facts(trainer: L.Trainer, cfg: DictConfig) -> dict:
    """What a stage was trained on, recorded with its artifact (a test checks the settings carried over)."""
    strategy = cfg.trainer.get("strategy")
    return {"accelerator": type(trainer.accelerator).__name__, "world_size": int(trainer.world_size),
            "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__,
            "configured_strategy": strategy if isinstance(strategy, str) or strategy is None
            else OmegaConf.to_container(strategy, resolve=True).get("_target_")}


def transformer_config(parent: DictConfig) -> DictConfig:
    """``experiment=transformer_1l`` with the parent's scale, paths, shared settings and, last,
    ``transformer_overrides``, logging into the parent's ``upstream/transformer_1l``."""
    overrides = ["experiment=transformer_1l",
                 *stage_overrides(shared_overrides(parent), list(parent.get("transformer_overrides") or []))]
    return compose_stage("train", overrides, parent, upstream_dir(parent, "transformer_1l"))


def cache_config(parent: DictConfig) -> DictConfig:
    """The cache stage at an SAE run's scale, with its shared settings (seed; on a GPU run the cache runs on
    the GPU too) and ``cache_overrides``."""
    inherited = shared_overrides(parent)
    overrides = [o for o in inherited if o.startswith("seed=")]
    if parent.trainer.get("accelerator") in ("gpu", "cuda"):
        overrides.append("device=cuda")
    overrides += list(parent.get("cache_overrides") or [])
    sub = compose_stage("cache_activations", overrides, parent, upstream_dir(parent, "cache_activations"))
    with open_dict(sub):
        sub.inherited_overrides = inherited  # the transformer it builds gets the SAE run's trainer and logger
        sub.upstream_root = str(upstream_dir(parent, ""))  # and logs beside it, in the SAE run's upstream/
        sub.transformer_overrides = list(parent.get("transformer_overrides") or [])
    return sub
