"""Hydra plumbing shared by the entry points: instantiation that fails loudly, run wrapping, resolvers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from monosemantic.errors import ConfigError, UserError

log = logging.getLogger(__name__)


def wandb_offline() -> bool:
    """True when W&B has no credentials (no WANDB_API_KEY, no netrc entry) or WANDB_MODE says offline.

    W&B then writes the run into the run directory (``wandb sync`` uploads it later) instead of
    prompting for a key or waiting on the network.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "wandb" in netrc.read_text(errors="ignore"))


def _multirun_job() -> Any | None:
    """This job's Hydra config when it is one job of a multirun (a sweep), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.mode == RunMode.MULTIRUN else None


def swept_overrides(hc: Any) -> str:
    """A multirun job's values of what its sweep varies, ``model.l1_coeff=0.003,model.d_sae=1024``: the keys
    swept on the command line (``a=1,2``, ``choice(…)``; read from the sweep's ``multirun.yaml``) and the
    sweeper's ``params`` (``hparams_search=…``). Unknown (no ``multirun.yaml``, no params): every override of the
    job but the excluded ones (``hydra.job.override_dirname``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys = set(OmegaConf.select(hc, "sweeper.params") or {})
    master = Path(hc.sweep.dir) / "multirun.yaml"
    if master.is_file():
        task = OmegaConf.select(OmegaConf.load(master), "hydra.overrides.task") or []
        keys |= {o.key_or_group for o in parser.parse_overrides([str(t) for t in task]) if o.is_sweep_override()}
    if not keys:
        return str(hc.job.override_dirname)
    mine = parser.parse_overrides([str(t) for t in hc.overrides.task])
    return ",".join(f"{o.key_or_group}={o.value()}" for o in mine if o.key_or_group in keys)


def wandb_run_name(task_name: str) -> str:
    """``<task_name>`` alone; in a multirun, ``<task_name>[<what the sweep varies, this job's values>]``, e.g.
    ``sae_4096[model.l1_coeff=0.003,model.d_sae=1024]``, so the runs of one sweep tell apart at a glance."""
    hc = _multirun_job()
    overrides = swept_overrides(hc) if hc is not None else ""
    name = f"{task_name}[{overrides}]" if overrides else task_name
    return name if len(name) <= 128 else name[:125] + "..."  # W&B's display-name limit


def wandb_group(task_name: str) -> str:
    """``<task_name>``; in a multirun, ``multirun/<sweep folder>``: every job of one sweep in one W&B group,
    whatever experiment each job runs."""
    hc = _multirun_job()
    return f"multirun/{Path(hc.sweep.dir).name}" if hc is not None else task_name


def made_dir(path: str) -> str:
    """``${made_dir:<path>}``: the folder, created if missing; for paths a plugin opens before any of our code
    runs (the Optuna sweeper's sqlite file)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def register_resolvers() -> None:
    for name, fn in (("wandb_offline", wandb_offline), ("wandb_run_name", wandb_run_name),
                     ("wandb_group", wandb_group), ("made_dir", made_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def _instantiate_group(group: DictConfig | None, kind: str, base: type,
                       keep: Callable[[DictConfig], bool] | None = None) -> list[Any]:
    out: list[Any] = []
    if not group:
        log.warning("no %s configured", kind)
        return out
    if not isinstance(group, DictConfig):
        raise ConfigError(f"{kind} config must be a mapping of name -> config, got {type(group).__name__}")
    for name, conf in group.items():
        if conf is None:  # disabled with `callbacks.name=null`
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ConfigError(f"{kind} entry {name!r} has no _target_; every {kind} entry must name a class "
                             f"(or be set to null to disable it)")
        if keep is not None and not keep(conf):
            continue
        obj = hydra.utils.instantiate(conf)
        if not isinstance(obj, base):
            raise ConfigError(f"{kind} entry {name!r} ({conf._target_}) is not a {base.__name__}")
        out.append(obj)
    return out


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_group(cfg, "callbacks", Callback)


def instantiate_loggers(cfg: DictConfig | None, wandb: bool = True) -> list[Logger]:
    """The configured loggers; ``wandb=False`` leaves out W&B (a sweep's SAEs each have their own run)."""
    keep = None if wandb else (lambda conf: not str(conf._target_).endswith("WandbLogger"))
    return _instantiate_group(cfg, "logger", Logger, keep)


def log_hyperparameters(cfg: DictConfig, loggers: list[Logger], extra: dict | None = None) -> None:
    """Send the whole resolved config to every logger (not a hand-picked subset)."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params.update(extra or {})
    for lg in loggers:
        lg.log_hyperparams(params)


def config_key(obj: Any, n: int = 10) -> str:
    """A short stable hash of a config (mapping or DictConfig), for keying artifacts by what made them."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def finish_wandb() -> None:
    """Close the W&B run of this job, so each multirun job is its own run."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


def _log_to_files(level: int, msg: str, exc_info: bool) -> None:
    """A record for the run's log files only: the console gets the error once, from the entry point."""
    record = log.makeRecord(log.name, level, __file__, 0, msg, None, sys.exc_info() if exc_info else None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def task_wrapper(fn: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """Run a task; record a failure in the run's log file with its output dir, always close W&B, log the wall
    time. The failure itself reaches the console once, from Hydra: bad input (:class:`UserError`) as its
    message alone, anything else with its traceback (``HYDRA_FULL_ERROR=1``: every error with it)."""

    @wraps(fn)
    def wrapped(cfg: DictConfig) -> dict:
        global _STARTED
        _STARTED = True
        start = time.time()
        try:
            return fn(cfg)
        except UserError as e:
            _log_to_files(logging.ERROR, f"{e}\n(outputs so far in {cfg.paths.get('output_dir')})", exc_info=False)
            raise
        except Exception:
            _log_to_files(logging.ERROR, f"task failed; outputs so far in {cfg.paths.get('output_dir')}",
                          exc_info=True)
            raise
        finally:
            finish_wandb()
            log.info("%s finished in %.1f s; output dir %s", fn.__name__, time.time() - start,
                     cfg.paths.get("output_dir"))

    return wrapped


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        from rich.console import Console
        from rich.syntax import Syntax

        Console().print(Syntax(OmegaConf.to_yaml(cfg, resolve=False), "yaml", theme="ansi_dark"))
    if extras.get("save_config", True):
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def metric_value(metrics: dict, name: str | None) -> float | None:
    """The optimized metric for a Hydra sweeper; None, with a warning naming what was logged, when this run
    could not log it (e.g. val/loss_recovered on a shard set with no transformer behind it)."""
    if not name:
        return None
    # the end-of-run evaluation's value (final/<name without its split>) when the run logged one: it is
    # measured on more held-out data than a validation, and a run shorter than its validation interval has
    # no val/ value at all
    final = "final/" + name.split("/", 1)[-1]
    if final in metrics:
        name = final
    elif name not in metrics:
        log.warning("optimized_metric=%r was not logged by this run; logged: %s", name, sorted(metrics))
        return None
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)


# -- command lines Hydra refuses -------------------------------------------------------------------------
_STARTED = False  # set once a task function runs: from then on a failure is the task's, not the command line's


def _close(word: str, options: list[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(word, options, n=3, cutoff=0.6)


def composition_hint(config_dir: str | Path, config_name: str, overrides: list[str]) -> str | None:
    """Why ``overrides`` do not compose ``config_name``, with the closest valid names: a config group option
    (``experiment=sae_409`` → ``sae_4096``) or a key (``model.d_saee`` → ``model.d_sae``). None when they compose,
    or when nothing close is known (Hydra's own message then stands alone)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException

    def attempt(ovs: list[str]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            return compose(config_name, overrides=ovs)

    try:
        attempt(overrides)
        return None
    except MissingConfigException as e:
        missing = str(getattr(e, "missing_cfg_file", "") or "")
        group, _, name = missing.rpartition("/")
        close = _close(name, list(getattr(e, "options", None) or []))
        return f"{group}={name}: did you mean {' or '.join(f'{group}={c}' for c in close)}?" if close else None
    except ConfigCompositionException as e:
        full_key = str(getattr(e.__cause__, "full_key", "") or "")
        if not full_key:
            return None
        bad = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == full_key
               or o.split("=", 1)[0].lstrip("+~").startswith(full_key + ".")]
        try:
            cfg = attempt([o for o in overrides if o not in bad])
        except Exception:
            return None
        parent, _, last = full_key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig):
            return None
        close = _close(last, [str(k) for k in node.keys()])
        if not close:
            return None
        prefix = f"{parent}." if parent else ""
        return (f"{full_key}: no such key; did you mean {' or '.join(prefix + c for c in close)}? "
                f"(+{full_key}=... adds a new key)")
    except Exception:
        return None


def run_main(main: Callable[[], Any], config_name: str, config_dir: str | Path) -> None:
    """Run a ``@hydra.main`` entry point. When Hydra refuses the command line itself (an experiment or a key
    that does not exist), print the closest valid names after its message."""
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None) and not _STARTED:
            name, args, other_dir = _command_line(sys.argv[1:], config_name)
            hint = None if other_dir else composition_hint(config_dir, name, args)
            if hint:
                sys.stderr.write(hint + "\n")
        raise


_VALUE_FLAGS = {"-cn": "name", "--config-name": "name", "-cp": "dir", "--config-path": "dir", "-cd": "dir",
                "--config-dir": "dir", "--experimental-rerun": "dir"}


def _command_line(argv: list[str], config_name: str) -> tuple[str, list[str], bool]:
    """(config name, overrides, whether another config folder was asked for) from Hydra's command line: the
    values of ``-cn``/``-cp``/``-cd`` (``--config-name x`` or ``--config-name=x``) are not overrides."""
    overrides, other_dir, i = [], False, 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in _VALUE_FLAGS:
            if not eq:  # the value is the next word
                i += 1
                value = argv[i] if i < len(argv) else ""
            if _VALUE_FLAGS[flag] == "name" and value:
                config_name = value
            other_dir = other_dir or _VALUE_FLAGS[flag] == "dir"
        elif not argv[i].startswith("-"):
            overrides.append(argv[i])
        i += 1
    return config_name, overrides, other_dir
