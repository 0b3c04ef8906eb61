"""The stages of DESIGN §1 as functions of a composed config, and the artifact store that links them.

Each stage's output lives under ``data/`` in a folder keyed by the config that made it, so a second run
reuses it and a changed config builds a new one. A stage whose input is missing builds it first by
composing that stage's own config (``hydra.compose``) with the same ``scale``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from monosemantic.data.token_store import load_split, unigram_entropy
from monosemantic.models.transformer_module import export_transformer
from monosemantic.utils.hydra_utils import (
    config_key,
    finish_wandb,
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
)

log = logging.getLogger(__name__)


def _without_data_dir(d: dict) -> dict:
    """Drop the artifact root, so a key depends on settings, not on where the repo lives. Explicit sources
    (``data.store_dir``, ``data.corpus.root``) stay in: another store must give another transformer."""
    return {k: _without_data_dir(v) if isinstance(v, dict) else v for k, v in d.items() if k != "data_dir"}


def transformer_dir(cfg: DictConfig) -> Path:
    """Where the transformer trained by this config is (or will be) exported."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c["model"]["net"].pop("vocab_size", None)  # filled in from the token store, which data already keys
    # the trainer settings that change what is learned: steps, and the world size (DDP multiplies the batch)
    trainer = {k: c["trainer"].get(k) for k in ("max_steps", "devices", "num_nodes", "strategy", "precision")}
    key = config_key({"data": _without_data_dir(c["data"]), "model": c["model"], "seed": c.get("seed"),
                      "trainer": trainer})
    return Path(cfg.paths.data_dir) / "models" / f"transformer_1l-{cfg.scale.name}-{key}"


def compose_stage(config_name: str, overrides: list[str], output_dir: Path, parent: DictConfig) -> DictConfig:
    """Compose another entry point's config inside this run (GlobalHydra is initialised by the caller).

    The caller's resolved ``scale`` and ``paths`` replace the composed ones, so ``scale.*`` overrides given
    to this run (e.g. ``scale.cache.n_contexts=1000``) and its ``paths.data_dir`` reach the stages it builds.
    """
    cfg = hydra.compose(config_name=config_name, overrides=[f"scale={parent.scale.name}", *overrides])
    with open_dict(cfg):
        cfg.scale = OmegaConf.create(OmegaConf.to_container(parent.scale, resolve=True))
        for key in ("root_dir", "data_dir", "log_dir"):
            cfg.paths[key] = str(parent.paths[key])
        cfg.paths.output_dir = str(output_dir)
    return cfg


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> tuple[L.Trainer, list]:
    callbacks = instantiate_callbacks(cfg.get("callbacks")) + (extra_callbacks or [])
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return trainer, loggers


def train_transformer(cfg: DictConfig) -> dict:
    """Tokenize (if needed), train the one-layer transformer, export it and register it under data/models."""
    start = time.time()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    with open_dict(cfg):
        cfg.model.net.vocab_size = dm.vocab_size
    model = hydra.utils.instantiate(cfg.model)
    trainer, loggers = build_trainer(cfg)
    dm.setup("fit")
    h_unigram = unigram_entropy(load_split(dm.store_dir, "val"), dm.vocab_size)
    log_hyperparameters(cfg, loggers, {"data/store_dir": str(dm.store_dir), "data/unigram_entropy": h_unigram})
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not trainer.is_global_zero:
        return metrics
    val_loss = metrics.get("val/loss")
    info = {
        "token_store": str(Path(dm.store_dir).resolve()), "n_ctx": int(cfg.data.n_ctx),
        "trained_tokens": int(trainer.global_step * cfg.data.batch_size * cfg.data.n_ctx
                              * trainer.world_size),
        "val_loss": val_loss, "val_unigram_entropy": h_unigram, "seed": cfg.get("seed"),
        "corpus": dm.meta["corpus"], "wall_time_s": round(time.time() - start, 1),
    }
    out = Path(cfg.paths.output_dir)
    net = model.net.to("cpu")
    export_transformer(net, out / "export", dm.tokenizer_path, info)
    export_transformer(net, transformer_dir(cfg), dm.tokenizer_path, info)
    metrics["val/unigram_entropy"] = h_unigram
    log.info("val loss %.4f nats/token vs unigram entropy %.4f; exported to %s and %s",
             val_loss if val_loss is not None else float("nan"), h_unigram, out / "export", transformer_dir(cfg))
    return metrics


def ensure_transformer(parent: DictConfig, overrides: list[str]) -> Path:
    """The exported transformer for ``experiment=transformer_1l scale=<scale>``; trained first if missing."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    sub = compose_stage("train", ["experiment=transformer_1l", *overrides],
                        Path(parent.paths.log_dir) / "transformer_1l" / "runs" / f"{stamp}_upstream", parent)
    path = transformer_dir(sub)
    if (path / "model.safetensors").is_file():
        log.info("transformer found: %s", path)
        return path
    log.info("no transformer for scale=%s yet: training it first (%s)", parent.scale.name, sub.paths.output_dir)
    Path(sub.paths.output_dir).mkdir(parents=True, exist_ok=True)
    try:
        train_transformer(sub)
    finally:
        finish_wandb()
    return path


def run_training(cfg: DictConfig) -> dict:
    """Dispatch on ``stage`` (set by the experiment); each stage's W&B run is finished when it ends, so a
    multirun job or an upstream stage built inside this run never writes into another's run."""
    stage = cfg.get("stage")
    if cfg.get("ckpt_path") == "last" and not (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file():
        raise FileNotFoundError(
            f"ckpt_path=last: {cfg.paths.output_dir}/checkpoints/last.ckpt does not exist. Each run gets a new "
            "directory: resume in the old one with hydra.run.dir=logs/<task>/runs/<stamp> ckpt_path=last")
    try:
        if stage == "transformer":
            return train_transformer(cfg)
        if stage == "sae":
            from monosemantic.sae_pipeline import train_sae

            return train_sae(cfg)
        raise ValueError(f"stage={stage!r} is not 'transformer' or 'sae' (set by the experiment config)")
    finally:
        finish_wandb()
