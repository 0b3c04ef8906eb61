"""The SAE stages: caching activations (building the transformer first when needed) and training the SAE."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from monosemantic.cache import CacheSettings, cache_dir_for, write_activation_cache
from monosemantic.evaluation import evaluate
from monosemantic.export import export_sae
from monosemantic.metrics import save_density_histogram
from monosemantic.models.transformer_module import load_transformer
from monosemantic.pipeline import build_trainer, compose_stage, ensure_transformer
from monosemantic.summary import print_summary
from monosemantic.utils.hydra_utils import log_hyperparameters
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)


def ensure_shards(cfg: DictConfig, timings: dict | None = None) -> Path:
    """The shard set a ``cache_activations`` config describes; built (with its transformer) if missing."""
    timings = {} if timings is None else timings
    t0 = time.time()
    model_dir = cfg.model_dir
    if model_dir is None:
        model_dir = ensure_transformer(cfg, list(cfg.transformer_overrides))
    timings["tokenize + transformer"] = time.time() - t0
    t0 = time.time()
    settings = CacheSettings(**OmegaConf.to_container(cfg.settings, resolve=True))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else cache_dir_for(model_dir, settings,
                                                                   Path(cfg.paths.data_dir) / "activations")
    out = write_activation_cache(model_dir, out_dir, settings, device=cfg.device,
                                 direct_io=cfg.get("direct_io", True))
    timings["cache activations"] = time.time() - t0
    return out


def default_shards(cfg: DictConfig, timings: dict) -> Path:
    """For an SAE run with ``data.shards=null``: compose the cache stage at the same scale and build it."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    overrides = list(cfg.get("cache_overrides", []))
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not any(o.startswith("device=") for o in overrides):
        overrides.append("device=cuda")  # cache on the GPU the SAE trains on
    sub = compose_stage("cache_activations", overrides,
                        Path(cfg.paths.log_dir) / "cache_activations" / "runs" / f"{stamp}_upstream", cfg)
    with open_dict(sub):
        sub.transformer_overrides = list(cfg.get("transformer_overrides") or [])
    return ensure_shards(sub, timings)


def train_sae(cfg: DictConfig) -> dict:
    timings: dict[str, float] = {}
    if cfg.data.shards is None:
        with open_dict(cfg):
            cfg.data.shards = str(default_shards(cfg, timings))
    t0 = time.time()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    with open_dict(cfg):
        cfg.model.d_in = dm.d_in
    model = hydra.utils.instantiate(cfg.model)

    ckpt = (dm.manifest.get("model") or {}).get("checkpoint")
    transformer = None
    if ckpt and Path(ckpt, "model.safetensors").is_file():
        transformer, _ = load_transformer(ckpt)
    else:
        log.warning("shard set %s names no loadable transformer: loss recovered is skipped", dm.shards_dir)
    mean_acts = None
    if cfg.model.ablation == "mean":
        mean_acts = dm.sample_activations(65_536, seed=1).mean(0) / dm.scale
    model.attach_data(dm.scale, transformer, mean_acts)

    trainer, loggers = build_trainer(cfg)
    log_hyperparameters(cfg, loggers, {"data/norm_scale": dm.scale, "data/n_tokens": dm.manifest["n_tokens"]})
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    timings["train SAE"] = time.time() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if not trainer.is_global_zero:
        return metrics

    t0 = time.time()
    out = Path(cfg.paths.output_dir)
    sae = model.sae.float().cpu()
    val_acts = dm.stream("val", batch_size=8192, split_nodes=False)
    final = evaluate(sae, val_acts, dm.lr_loader(cfg.get("final_eval_lr_windows")), transformer, dm.scale,
                     cfg.model.ablation, mean_acts)
    log10_density = torch.tensor(final.pop("log10_density"))
    save_density_histogram(log10_density, out / "plots" / "final_density.png", title="held-out feature density")
    export_dir = export_sae(
        sae, out / "export", dm.scale, dm.manifest.get("hook", "blocks.0.mlp.hook_post"),
        int(dm.manifest.get("n_ctx") or 0),
        extra_metadata={"l1_coeff": cfg.model.l1_coeff, "l1_reduction": cfg.model.l1_reduction,
                        "dataset_path": str(dm.shards_dir), "val_shards": int(cfg.data.val_shards),
                        "training_tokens": int(model.tokens_seen)},
        log10_density=log10_density)
    timings["eval + export"] = time.time() - t0
    final.update({"l1_coeff": cfg.model.l1_coeff, "l1_reduction": cfg.model.l1_reduction,
                  "d_sae": cfg.model.d_sae, "training_tokens": int(model.tokens_seen),
                  "train_dead_frac": float(model.dead_frac()), "dead_window_tokens": cfg.model.dead_window_tokens,
                  "timings_s": {k: round(v, 1) for k, v in timings.items()},
                  "export": str(export_dir), "shards": str(dm.shards_dir)})
    write_json_atomic(out / "metrics.json", final)
    print_summary(final, timings, export_dir, out / "metrics.json")
    metrics.update({f"final/{k}": v for k, v in final.items() if isinstance(v, float | int)})
    return metrics
