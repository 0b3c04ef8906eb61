"""The SAE stage (the main job): train an SAE on a shard set, evaluate it on held-out data, export it.

``run(cfg)`` is ``python src/train.py experiment=sae_4096``. It first runs the pre-flight
(``stages/preflight.py``). With ``data.shards=null`` it gets the shard set its scale implies
(``stages/cache.py``, which gets the transformer); with ``data=on_the_fly`` (the default at ``scale=paper``)
and ``data.model_dir=null``, the transformer alone. Both pass on this run's trainer, logger and seed. It
writes ``<run>/metrics.json`` (held-out metrics, the training window's densities, the
normalisation scale, λ on normalised and raw activations, skipped shards, the stages built or reused) and
``<run>/export/`` (SAELens layout), and prints a summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from monosemantic.evaluation import evaluate, lr_absent_reason, no_windows_reason, splice_transformer
from monosemantic.export import export_sae
from monosemantic.metrics import density_summary
from monosemantic.plots import save_density_histogram
from monosemantic.stages import artifacts, preflight
from monosemantic.stages import cache as cache_stage
from monosemantic.stages import transformer as transformer_stage
from monosemantic.stages.compose import build_trainer
from monosemantic.stages.summary import print_summary
from monosemantic.utils.hydra_utils import log_hyperparameters
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)


def union_skipped(all_ranks: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Damaged shards (:meth:`SkippedShards.as_tensor` layout: a flag per shard, then the unattributed count)
    summed over ranks after training, plus what this rank skipped since (its final evaluation)."""
    flags = ((all_ranks[:-1] > 0) | (after[:-1] > 0)).to(torch.int64)
    return torch.cat([flags, (all_ranks[-1] + after[-1] - before[-1]).reshape(1)])


