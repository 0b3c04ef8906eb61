"""The artifact store: where each stage's output lives, who builds it, and whether this run built or reused it.

Every artifact under ``data/`` sits in a folder keyed by what makes it (token store: corpus + tokenizer;
transformer: :func:`transformer_key`; activation cache: model weights + settings), so a second run reuses it
and a changed config builds a new one. :func:`ensure` is the one way a stage gets an upstream artifact:

- complete already: reused;
- missing: built under a file lock (``filelock``, in ``.locks/`` beside it), so of two jobs that need it at
  once (a multirun, SLURM jobs started together) one builds and the other waits, then reuses; nothing is
  built twice, and no writer ever sees another's temporary files (the writers also write to a temporary
  name and rename whole, ``utils.io.atomic_dir``);
- a build that runs on several ranks (the transformer under DDP): rank 0 takes the lock, and while it builds
  it leaves a marker beside the lock, named by the launch (:func:`launch_id`); the launch's other ranks wait
  until the artifact is complete (reuse), the marker appears (join the build) or says rank 0 failed (stop).
  This holds with Lightning's launcher (the other ranks start inside rank 0's fit and inherit its launch
  id) and with ranks started by the job system (srun, torchrun: their job's id), also when rank 0 first
  waits for another job's build, and a marker a killed launch left is never read by a new one.
  A single-process build (token store, cache) in a DDP job is done by whichever rank takes the lock
  first; the others wait for it like any other process.

Each call adds a :class:`Record` to the run's ledger, which the summary prints and ``metrics.json`` keeps:
"built" or "reused" comes from the store, never from how long a stage took.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from monosemantic.utils.hydra_utils import config_key
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)

# the variables that give a process's place in a distributed job: Lightning's (lightning.fabric.utilities.
# rank_zero) plus the node's rank, so the main process of node 1 under Lightning's launcher is not "rank 0"
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
# the launch that the ranks of one job share: set by srun or torchrun, or by rank 0 itself before Lightning's
# launcher starts the other ranks (they inherit its environment)
_LAUNCH_VARS = ("MONOSEMANTIC_LAUNCH_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")
POLL_S = 1.0


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


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of its distributed job (or not in one), from the environment."""
    return all(int(os.environ[v]) == 0 for v in _RANK_VARS if os.environ.get(v, "").isdigit())


def lock_path(path: str | Path) -> Path:
    """The lock file of an artifact: in a hidden ``.locks`` folder beside it (on the same filesystem as the
    artifact, which every job that builds it can reach)."""
    path = Path(path)
    return path.parent / ".locks" / f"{path.name}.lock"


def file_lock(path: str | Path) -> FileLock:
    """The artifact's lock. Re-entrant within a process (``is_singleton``): a stage that holds it while it
    builds may take it again, e.g. the transformer's registry export inside an upstream build."""
    lock_path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path(path)), is_singleton=True)


def launch_id() -> str:
    """An id every rank of this launch shares: srun's job and step, torchrun's run id, or one rank 0 makes
    (and exports, so the ranks Lightning's launcher starts inherit it). A new launch gets a new id, so a
    marker left by a killed one is never read as this launch's."""
    if os.environ.get("SLURM_JOB_ID") and not os.environ.get("MONOSEMANTIC_LAUNCH_ID"):
        return f"slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    for var in _LAUNCH_VARS:
        if os.environ.get(var):
            return os.environ[var]
    os.environ["MONOSEMANTIC_LAUNCH_ID"] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return os.environ["MONOSEMANTIC_LAUNCH_ID"]


def marker_path(path: str | Path) -> Path:
    """Where rank 0 of this launch says it builds ``path`` (beside the lock), for the launch's other ranks."""
    return lock_path(path).with_suffix(f".{launch_id()}.building")


def _locked_build(stage: str, path: Path, is_complete: Callable[[Path], bool], build: Callable[[], Any],
                  marker: Path | None) -> tuple[str, float]:
    """Take the artifact's lock (waiting for another process's build), then build it unless that process did.
    With ``marker`` (a multi-rank build), say so to this launch's other ranks: "building", then removed on
    success, or "failed: …" so they stop waiting."""
    t0, waited, status = time.time(), 0.0, "reused"
    lock = file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: waiting for %s (another process is building %s)", stage, lock.lock_file, path)
        lock.acquire()
        waited = time.time() - t0
    try:
        if is_complete(path):  # built by the process we waited for
            log.info("%s: reusing %s, built by another process while this one waited %.0f s", stage, path, waited)
            return status, waited
        log.info("%s: %s is missing, building it", stage, path)
        if marker is not None:
            write_json_atomic(marker, {"state": "building", "path": str(path)})
        try:
            build()
            if not is_complete(path):
                raise RuntimeError(f"{stage}: the build finished but {path} is not a complete artifact")
        except BaseException as e:
            if marker is not None:
                write_json_atomic(marker, {"state": "failed", "path": str(path), "error": repr(e)[:500]})
            raise
        if marker is not None:
            marker.unlink(missing_ok=True)
        return "built", waited
    finally:
        lock.release()


