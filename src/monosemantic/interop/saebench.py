"""SAEBench's core evaluation on our transformer, SAE and held-out text, beside our own metrics.

Differences in definitions (both computed on the same token windows):

- L0: identical (features > 0 per token, mean over tokens).
- Explained variance: ours is ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (variance about the mean activation vector,
  pooled over tokens). SAEBench 0.6's ``explained_variance`` subtracts ``(mean_d E[x_d²])²`` from
  ``E‖x‖²`` instead of ``‖E x‖²``; its ``explained_variance_legacy`` averages the per-token ratio against
  each batch's mean. On post-ReLU MLP activations (non-negative, far from zero mean) the three differ;
  :func:`saebench_explained_variance` recomputes SAEBench's formula so a test can pin it.
- CE loss score = our loss recovered (zero ablation); SAEBench's CE losses are means over positions
  0..T−2, as ours. KL: SAEBench averages over every position (the last too), ours over 0..T−2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def windows_dataset(tokens_NT: np.ndarray | torch.Tensor):
    """A ``datasets.Dataset`` of pre-tokenized windows (column ``input_ids``), for SAELens's
    ``ActivationsStore``: rows are used as given, no BOS added, no re-chunking."""
    from datasets import Dataset

    arr = np.asarray(tokens_NT, dtype=np.int64)
    return Dataset.from_dict({"input_ids": arr.tolist()})


def run_core(sae, model, tokens_NT: np.ndarray | torch.Tensor, batch_prompts: int = 8) -> dict[str, float]:
    """``sae_bench.evals.core.main.run_evals`` over all of ``tokens_NT`` (``N`` a multiple of
    ``batch_prompts``); returns its metrics flattened (``group/name``)."""
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import run_evals
    from sae_lens import ActivationsStore

    n, t = np.asarray(tokens_NT).shape
    if n % batch_prompts:
        raise ValueError(f"{n} windows is not a multiple of batch_prompts={batch_prompts}")
    store = ActivationsStore.from_sae(model, sae, dataset=windows_dataset(tokens_NT), context_size=t,
                                      streaming=False, store_batch_size_prompts=batch_prompts,
                                      n_batches_in_buffer=1, device=str(sae.device))
    cfg = CoreEvalConfig(batch_size_prompts=batch_prompts, n_eval_reconstruction_batches=n // batch_prompts,
                         n_eval_sparsity_variance_batches=n // batch_prompts, context_size=t, compute_kl=True,
                         compute_ce_loss=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
                         compute_l2_norms=False, compute_featurewise_density_statistics=False,
                         compute_featurewise_weight_based_metrics=False)
    # SAEBench 0.6 reads SAELens 5's flat config (cfg.hook_name, hook_layer, hook_head_index); SAELens 6 keeps
    # them under cfg.metadata. Copy them up (our SAEs hook layer 0's MLP) rather than pin an old SAELens.
    meta = sae.cfg.metadata
    for name, value in (("hook_name", meta.hook_name), ("hook_layer", int(meta.hook_name.split(".")[1])),
                        ("hook_head_index", getattr(meta, "hook_head_index", None))):
        if not hasattr(sae.cfg, name):
            setattr(sae.cfg, name, value)
    metrics, _ = run_evals(sae, store, model, cfg)
    return {f"{group}/{k}": float(v) for group, vals in metrics.items() for k, v in vals.items()}


def saebench_explained_variance(x_NM: torch.Tensor, x_hat_NM: torch.Tensor) -> float:
    """SAEBench 0.6's ``explained_variance`` formula on one batch, in float64."""
    x, r = x_NM.double(), (x_NM - x_hat_NM).double()
    total = x.square().sum(-1).mean() - x.square().mean(0).mean().square()
    return float(1 - r.square().sum(-1).mean() / total)


def our_metrics(export_dir: str | Path, transformer_dir: str | Path, tokens_NT: np.ndarray) -> dict[str, float]:
    """Our own metrics (monosemantic.evaluation) on the same windows: activations at every position."""
    from monosemantic.evaluation import evaluate
    from monosemantic.export import load_sae
    from monosemantic.models.transformer_module import load_transformer

    sae, _ = load_sae(export_dir)
    net, _ = load_transformer(transformer_dir)
    batches = torch.as_tensor(np.asarray(tokens_NT, dtype=np.int64)).split(8)
    with torch.no_grad():
        acts = [net.mlp_acts(b).flatten(0, 1) for b in batches]
    return evaluate(sae, acts, batches, net)
