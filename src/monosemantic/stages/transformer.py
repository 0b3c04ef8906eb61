"""The transformer stage: tokenize (if needed) and train the one-layer transformer, export it.

``run(cfg)`` is ``python src/train.py experiment=transformer_1l``. ``ensure(parent, ...)`` is how a later
stage gets the transformer its config implies: reused from ``data/models/<key>``, or trained first with the
parent's shared settings (``stages/compose.py``). The export goes to ``<run>/export`` and, atomically, to the
registry folder under ``data/models`` that later stages read.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from monosemantic.data.corpus import CorpusConfig
from monosemantic.data.token_store import build_token_store, is_complete, load_split, store_dir_for, unigram_entropy
from monosemantic.data.tokenizer import TokenizerConfig
from monosemantic.models.transformer_module import export_transformer
from monosemantic.stages import artifacts, preflight
from monosemantic.stages.compose import build_trainer, trainer_facts, transformer_config
from monosemantic.utils.hydra_utils import finish_wandb, log_hyperparameters

log = logging.getLogger(__name__)


def ensure_token_store(cfg: DictConfig, ledger: artifacts.Ledger | None = None) -> Path:
    """The token store ``cfg.data`` describes (``data.store_dir``, or the one keyed by corpus + tokenizer),
    built under the artifact store's lock if missing."""
    if cfg.data.get("store_dir"):
        return Path(cfg.data.store_dir)
    corpus = CorpusConfig(**cfg.data.corpus)
    tok = TokenizerConfig(**cfg.data.tokenizer)
    path = store_dir_for(corpus, tok, cfg.data.data_dir, cfg.data.val_fraction)
    return artifacts.ensure("token store", path, is_complete,
                            lambda: build_token_store(corpus, tok, cfg.data.data_dir, cfg.data.val_fraction), ledger)


def train(cfg: DictConfig, ledger: artifacts.Ledger | None = None) -> dict:
    """Train, validate at the end, export to the run directory and the registry; returns the metrics."""
    start = time.time()
    registry = artifacts.transformer_dir(cfg)  # before the token store path is filled in: keyed by the config
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    dm = hydra.utils.instantiate(cfg.data)
    dm.store_dir = ensure_token_store(cfg, ledger)
    dm.prepare_data()
    with open_dict(cfg):
        cfg.model.net.vocab_size = dm.vocab_size
    model = hydra.utils.instantiate(cfg.model)
    trainer, loggers = build_trainer(cfg)
    dm.setup("fit")
    h_unigram = unigram_entropy(load_split(dm.store_dir, "val"), dm.vocab_size)
    log_hyperparameters(cfg, loggers, {"data/store_dir": str(dm.store_dir), "data/unigram_entropy": h_unigram})
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    if model.validated_at_step != trainer.global_step:
        # a run shorter than val_check_interval, or one that stopped between two validations
        log.info("validating the final weights (step %d; last validation: %s)", trainer.global_step,
                 model.validated_at_step)
        trainer.validate(model, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    val_loss = metrics.get("val/loss")
    if val_loss is None or not math.isfinite(val_loss):
        raise RuntimeError(f"the transformer's val/loss is {val_loss} after training: nothing to register "
                           f"(check data.val_windows and the val split of {dm.store_dir})")
    metrics["val/unigram_entropy"] = h_unigram
    if trainer.is_global_zero:
        info = {
            "token_store": str(Path(dm.store_dir).resolve()), "n_ctx": int(cfg.data.n_ctx),
            "trained_tokens": int(trainer.global_step * cfg.data.batch_size * cfg.data.n_ctx * trainer.world_size),
            "val_loss": val_loss, "val_unigram_entropy": h_unigram, "seed": cfg.get("seed"),
            "trainer": trainer_facts(trainer, cfg), "corpus": dm.meta["corpus"],
            "wall_time_s": round(time.time() - start, 1),
        }
        net = model.net.to("cpu")
        out = Path(cfg.paths.output_dir)
        export_transformer(net, out / "export", dm.tokenizer_path, info)
        # under the registry's lock: a direct `experiment=transformer_1l` run replaces a registered model only
        # when no other job is building or replacing it (an upstream build already holds it, re-entrantly)
        with artifacts.file_lock(registry):
            export_transformer(net, registry, dm.tokenizer_path, info)
        log.info("val loss %.4f nats/token vs unigram entropy %.4f; exported to %s and %s", val_loss, h_unigram,
                 out / "export", registry)
    trainer.strategy.barrier("transformer-export")  # every rank may read the registry after this
    return metrics


def run(cfg: DictConfig) -> dict:
    """``experiment=transformer_1l``: always trains (the registry copy is replaced whole)."""
    report = preflight.check(cfg, "transformer")
    metrics = train(cfg)
    if report.lines:
        metrics["preflight"] = report.as_dict()
    return metrics


upstream_config = transformer_config  # the transformer an upstream stage builds (stages/compose.py)


def ensure(parent: DictConfig, ledger: artifacts.Ledger | None = None) -> Path:
    """The transformer :func:`upstream_config` describes; trained first if the registry has none."""
    sub = upstream_config(parent)
    path = artifacts.transformer_dir(sub)

    def build() -> None:
        log.info("no transformer for these settings yet: training it (logs in %s)", sub.paths.output_dir)
        Path(sub.paths.output_dir).mkdir(parents=True, exist_ok=True)
        try:
            train(sub, ledger)
        finally:
            finish_wandb()  # the upstream stage's W&B run ends with it

    # more than one rank: a DDP fit that every rank of this launch runs (rank 0 under the lock)
    ranks = artifacts.world_size(OmegaConf.to_container(sub.trainer, resolve=True))
    return artifacts.ensure("transformer", path, artifacts.transformer_complete, build, ledger, multi_rank=ranks > 1)
