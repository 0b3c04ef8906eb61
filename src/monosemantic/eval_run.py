"""``src/eval.py``: load an SAE from a Lightning checkpoint or an export folder and compute every metric."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.evaluation import evaluate
from monosemantic.export import load_sae
from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.models.transformer_module import load_transformer
from monosemantic.summary import print_summary
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)


def load_any(path: Path) -> tuple[SparseAutoencoder, float, str | None, int | None]:
    """(sae, scale, shard dir, val_shards): the SAE, the scale its inputs need, the shard set it was trained
    on and how many of its shards that run held out.

    An export works on raw activations (scale 1, normalisation folded in); a Lightning checkpoint holds
    the SAE in the normalised space and the scale beside it.
    """
    if path.is_dir():
        sae, cfg = load_sae(path)
        meta = cfg.get("metadata", {})
        return sae, 1.0, meta.get("dataset_path"), meta.get("val_shards")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} is neither a checkpoint file nor an export folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for foreign files
        raise ValueError(f"{path} cannot be read as a Lightning checkpoint: {e}") from e
    state = ckpt.get("state_dict", {})
    if "sae.W_enc" not in state:
        raise ValueError(f"{path} is not an SAE checkpoint (no sae.W_enc in its state_dict)")
    d_in, d_sae = state["sae.W_enc"].shape
    sae = SparseAutoencoder(d_in, d_sae)
    sae.load_state_dict({k.removeprefix("sae."): v for k, v in state.items() if k.startswith("sae.")})
    scale = float(state.get("norm_scale_buf", torch.ones(())))
    dm_hparams = ckpt.get("datamodule_hyper_parameters") or {}
    return sae, scale, dm_hparams.get("shards"), dm_hparams.get("val_shards")


def run_eval(cfg: DictConfig) -> dict:
    path = Path(cfg.ckpt_path)
    sae, scale, shards, val_shards = load_any(path)
    shards = cfg.shards or shards
    val_shards = cfg.val_shards or val_shards or 1  # the run's own held-out split, unless overridden
    if not shards:
        raise ValueError(f"{path} records no shard set: pass shards=<dir>")
    dm = ActivationDataModule(shards=shards, batch_size=cfg.batch_size, val_shards=val_shards,
                              d_in=sae.W_enc.shape[0], normalize=False, lr_windows=cfg.lr_windows)
    dm.setup()
    transformer, mean_acts = None, None
    ckpt = (dm.manifest.get("model") or {}).get("checkpoint")
    if ckpt and Path(ckpt, "model.safetensors").is_file():
        transformer, _ = load_transformer(ckpt, cfg.device)
    else:
        log.warning("shard set %s names no loadable transformer: loss recovered is skipped", shards)
    if cfg.ablation == "mean":
        mean_acts = dm.sample_activations(65_536, seed=1).mean(0)
    # dm streams raw activations (normalize=False); evaluate() expects them in the SAE's input space
    acts = (x * scale for x in dm.stream("val", split_nodes=False))
    metrics = evaluate(sae, acts, dm.lr_loader(), transformer, scale, cfg.ablation, mean_acts, cfg.device)
    metrics.pop("log10_density", None)
    metrics.update({"ckpt_path": str(path), "shards": str(shards), "ablation": cfg.ablation})
    out = Path(cfg.output) if cfg.output else (
        path / "eval_metrics.json" if path.is_dir() else path.with_name(f"eval_{path.stem}.json"))
    write_json_atomic(out, metrics)
    print_summary(metrics, {"eval": metrics["eval_seconds"]}, path, out)
    return metrics