def run(cfg: DictConfig) -> dict:
    timings: dict[str, float] = {}
    ledger: artifacts.Ledger = []
    report = preflight.check(cfg, "sae")  # before any stage runs: stops with the numbers if it cannot finish
    t0 = time.time()
    if preflight.on_the_fly(cfg):
        if not cfg.data.model_dir:
            with open_dict(cfg):
                cfg.data.model_dir = str(transformer_stage.ensure(cfg, ledger))
            timings["upstream stages"] = time.time() - t0
    elif cfg.data.shards is None:
        with open_dict(cfg):
            cfg.data.shards = str(cache_stage.for_sae_run(cfg, ledger))
        timings["upstream stages"] = time.time() - t0
    t0 = time.time()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    with open_dict(cfg):
        cfg.model.d_in = dm.d_in
    model = hydra.utils.instantiate(cfg.model)
    n_lr_windows = cfg.get("final_eval_lr_windows")
    transformer, why_not = splice_transformer(dm)
    lr_skip_val = why_not or no_windows_reason(dm)  # validation during training: data.lr_windows windows
    lr_skip = why_not or no_windows_reason(dm, n_lr_windows)  # the final evaluation: its own count
    for when, reason in (("during training", lr_skip_val), ("in the final evaluation", lr_skip)):
        if reason:
            log.warning("loss recovered is not measured %s: %s", when, reason)
    mean_acts = None
    if cfg.model.ablation == "mean":
        mean_acts = dm.sample_activations(65_536, seed=1).mean(0) / dm.scale
    model.attach_data(dm.scale, transformer, mean_acts, lr_skip_val)

    trainer, loggers = build_trainer(cfg)
    log_hyperparameters(cfg, loggers, {"data/norm_scale": dm.scale, "data/n_tokens": dm.manifest["n_tokens"],
                                       "model/l1_coeff_raw": cfg.model.l1_coeff / dm.scale})
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    timings["train SAE"] = time.time() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # every rank reads its own shards: the damaged ones any rank skipped (a collective, so before rank 0 goes on)
    skipped = trainer.strategy.reduce(dm.skipped.as_tensor().to(trainer.strategy.root_device), reduce_op="sum")
    skipped_before_eval = dm.skipped.as_tensor()
    skipped = skipped.cpu()
    if not trainer.is_global_zero:
        return metrics

    t0 = time.time()
    out = Path(cfg.paths.output_dir)
    device = trainer.strategy.root_device
    sae = model.sae.float()
    final = evaluate(sae, dm.stream("val", batch_size=8192, split_nodes=False),
                     dm.lr_loader(n_lr_windows) if lr_skip is None else None, transformer, dm.scale,
                     cfg.model.ablation, mean_acts, device)
    sae = sae.cpu()
    skipped = union_skipped(skipped, skipped_before_eval, dm.skipped.as_tensor())  # + what the final eval skipped
    skipped_names = [Path(u).name for u, n in zip(dm.skipped.urls, skipped.tolist()) if n]
    log10_density = torch.tensor(final.pop("log10_density"))
    save_density_histogram(log10_density, out / "plots" / "final_density.png", title="held-out feature density")
    window_fires, window_tokens = model.density_window()
    window = density_summary(window_fires, window_tokens)
    save_density_histogram(window["log10_density"], out / "plots" / "final_train_window_density.png",
                           title=f"training-window feature density ({window_tokens:,} tokens)")
    lr_windows = len(dm.lr_windows(n_lr_windows) or []) if lr_skip is None else 0
    export_dir = export_sae(
        sae, out / "export", dm.scale, dm.manifest.get("hook", "blocks.0.mlp.hook_post"),
        int(dm.manifest.get("n_ctx") or 0),
        extra_metadata={"l1_coeff": cfg.model.l1_coeff, "l1_reduction": cfg.model.l1_reduction,
                        "l1_coeff_raw": cfg.model.l1_coeff / dm.scale,
                        "dataset_path": dm.source, "val_shards": cfg.data.get("val_shards"),
                        "activation_source": "on_the_fly" if preflight.on_the_fly(cfg) else "cache",
                        "final_eval_lr_windows": lr_windows or None, "training_tokens": int(model.tokens_seen),
                        **({"on_the_fly": dm.recorded()} if preflight.on_the_fly(cfg) else {})},
        log10_density=log10_density)
    timings["eval + export"] = time.time() - t0
    final.update({
        "l1_coeff": cfg.model.l1_coeff, "l1_reduction": cfg.model.l1_reduction,
        # the loss is s²·(MSE_raw + (λ/s)·Σ f_raw): λ/s is the coefficient that acts on raw activations
        "norm_scale": dm.scale, "l1_coeff_raw": cfg.model.l1_coeff / dm.scale,
        "d_sae": cfg.model.d_sae, "training_tokens": int(model.tokens_seen),
        "dead_window_tokens": int(cfg.model.dead_window_tokens),
        # dead = silent for the whole dead window: measurable once training has seen that many tokens
        **({"train_dead_frac": float(model.dead_frac())}
           if int(model.tokens_seen) >= int(cfg.model.dead_window_tokens) else {}),
        "train_density_window_tokens": int(window_tokens), "train_dense_frac": float(window["dense_frac"]),
        **({"train_ultralow_frac": float(window["ultralow_frac"])} if "ultralow_frac" in window else {}),
        "lr_windows": lr_windows, "n_skipped_shards": len(skipped_names) + int(skipped[-1]),
        "skipped_shards": skipped_names,
        "stages": [r.as_dict() for r in ledger],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "export": str(export_dir), "shards": dm.source,
        "activation_source": "on_the_fly" if preflight.on_the_fly(cfg) else "cache",
        "preflight": report.as_dict()})
    absent = lr_absent_reason(final, lr_skip)
    if absent:
        if absent != lr_skip:
            log.warning("loss recovered is not measured in the final evaluation: %s", absent)
        final["loss_recovered_skipped"] = absent
    write_json_atomic(out / "metrics.json", final)
    print_summary(final, ledger, timings, export_dir, out / "metrics.json")
    metrics.update({f"final/{k}": v for k, v in final.items() if isinstance(v, float | int)})
    return metrics