def _read_marker(marker: Path) -> dict:
    try:
        return json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not there (yet, or any more)
        return {}


def _follow(stage: str, path: Path, is_complete: Callable[[Path], bool], build: Callable[[], Any],
            marker: Path) -> str:
    """A rank other than 0 of a multi-rank build: reuse the artifact once rank 0 finds it complete, or join
    the build once rank 0's marker says it is building it. It never decides alone: rank 0 may be waiting for
    another job's build, and a rank that entered the build then would meet rank 0 in another program."""
    t0, next_note = time.time(), 0.0
    while True:
        if is_complete(path):
            log.info("%s: reusing %s", stage, path)
            return "reused"
        state = _read_marker(marker)
        if state.get("path") == str(path) and state.get("state") == "building":
            log.info("%s: joining rank 0's build of %s", stage, path)
            build()
            return "built"
        if state.get("path") == str(path) and state.get("state") == "failed":
            raise RuntimeError(f"{stage}: rank 0 failed to build {path} ({state.get('error')}); see its log")
        if time.time() - t0 >= next_note:
            log.info("%s: waiting for rank 0 to build or find %s (marker %s, %.0f s so far)", stage, path, marker,
                     time.time() - t0)
            next_note += 600
        time.sleep(POLL_S)


def ensure(stage: str, path: str | Path, is_complete: Callable[[Path], bool], build: Callable[[], Any],
           ledger: Ledger | None = None, multi_rank: bool = False) -> Path:
    """Return ``path``, building it with ``build()`` first if ``is_complete(path)`` is false.

    ``build`` writes the artifact at ``path`` (atomically). ``multi_rank`` marks a build that every rank of
    this launch runs together (a DDP fit): rank 0 takes the lock and leaves a marker (:func:`marker_path`)
    while it builds; the other ranks join without the lock (they cannot wait for rank 0, which waits for
    them to start). Raises if a build returns without leaving a complete artifact.
    """
    path, t0, waited = Path(path), time.time(), 0.0
    marker = marker_path(path) if multi_rank else None
    if is_complete(path):
        log.info("%s: reusing %s", stage, path)
        status = "reused"
    elif marker is not None and not is_rank_zero():
        status = _follow(stage, path, is_complete, build, marker)
    else:
        status, waited = _locked_build(stage, path, is_complete, build, marker)
    record = Record(stage, str(path), status, round(time.time() - t0, 1), round(waited, 1))
    if ledger is not None:
        ledger.append(record)
    return path


def world_size(trainer_cfg: dict) -> int:
    """The world size a resolved trainer config asks for, without building it: devices × nodes. Devices may
    be a count, a list or ``"0,1"`` of device ids, or ``-1`` / ``"auto"``: every visible GPU on a GPU
    accelerator, one process otherwise."""
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes") or 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif str(devices) in ("-1", "auto"):
        import torch

        gpu = str(trainer_cfg.get("accelerator", "auto")) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        n = max(1, torch.cuda.device_count()) if gpu else 1
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    else:
        n = int(devices)
    return n * nodes


def _without_data_dir(d: dict) -> dict:
    """Drop the artifact root, so a key depends on settings, not on where the repo lives. Explicit sources
    (``data.store_dir``, ``data.corpus.root``) stay in: another store must give another transformer."""
    return {k: _without_data_dir(v) if isinstance(v, dict) else v for k, v in d.items() if k != "data_dir"}


# the trainer settings that change what a transformer learns: its steps, the world size (DDP multiplies the
# batch; resolved, so `devices=-1` on 4 and on 8 GPUs are two keys), the strategy and the precision; the
# accelerator, loggers and callbacks do not
TRANSFORMER_KEY_TRAINER = ("max_steps", "strategy", "precision")


def transformer_key(cfg: DictConfig) -> str:
    c = OmegaConf.to_container(cfg, resolve=True)
    c["model"]["net"].pop("vocab_size", None)  # filled in from the token store, which data already keys
    trainer = {k: c["trainer"].get(k) for k in TRANSFORMER_KEY_TRAINER}
    trainer["world_size"] = world_size(c["trainer"])
    return config_key({"data": _without_data_dir(c["data"]), "model": c["model"], "seed": c.get("seed"),
                       "trainer": trainer})


def transformer_dir(cfg: DictConfig) -> Path:
    """Where the transformer trained by this ``experiment=transformer_1l`` config is (or will be) registered."""
    return Path(cfg.paths.data_dir) / "models" / f"transformer_1l-{cfg.scale.name}-{transformer_key(cfg)}"


def transformer_complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def shards_complete(path: Path) -> bool:
    return (path / "manifest.json").is_file()
