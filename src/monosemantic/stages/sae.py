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

import itertools
import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from monosemantic.data.synthetic import load_directions
from monosemantic.errors import ConfigError
from monosemantic.evaluation import (
    evaluate,
    lr_absent_reason,
    no_windows_reason,
    splice_transformer,
    too_small_warnings,
)
from monosemantic.export import export_sae
from monosemantic.metrics import density_summary, ground_truth_recovery
from monosemantic.models.sae_sweep import SAESweepModule
from monosemantic.plots import save_density_histogram
from monosemantic.stages import artifacts, preflight
from monosemantic.stages import cache as cache_stage
from monosemantic.stages import transformer as transformer_stage
from monosemantic.stages.compose import build_trainer
from monosemantic.stages.summary import print_summary, print_sweep_table, sweep_row
from monosemantic.utils.hydra_utils import instantiate_loggers, log_hyperparameters
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)
_MISSING = object()


def union_skipped(all_ranks: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Damaged shards (:meth:`SkippedShards.as_tensor` layout: a flag per shard, then the unattributed count)
    summed over ranks after training, plus what this rank skipped since (its final evaluation)."""
    flags = ((all_ranks[:-1] > 0) | (after[:-1] > 0)).to(torch.int64)
    return torch.cat([flags, (all_ranks[-1] + after[-1] - before[-1]).reshape(1)])


def bounded_objective(final: dict, spec: DictConfig | dict | None) -> float | None:
    """A sweeper's objective, fidelity at a bounded L0 (``hparams_search=sae_optuna``):
    ``final[spec.fidelity] − max(0, L0 / spec.max_l0 − 1)``; None without a spec. A fidelity the run did not
    measure (loss recovered with no transformer behind the shards) is an error naming the key."""
    if not spec:
        return None
    key, max_l0 = spec.get("fidelity", "loss_recovered"), float(spec["max_l0"])
    if key not in final:
        raise ConfigError(f"objective.fidelity={key!r} was not measured by this run (measured: "
                       f"{sorted(k for k, v in final.items() if isinstance(v, float))}); "
                       f"{final.get('loss_recovered_skipped', '')}")
    return float(final[key]) - max(0.0, float(final["l0"]) / max_l0 - 1.0)


def member_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """The SAEs this run trains: ``saes.grid`` (``{model key: [values]}``), when set, is a grid over the
    model config, each point one SAE trained side by side from one stream (``experiment=sae_sweep``); named
    by its point, ``d_sae=1024,l1_coeff=0.003``. Without a grid: ``cfg.model`` alone, named ``""``."""
    grid = (cfg.get("saes") or {}).get("grid")
    if not grid:
        return [("", cfg.model)]
    base = OmegaConf.to_container(cfg.model, resolve=True)
    # keys that are another model key by a relative interpolation (b_enc_init_l0: ${.target_l0}) follow it
    # when the grid sets it: resolving the base would freeze them at the base's value
    raw = OmegaConf.to_container(cfg.model, resolve=False)
    followers = {k: v[3:-1] for k, v in raw.items()
                 if isinstance(v, str) and v.startswith("${.") and v.endswith("}") and k not in grid}
    keys, values = list(grid), []
    for key in keys:
        if OmegaConf.select(cfg.model, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"saes.grid.{key}: model.{key} is not a key of the SAE config ({cfg.model._target_})")
        vals = grid[key]
        values.append(list(vals) if isinstance(vals, ListConfig | list | tuple) else [vals])
    out = []
    for point in itertools.product(*values):
        member = OmegaConf.create(base)
        for key, value in zip(keys, point):
            OmegaConf.update(member, key, value, merge=False)
            for follower in (f for f, src in followers.items() if src == key):
                OmegaConf.update(member, follower, value, merge=False)
        out.append((",".join(f"{key.split('.')[-1]}={value:g}" if isinstance(value, float)
                             else f"{key.split('.')[-1]}={value}" for key, value in zip(keys, point)), member))
    if len({name for name, _ in out}) != len(out):
        raise ConfigError(f"saes.grid {dict(grid)} names two SAEs alike: give each grid key a distinct last part")
    return out


def member_logger_configs(cfg: DictConfig, name: str, root: Path) -> dict:
    """The run's logger configs for one SAE of a sweep: everything that wrote into the run's folder writes
    into the SAE's (``root``: ``<run>/saes/<name>``); a W&B logger becomes its own run, named
    ``<run name>/<name>``, beside the others in this process (``reinit="create_new"``), all in one group: the
    multirun's, or ``<task_name>/<run folder>``."""
    out_dir = str(cfg.paths.output_dir)
    confs = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    member: dict = {}
    for key, conf in (confs or {}).items():
        if conf is None:
            continue
        conf = {k: (str(root) + v[len(out_dir):] if isinstance(v, str) and v.startswith(out_dir) else v)
                for k, v in conf.items()}
        if str(conf.get("_target_", "")).endswith("WandbLogger"):
            # one sweep, one group: a run alone would be grouped by its task name, shared by every sweep
            group = conf.get("group")
            if group in (None, cfg.task_name):
                group = f"{cfg.task_name}/{root.parent.parent.name}"
            conf.update(name=f"{conf.get('name') or cfg.task_name}/{name}", group=group, reinit="create_new",
                        tags=[*(conf.get("tags") or []), name])
        member[key] = conf
    return member


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
    members = member_configs(cfg)
    sweep = members[0][0] != ""
    out = Path(cfg.paths.output_dir)
    dirs = [out / "saes" / name if sweep else out for name, _ in members]
    # each SAE starts from the weights it would get alone with this seed: the generator state after the data
    rng = torch.get_rng_state()
    modules = []
    for _, model_cfg in members:
        torch.set_rng_state(rng)
        modules.append(hydra.utils.instantiate(model_cfg))
    n_lr_windows = cfg.get("final_eval_lr_windows")
    transformer, why_not = splice_transformer(dm)
    lr_skip_val = why_not or no_windows_reason(dm)  # validation during training: data.lr_windows windows
    lr_skip = why_not or no_windows_reason(dm, n_lr_windows)  # the final evaluation: its own count
    for when, reason in (("during training", lr_skip_val), ("in the final evaluation", lr_skip)):
        if reason:
            log.warning("loss recovered is not measured %s: %s", when, reason)
    spec = cfg.get("objective")
    if spec and spec.get("fidelity", "loss_recovered") == "loss_recovered" and lr_skip:
        raise ConfigError(f"objective.fidelity=loss_recovered cannot be measured ({lr_skip}): set "
                         "objective.fidelity=explained_variance, or train on shards with a transformer behind them")
    mean_acts = None
    if cfg.model.ablation == "mean":
        mean_acts = dm.sample_activations(65_536, seed=1).mean(0) / dm.scale
    for module in modules:
        module.attach_data(dm.scale, transformer, mean_acts, lr_skip_val)
    data_facts = {"data/norm_scale": dm.scale, "data/n_tokens": dm.manifest["n_tokens"]}
    if sweep:
        model = SAESweepModule(modules, [name for name, _ in members])
        model.member_dirs = [str(d) for d in dirs]
        member_loggers = []
        for (name, model_cfg), root, module in zip(members, dirs, modules):
            lgs = instantiate_loggers(OmegaConf.create(member_logger_configs(cfg, name, root)))
            member_cfg = cfg.copy()
            with open_dict(member_cfg):
                member_cfg.model = model_cfg
            raw = module.sae.raw_coeff(model_cfg.l1_coeff, dm.scale)
            log_hyperparameters(member_cfg, lgs, {**data_facts, "model/l1_coeff_raw": raw, "sweep/member": name})
            member_loggers.append(lgs)
        model.member_loggers = member_loggers
        # the trainer's own loggers (the run's folder: the summed loss, the LR) are the file loggers; each SAE's
        # W&B run is its own
        trainer, loggers = build_trainer(cfg, loggers=instantiate_loggers(cfg.get("logger"), wandb=False))
    else:
        model = modules[0]
        member_loggers = []
        trainer, loggers = build_trainer(cfg)
        log_hyperparameters(cfg, loggers, {**data_facts,
                                            "model/l1_coeff_raw": model.sae.raw_coeff(cfg.model.l1_coeff, dm.scale)})
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        timings["train SAE" + ("s" if sweep else "")] = time.time() - t0
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        # every rank reads its own shards: the damaged ones any rank skipped (a collective, so before rank 0 goes on)
        skipped = trainer.strategy.reduce(dm.skipped.as_tensor().to(trainer.strategy.root_device), reduce_op="sum")
        skipped = skipped.cpu()
        if not trainer.is_global_zero:
            return metrics
        finals = []
        for (name, model_cfg), module, root, lgs in zip(members, modules, dirs, member_loggers or [loggers]):
            final = finish_sae(cfg, model_cfg, module, dm, trainer, root, transformer, lr_skip, mean_acts,
                               skipped, report, ledger, dict(timings), name=name)
            final_logs = {f"final/{k}": v for k, v in final.items() if isinstance(v, float | int)
                          and not isinstance(v, bool)}
            for lg in lgs:
                lg.log_metrics(final_logs, step=trainer.global_step)
            finals.append(final)
            prefix = f"final/{name}/" if sweep else "final/"
            metrics.update({prefix + k[len("final/"):]: v for k, v in final_logs.items()})
        if sweep:
            rows = [sweep_row(name, final, (root / "metrics.json").relative_to(out))
                    for (name, _), final, root in zip(members, finals, dirs)]
            print_sweep_table(rows, out / "sweep.md")
    finally:
        for lg in (lg for lgs in member_loggers for lg in lgs):
            lg.finalize("success")  # the trainer finalizes only its own loggers (CSV: writes metrics.csv)
            if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
                lg.experiment.finish()  # a reinit="create_new" run is not wandb.run: finish_wandb() misses it
    return metrics


def finish_sae(cfg: DictConfig, model_cfg: DictConfig, model, dm, trainer: L.Trainer, out: Path, transformer,
               lr_skip: str | None, mean_acts, skipped: torch.Tensor, report, ledger: artifacts.Ledger,
               timings: dict[str, float], name: str = "") -> dict:
    """Rank 0, after fit: one SAE's held-out evaluation, density plots, export and ``metrics.json`` in ``out``,
    and its summary. ``skipped``: the damaged shards every rank skipped during training."""
    t0 = time.time()
    n_lr_windows = cfg.get("final_eval_lr_windows")
    skipped_before_eval = dm.skipped.as_tensor()
    device = trainer.strategy.root_device
    sae = model.sae.float()
    final = evaluate(sae, dm.stream("val", batch_size=8192, split_nodes=False),
                     dm.lr_loader(n_lr_windows) if lr_skip is None else None, transformer, dm.scale,
                     model_cfg.ablation, mean_acts, device)
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
    # the λ in force at the end: l1_coeff, or where target_l0 froze it; None where the loss has no λ (TopK)
    l1_coeff = float(model.l1_coeff_buf) if sae.uses_penalty else None
    source = "on_the_fly" if preflight.on_the_fly(cfg) else "cache"
    export_dir = export_sae(
        sae, out / "export", dm.scale, dm.manifest.get("hook", "blocks.0.mlp.hook_post"),
        int(dm.manifest.get("n_ctx") or 0),
        extra_metadata={"l1_coeff": l1_coeff, "l1_reduction": model_cfg.l1_reduction,
                        "l1_coeff_raw": sae.raw_coeff(l1_coeff, dm.scale) if l1_coeff is not None else None,
                        **({"target_l0": model_cfg.target_l0, "l1_coeff_init": model_cfg.l1_coeff}
                           if model_cfg.get("target_l0") is not None else {}),
                        "dataset_path": dm.source, "val_shards": cfg.data.get("val_shards"),
                        "activation_source": source,
                        "final_eval_lr_windows": lr_windows or None, "training_tokens": int(model.tokens_seen),
                        **({"sweep_member": name} if name else {}),
                        **({"on_the_fly": dm.recorded()} if source == "on_the_fly" else {})},
        log10_density=log10_density)
    timings["eval + export"] = time.time() - t0
    final.update({
        "architecture": sae.architecture, **({"k": sae.k} if hasattr(sae, "k") else {}),
        "l1_coeff": l1_coeff, "l1_reduction": model_cfg.l1_reduction,
        **({"target_l0": float(model_cfg.target_l0), "l1_coeff_init": float(model_cfg.l1_coeff)}
           if model_cfg.get("target_l0") is not None else {}),
        **({"b_enc_init_l0": float(model_cfg.b_enc_init_l0)} if model_cfg.get("b_enc_init_l0") is not None else {}),
        # the loss is s²·(MSE_raw + (λ/s)·Σ f_raw): λ/s is the coefficient that acts on raw activations
        "norm_scale": dm.scale,
        "l1_coeff_raw": sae.raw_coeff(l1_coeff, dm.scale) if l1_coeff is not None else None,
        "d_sae": model_cfg.d_sae, "lr": OmegaConf.select(model_cfg, "optimizer.lr"),
        "training_tokens": int(model.tokens_seen),
        "dead_window_tokens": int(model_cfg.dead_window_tokens),
        # dead = silent for the whole dead window: measurable once training has seen that many tokens
        **({"train_dead_frac": float(model.dead_frac())}
           if int(model.tokens_seen) >= int(model_cfg.dead_window_tokens) else {}),
        "train_density_window_tokens": int(window_tokens), "train_dense_frac": float(window["dense_frac"]),
        **({"train_ultralow_frac": float(window["ultralow_frac"])} if "ultralow_frac" in window else {}),
        "lr_windows": lr_windows, "n_skipped_shards": len(skipped_names) + int(skipped[-1]),
        "skipped_shards": skipped_names,
        **({"sweep_member": name} if name else {}),
        "stages": [r.as_dict() for r in ledger],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "export": str(export_dir), "shards": dm.source,
        "activation_source": source,
        "preflight": report.as_dict()})
    directions = load_directions(dm.source) if isinstance(dm.source, str) else None
    if directions is not None:  # a ground-truth shard set: how much of it the dictionary found
        final["ground_truth"] = ground_truth_recovery(sae.W_dec, directions)
        final.update({k: final["ground_truth"][k] for k in ("mmcs", "recovered")})
    absent = lr_absent_reason(final, lr_skip)
    if absent:
        if absent != lr_skip:
            log.warning("loss recovered is not measured in the final evaluation: %s", absent)
        final["loss_recovered_skipped"] = absent
    objective = bounded_objective(final, cfg.get("objective"))
    if objective is not None:
        final["objective"] = objective
    small = too_small_warnings(final, int(cfg.get("eval_min_tokens", 65_536)),
                               int(cfg.get("eval_min_lr_tokens", 8_192)))
    for w in small:
        log.warning("final evaluation%s: %s", f" of {name}" if name else "", w)
    final["eval_warnings"] = small
    write_json_atomic(out / "metrics.json", final)
    print_summary(final, ledger, timings, export_dir, out / "metrics.json", title=f"SAE {name}" if name else "SAE")
    return final
