"""The eval stage, ``src/eval.py``: load an SAE from a Lightning checkpoint or an export folder and compute
every metric on the held-out split the training run used, with as many loss-recovered windows as that
run's own final evaluation (both recorded by the run; overridable), and write them as JSON."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.data.onthefly import RECORDED, SOURCE_PREFIX, OnTheFlyDataModule, source_model_dir
from monosemantic.errors import ConfigError, MissingInputError
from monosemantic.evaluation import evaluate, lr_absent_reason, no_windows_reason, splice_transformer
from monosemantic.export import load_sae
from monosemantic.models.components.sae import SparseAutoencoder, build_sae
from monosemantic.stages.summary import print_summary
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)


DEFAULT_LR_WINDOWS = 256  # for an SAE whose training run recorded no count


def load_any(path: Path) -> tuple[SparseAutoencoder, float, dict]:
    """(sae, scale, recorded): the SAE, the scale its inputs need, and what its training run recorded:
    ``shards`` (the set it trained on), ``val_shards`` (how many it held out) and ``lr_windows`` (the
    loss-recovered windows of its final evaluation), each None when not recorded.

    An export works on raw activations (scale 1, normalisation folded in); a Lightning checkpoint holds
    the SAE in the normalised space and the scale beside it.
    """
    if path.is_dir():
        sae, cfg = load_sae(path)
        meta = cfg.get("metadata", {})
        return sae, 1.0, {"shards": meta.get("dataset_path"), "val_shards": meta.get("val_shards"),
                          "lr_windows": meta.get("final_eval_lr_windows"), "on_the_fly": meta.get("on_the_fly")}
    if not path.is_file():
        raise MissingInputError(f"ckpt_path={path} is neither a checkpoint file nor an export folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for foreign files
        raise ConfigError(f"{path} cannot be read as a Lightning checkpoint: {e}") from e
    state = ckpt.get("state_dict", {})
    if "sae.W_enc" not in state:
        raise ConfigError(f"{path} is not an SAE checkpoint (no sae.W_enc in its state_dict)")
    d_in, d_sae = state["sae.W_enc"].shape
    hp = ckpt.get("hyper_parameters") or {}
    sae = build_sae(int(d_in), int(d_sae), hp.get("architecture", "standard"), k=hp.get("k"),
                    widths=hp.get("matryoshka_widths"), pre_encoder_bias=hp.get("pre_encoder_bias", True),
                    normalize_decoder=hp.get("normalize_decoder", True))
    sae.load_state_dict({k.removeprefix("sae."): v for k, v in state.items() if k.startswith("sae.")})
    scale = float(state.get("norm_scale_buf", torch.ones(())))
    dm_hparams = ckpt.get("datamodule_hyper_parameters") or {}
    # <run>/checkpoints/x.ckpt: the run's resolved config, written when it started, has its final-eval setting
    run_cfg = path.parent.parent / "config_resolved.yaml"
    lr_windows = OmegaConf.load(run_cfg).get("final_eval_lr_windows") if run_cfg.is_file() else None
    on_the_fly = {k: dm_hparams[k] for k in RECORDED} if dm_hparams.get("model_dir") else None
    source = dm_hparams.get("shards") or (SOURCE_PREFIX + on_the_fly["model_dir"] if on_the_fly else None)
    return sae, scale, {"shards": source,
                        "val_shards": dm_hparams.get("val_shards"), "lr_windows": lr_windows,
                        "on_the_fly": on_the_fly}


def run(cfg: DictConfig) -> dict:
    path = Path(cfg.ckpt_path)
    sae, scale, recorded = load_any(path)
    shards = cfg.shards or recorded["shards"]
    val_shards = cfg.val_shards or recorded["val_shards"] or 1  # the run's own held-out split, unless overridden
    # a recorded 0 or None: the run measured no loss recovered, which says nothing about how many windows to use
    lr_windows = cfg.lr_windows if cfg.lr_windows is not None else (recorded["lr_windows"] or None)
    if lr_windows is None:
        log.info("%s records no loss-recovered window count (its run's resolved config or export metadata): "
                 "using %d; set lr_windows= to choose", path, DEFAULT_LR_WINDOWS)
        lr_windows = DEFAULT_LR_WINDOWS
    else:
        log.info("loss recovered on %d held-out windows (%s)", lr_windows,
                 "lr_windows=" if cfg.lr_windows is not None else "as the training run's final evaluation")
    if not shards:
        raise ConfigError(f"{path} records no shard set: pass shards=<dir>")
    if source_model_dir(shards) and not cfg.shards:  # trained on the fly: the same held-out documents again
        if not recorded["on_the_fly"]:
            log.warning("%s records no on-the-fly settings: the held-out activations use the defaults "
                        "(tokens_per_context, val_tokens), not necessarily the training run's", path)
        dm = OnTheFlyDataModule(**(recorded["on_the_fly"] or {"model_dir": source_model_dir(shards)}),
                                batch_size=cfg.batch_size, val_batch_size=cfg.batch_size, d_in=sae.W_enc.shape[0],
                                normalize=False, lr_windows=lr_windows, device=cfg.device)
    else:
        dm = ActivationDataModule(shards=shards, batch_size=cfg.batch_size, val_shards=val_shards,
                                  d_in=sae.W_enc.shape[0], normalize=False, lr_windows=lr_windows)
    dm.setup()
    transformer, why_not = splice_transformer(dm, cfg.device)
    lr_skip = why_not or no_windows_reason(dm)
    if lr_skip:
        log.warning("loss recovered is not measured: %s", lr_skip)
    mean_acts = dm.sample_activations(65_536, seed=1).mean(0) if cfg.ablation == "mean" else None
    # dm streams raw activations (normalize=False); evaluate() expects them in the SAE's input space
    acts = (x * scale for x in dm.stream("val", split_nodes=False))
    metrics = evaluate(sae, acts, dm.lr_loader() if lr_skip is None else None, transformer, scale, cfg.ablation,
                       mean_acts, cfg.device)
    metrics.pop("log10_density", None)
    metrics.update({"ckpt_path": str(path), "shards": str(shards),
                    "val_shards": None if source_model_dir(shards) else int(val_shards),
                    "ablation": cfg.ablation, "lr_windows": len(dm.lr_windows() or []) if lr_skip is None else 0,
                    "n_skipped_shards": dm.n_skipped, "skipped_shards": dm.skipped.names()})
    absent = lr_absent_reason(metrics, lr_skip)
    if absent:
        if absent != lr_skip:
            log.warning("loss recovered is not measured: %s", absent)
        metrics["loss_recovered_skipped"] = absent
    out = Path(cfg.output) if cfg.output else (
        path / "eval_metrics.json" if path.is_dir() else path.with_name(f"eval_{path.stem}.json"))
    write_json_atomic(out, metrics)
    print_summary(metrics, [], {"eval": metrics["eval_seconds"]}, path, out)
    return metrics
