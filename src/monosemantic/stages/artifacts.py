"""The artifact store: where each stage's output lives, who builds it, and whether this run built or reused it.

Every artifact under ``data/`` sits in a folder keyed by what makes it (token store: corpus + tokenizer;
transformer: :func:`transformer_key`; activation cache: model weights + settings), so a second run reuses it
and a changed config builds a new one. :func:`ensure` is the one way a stage gets an upstream artifact:

- complete already: reused;
- missing: built under a file lock (``filelock``, in ``.locks/`` beside it), so of two jobs that need it at
  once (a multirun, SLURM jobs started together) one builds and the other waits, then reuses; nothing is
  built twice, and no writer ever sees another's temporary files (the writers also write to a temporary
  name and rename whole, ``utils.io.atomic_dir``);
- a build that runs on several ranks (the transformer under DDP): rank 0 takes the lock and the other ranks
  of the same job join the build without it (they cannot wait on rank 0, which waits for them to start).
  A single-process build (token store, cache) in a DDP job is done by whichever rank takes the lock first;
  the others wait for it like any other process.

Each call adds a :class:`Record` to the run's ledger, which the summary prints and ``metrics.json`` keeps:
"built" or "reused" comes from the store, never from how long a stage took.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from monosemantic.utils.hydra_utils import config_key

log = logging.getLogger(__name__)

# the rank variables Lightning reads (lightning.fabric.utilities.rank_zero), in its order
_RANK_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


@dataclass
class Record:
    """One artifact a run needed: which stage makes it, where it is, and what this run did about it."""

    stage: str
    path: str
    status: str  # "built" | "reused"
    seconds: float
    waited_s: float = 0.0  # time spent waiting for another process's build (then "reused")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Ledger = list[Record]


def process_rank() -> int:
    """This process's rank in a distributed job, from the environment (0 outside one)."""
    for var in _RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def lock_path(path: str | Path) -> Path:
    """The lock file of an artifact: in a hidden ``.locks`` folder beside it (on the same filesystem as the
    artifact, which every job that builds it can reach)."""
    path = Path(path)
    return path.parent / ".locks" / f"{path.name}.lock"


def ensure(stage: str, path: str | Path, is_complete: Callable[[Path], bool], build: Callable[[], Any],
           ledger: Ledger | None = None, multi_rank: bool = False) -> Path:
    """Return ``path``, building it with ``build()`` first if ``is_complete(path)`` is false.

    ``build`` writes the artifact at ``path`` (atomically); ``multi_rank`` says every rank of this job runs
    it together (a DDP fit), so ranks other than 0 join it without taking the lock. Raises if a build
    returns without leaving a complete artifact on rank 0.
    """
    path, t0, waited, status = Path(path), time.time(), 0.0, "reused"
    if is_complete(path):
        log.info("%s: reusing %s", stage, path)
    elif multi_rank and process_rank() != 0:
        log.info("%s: rank %d joins the build of %s", stage, process_rank(), path)
        build()
        status = "built"
    else:
        lock_path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path(path)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: waiting for %s (another process is building %s)", stage, lock.lock_file, path)
            lock.acquire()
            waited = time.time() - t0
        try:
            if is_complete(path):  # built by the job we waited for
                log.info("%s: reusing %s, built by another process while this one waited %.0f s", stage, path,
                         waited)
            else:
                log.info("%s: %s is missing, building it", stage, path)
                build()
                status = "built"
                if not is_complete(path):
                    raise RuntimeError(f"{stage}: the build finished but {path} is not a complete artifact")
        finally:
            lock.release()
    record = Record(stage, str(path), status, round(time.time() - t0, 1), round(waited, 1))
    if ledger is not None:
        ledger.append(record)
    return path


def _without_data_dir(d: dict) -> dict:
    """Drop the artifact root, so a key depends on settings, not on where the repo lives. Explicit sources
    (``data.store_dir``, ``data.corpus.root``) stay in: another store must give another transformer."""
    return {k: _without_data_dir(v) if isinstance(v, dict) else v for k, v in d.items() if k != "data_dir"}


# the trainer settings that change what a transformer learns: its steps, the world size (DDP multiplies the
# batch) and the precision; the accelerator, loggers and callbacks do not
TRANSFORMER_KEY_TRAINER = ("max_steps", "devices", "num_nodes", "strategy", "precision")


def transformer_key(cfg: DictConfig) -> str:
    c = OmegaConf.to_container(cfg, resolve=True)
    c["model"]["net"].pop("vocab_size", None)  # filled in from the token store, which data already keys
    trainer = {k: c["trainer"].get(k) for k in TRANSFORMER_KEY_TRAINER}
    return config_key({"data": _without_data_dir(c["data"]), "model": c["model"], "seed": c.get("seed"),
                       "trainer": trainer})


def transformer_dir(cfg: DictConfig) -> Path:
    """Where the transformer trained by this ``experiment=transformer_1l`` config is (or will be) registered."""
    return Path(cfg.paths.data_dir) / "models" / f"transformer_1l-{cfg.scale.name}-{transformer_key(cfg)}"


def transformer_complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def shards_complete(path: Path) -> bool:
    return (path / "manifest.json").is_file()
