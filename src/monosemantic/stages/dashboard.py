"""The dashboard stage, ``src/dashboard.py``: one pass of the transformer over text (held-out split first), the
SAE's features, the 512 neurons and a random-direction control accumulated side by side (``analysis.collect``);
the interpretability proxies (``analysis.interp``); a static HTML browser (``analysis.browser``) and, when a
W&B logger is configured, the same tables there."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from monosemantic.analysis.browser import token_strings, unit_pages, unit_rows, write_browser
from monosemantic.analysis.collect import CollectSettings, collect, random_directions
from monosemantic.analysis.interp import (
    PROXIES,
    ProxySettings,
    direct_logit_effect,
    proxies,
    summarize,
    summarize_by_density,
)
from monosemantic.plots import figure_png, proxy_distribution_figure, unit_density_figure
from monosemantic.stages.inputs import load_inputs, read_text
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)

MAX_CORRELATION_FEATURES = 16_384  # a dense [F, F] correlation table beyond this would not fit comfortably


@torch.no_grad()  # scoped to the stage; a global switch would leak into whatever runs next in the process
def run(cfg: DictConfig) -> dict:
    start = time.time()
    inp = load_inputs(cfg.ckpt_path, cfg.paths.log_dir, cfg.shards, cfg.transformer, cfg.token_store, cfg.device)
    sae, net, T = inp.sae, inp.transformer, inp.n_ctx
    tokens, next_tokens, by_split = read_text(inp.token_store, int(cfg.n_tokens), T)
    log.info("dashboard text: %s tokens from %s (%s), in %d windows of %d", f"{len(tokens):,}", inp.token_store,
             ", ".join(f"{v:,} {k}" for k, v in by_split.items()), len(tokens) // T, T)
    if len(tokens) < cfg.n_tokens:
        log.warning("the token store holds only %s tokens; asked for n_tokens=%s", f"{len(tokens):,}",
                    f"{cfg.n_tokens:,}")

    settings = CollectSettings(**cfg.collect)
    correlations = bool(cfg.correlations) and sae.d_sae <= MAX_CORRELATION_FEATURES
    if cfg.correlations and not correlations:
        log.info("most-correlated features skipped: %d features > %d", sae.d_sae, MAX_CORRELATION_FEATURES)
    control_MC = random_directions(sae.d_in, int(cfg.n_control), settings.seed).to(cfg.device)
    unit_sets = {
        "features": (sae.encode, sae.d_sae, correlations),
        "neurons": (lambda a: a, sae.d_in, False),
        # the control: random unit directions through a ReLU, read from the SAE's encoder input like its features
        # (x − b_dec, or x for a recipe without pre-encoder bias)
        "control": (lambda a: F.relu(sae.encoder_input(a) @ control_MC), control_MC.shape[1], False),
    }
    stats = collect(net.mlp_acts, tokens, T, unit_sets, net.cfg.vocab_size, settings,
                    batch_windows=int(cfg.batch_windows), progress=cfg.get("progress", True), device=cfg.device)
    pass_s = time.time() - start

    directions = {"features": sae.W_dec.detach().T, "neurons": torch.eye(sae.d_in), "control": control_MC}
    effects = {k: direct_logit_effect(net, d).cpu() for k, d in directions.items()}
    psettings = ProxySettings(**cfg.proxies)
    values = {k: proxies(stats[k], tokens, next_tokens, T, effects[k], psettings) for k in stats}
    summary = {k: summarize(v) for k, v in values.items()}
    by_density = {k: summarize_by_density(v, stats[k].density.float()) for k, v in values.items()}
    for k, s in summary.items():
        log.info("%s: %d/%d units fired ≥ %d times; medians %s", k, s["n_eligible"], s["n_units"],
                 settings.n_sample, ", ".join(f"{p} {s.get(p + '_median', float('nan')):.3f}" for p in PROXIES))

    vocab = token_strings(inp.tokenizer, net.cfg.vocab_size)
    shown = ("features", "neurons")
    tables = {k: unit_rows(stats[k], tokens, vocab, values[k]) for k in shown}
    corr = stats["features"].correlation()
    pages = {"features": unit_pages(stats["features"], tokens, T, effects["features"], settings.ctx_before,
                                    decoder_FM=sae.W_dec.detach().cpu(), corr_FF=corr),
             "neurons": unit_pages(stats["neurons"], tokens, T, effects["neurons"], settings.ctx_before)}
    density_png = figure_png(unit_density_figure({k: stats[k].density for k in shown}, len(tokens)))
    proxy_png = figure_png(proxy_distribution_figure(values, PROXIES))
    result = {"sae_path": str(inp.sae_path), "transformer": str(inp.transformer_dir), "n_tokens": len(tokens),
              "tokens_by_split": by_split, "n_sample": settings.n_sample, "proxy_summary": summary,
              "proxy_by_density": by_density,
              "dead_features": int((stats["features"].n_fires == 0).sum()), "pass_seconds": round(pass_s, 1)}
    run_dir = inp.sae_path.parent if inp.sae_path.name == "export" else inp.sae_path.parent.parent
    meta = {**result, "sae_name": f"{run_dir.parent.parent.name}/{run_dir.name}",
            "d_sae": sae.d_sae, "d_mlp": sae.d_in, "ctx_before": settings.ctx_before,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round(time.time() - start, 1)}
    out_dir = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / "browser"
    index = write_browser(out_dir, meta, vocab, tables, pages, {"density": density_png, "proxies": proxy_png},
                          files={"density.png": density_png, "proxies.png": proxy_png})
    result["wall_seconds"] = round(time.time() - start, 1)
    result["index"] = str(index)
    write_json_atomic(Path(cfg.paths.output_dir) / "dashboard.json", result)
    if cfg.get("logger"):
        log_to_wandb(cfg, tables, vocab, stats, summary)
    log.info("feature browser: %s (%s tokens, %.0f s; pass %.0f s)", index, f"{len(tokens):,}",
             result["wall_seconds"], pass_s)
    print(f"feature browser: file://{index.resolve()}")
    return result


def log_to_wandb(cfg: DictConfig, tables: dict, vocab: list[str], stats: dict, summary: dict) -> None:
    """The same tables to W&B (one row per unit), the density histograms and the proxy medians."""
    import wandb

    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c and "_target_" in c]
    for lg in loggers:
        run = getattr(lg, "experiment", None)
        if not isinstance(run, wandb.sdk.wandb_run.Run):
            log.info("logger %s: the dashboard logs tables to W&B only", type(lg).__name__)
            continue
        run.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)
        for kind, t in tables.items():
            cols = ["id", "label", "density", "n_fires", "max", "mean", "top_tokens", *PROXIES]
            rows = [[i, t["label"][i], t["density"][i], t["n_fires"][i], t["max"][i], t["mean"][i],
                     json.dumps([vocab[tok] for tok, _ in t["top_tokens"][i]]), *(t[p][i] for p in PROXIES)]
                    for i in range(len(t["density"]))]
            run.log({f"dashboard/{kind}": wandb.Table(columns=cols, data=rows),
                     f"dashboard/{kind}_log10_density": wandb.Histogram(
                         torch.log10(stats[kind].density.clamp_min(1e-10)).numpy())})
        run.summary.update({f"dashboard/{k}/{m}": v for k, s in summary.items() for m, v in s.items()})
