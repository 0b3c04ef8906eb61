"""Pre-flight (DESIGN §6): before any stage runs, the arithmetic of what the config asks for, checked against
what the corpus, the disk and the settings can give, and printed at the start of every run.

What is checked, for each stage this run would *build* (a reused artifact needs nothing):

- transformer: tokens it trains on (steps × batch × n_ctx × ranks) against the token store's training tokens
  (exact once the store exists; before, the corpus's bytes / ``bytes_per_token``): more than
  ``max_transformer_epochs`` passes over them stops the run. The store's size on disk against free space.
- activation cache: contexts asked for against the non-overlapping contexts of the training split; the bytes
  of the shard set against free space (at the paper's settings: 8.7 TB).
- SAE: activations it trains on (steps × batch × ranks) against those a pass holds — a cache's training
  shards, or on the fly the training split's contexts × tokens per context. An auto-built cache read more than
  once, or more on-the-fly passes than there are new positions (``n_ctx // tokens_per_context``), repeats
  activations: the run stops unless ``preflight.allow_repeats``. A shard set given with ``data.shards`` is the
  user's to re-read (sweeps over one set): a warning.

A failed check raises :class:`PreflightError` with the whole table, before anything is tokenized or trained.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from monosemantic.activation_cache import CacheSettings, cache_dir_for
from monosemantic.data.contexts import distinct_passes, n_tiles
from monosemantic.data.corpus import Corpus, CorpusConfig
from monosemantic.data.shards.format import read_manifest
from monosemantic.data.shards.writer import SampleBatch
from monosemantic.data.token_store import is_complete, read_meta, store_dir_for
from monosemantic.data.tokenizer import TokenizerConfig
from monosemantic.errors import UserError
from monosemantic.stages import artifacts
from monosemantic.stages.compose import cache_config, transformer_config
from monosemantic.utils.validate import check_node, check_targets

log = logging.getLogger(__name__)
GB = 1e9


class PreflightError(UserError, RuntimeError):
    """The config asks for more than the corpus, disk or settings can give; the message has the numbers."""


@dataclass
class Line:
    stage: str
    what: str
    need: str
    have: str
    ok: bool = True


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, stage: str, what: str, need: str, have: str, problem: str | None = None,
            warning: str | None = None) -> None:
        self.lines.append(Line(stage, what, need, have, ok=problem is None))
        if problem:
            self.problems.append(f"{stage}: {problem}")
        if warning:
            self.warnings.append(f"{stage}: {warning}")

    def table(self) -> str:
        rows = [("stage", "what", "needs", "has", "")] + [
            (ln.stage, ln.what, ln.need, ln.have, "" if ln.ok else "STOP") for ln in self.lines]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def as_dict(self) -> dict:
        return {"lines": [asdict(ln) for ln in self.lines], "problems": self.problems, "warnings": self.warnings}


def _n(x: float) -> str:
    """A count in words a reader can scan: 8.2B, 32.8M, 7,962,624."""
    for div, unit, least in ((1e12, "T", 1e12), (1e9, "B", 1e9), (1e6, "M", 1e7)):
        if abs(x) >= least:
            return f"{x / div:.1f}{unit}"
    return f"{int(round(x)):,}"


def _gb(b: float) -> str:
    return f"{b / 1e12:.1f} TB" if b >= 1e12 else f"{b / GB:.1f} GB" if b >= 0.1 * GB else f"{b / 1e6:.1f} MB"


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _settings(cfg: DictConfig) -> dict:
    """The run's ``preflight`` block (``configs/train.yaml``, ``configs/cache_activations.yaml``)."""
    return OmegaConf.to_container(cfg.preflight, resolve=True)


def _world(cfg: DictConfig) -> int:
    return artifacts.world_size(OmegaConf.to_container(cfg.trainer, resolve=True)) if "trainer" in cfg else 1


def token_supply(tcfg: DictConfig, pf: dict) -> tuple[int, bool, Path, float]:
    """(training tokens of the store, exact?, the store's folder, bytes it needs on disk if not built yet)."""
    data = tcfg.data
    if data.get("store_dir"):
        store = Path(data.store_dir)
    else:
        store = store_dir_for(CorpusConfig(**data.corpus), TokenizerConfig(**data.tokenizer), data.data_dir,
                              data.val_fraction)
    if is_complete(store):
        return int(read_meta(store)["n_tokens"]["train"]), True, store, 0.0
    cfg = CorpusConfig(**data.corpus)
    if cfg.kind == "hub":
        if cfg.max_bytes is None:
            raise PreflightError("the hub corpus has no data.corpus.max_bytes: its stream is endless, so neither "
                                 "the token store nor the run has an end; set the text budget")
        n_bytes = float(cfg.max_bytes)
    else:
        corpus = Corpus(cfg, Path(data.data_dir) / "corpus")
        files = [Path(data.data_dir) / "corpus" / corpus.info["file"]] if "file" in corpus.info else [
            Path(f) for f in corpus._load_args["data_files"]]
        n_bytes = float(sum(f.stat().st_size for f in files))
        if cfg.max_bytes is not None:
            n_bytes = min(n_bytes, float(cfg.max_bytes))
    tokens = n_bytes / pf["bytes_per_token"]
    itemsize = 2 if int(data.tokenizer.get("vocab_size", 50_257)) <= 2**16 or data.tokenizer.kind == "gpt2" else 4
    return int(tokens * (1 - data.val_fraction)), False, store, tokens * itemsize


def _disk(report: Report, stage: str, what: str, need: float, where: Path, pf: dict) -> None:
    free = free_bytes(where)
    margin = pf["disk_margin_gb"] * GB
    report.add(stage, what, _gb(need), f"{_gb(free)} free at {where.parent}",
               problem=None if need + margin <= free else
               f"{what} needs {_gb(need)} but {where.parent} has {_gb(free)} free (keeping {_gb(margin)} spare)")


def model_facts(model_dir: str | Path, token_store: str | None = None) -> dict:
    """An exported transformer's context length, width and token store (with its training tokens), read from
    its ``config.json`` (the weights are not loaded)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise PreflightError(f"{path} is missing: {model_dir} is not an exported transformer")
    cfg = json.loads(path.read_text())
    store = token_store or cfg.get("token_store")
    if not store or not is_complete(store):
        raise PreflightError(f"the token store of {model_dir} ({store!r}) is missing: set data.token_store")
    return {"n_ctx": int(cfg["model"]["n_ctx"]), "d_mlp": int(cfg["model"]["d_mlp"]), "store": store,
            "tokens": int(read_meta(store)["n_tokens"]["train"])}


def check_transformer(tcfg: DictConfig, report: Report, pf: dict, always_trains: bool = False) -> tuple[int, bool]:
    """The transformer stage (if it would be trained: an upstream one is reused when registered) and its token
    store; returns the store's training tokens (exact or estimated)."""
    registry = artifacts.transformer_dir(tcfg)
    if not always_trains and artifacts.transformer_complete(registry):  # its own store, exactly
        report.add("transformer", "trained model", "-", f"reused: {registry.name}")
        return model_facts(registry)["tokens"], True
    tokens, exact, store, store_bytes = token_supply(tcfg, pf)
    est = "" if exact else f" (estimated: corpus bytes / {pf['bytes_per_token']:.1f})"
    if store_bytes:
        _disk(report, "tokenize", "token store", store_bytes, store, pf)
    n_ctx, batch = int(tcfg.data.n_ctx), int(tcfg.data.batch_size)
    need = int(tcfg.trainer.max_steps) * batch * n_ctx * _world(tcfg)
    epochs = need / max(tokens, 1)
    cap = float(pf["max_transformer_epochs"])
    report.add("transformer", "training tokens", f"{_n(need)} ({epochs:.2f} epochs)", f"{_n(tokens)}{est}",
               problem=None if epochs <= cap else
               f"trains on {_n(need)} tokens = {epochs:,.0f} epochs of the {_n(tokens)} training tokens{est} "
               f"(limit preflight.max_transformer_epochs={cap:g}): use a bigger corpus (data=pile, "
               "data.corpus.max_bytes) or fewer steps")
    return tokens, exact


def _contexts_line(report: Report, stage: str, n_contexts: int, train_tokens: int, n_ctx: int, exact: bool) -> int:
    tiles = n_tiles(train_tokens, n_ctx)
    est = "" if exact else " (estimated)"
    report.add(stage, f"contexts of {n_ctx} tokens", _n(n_contexts), f"{_n(tiles)}{est}",
               problem=None if n_contexts <= tiles else
               f"asks for {_n(n_contexts)} contexts of {n_ctx} tokens but the training split holds {_n(tiles)}"
               f"{est}: lower the contexts or use a bigger corpus")
    return tiles


def check_cache(ccfg: DictConfig, report: Report, pf: dict, tcfg: DictConfig) -> tuple[Path | None, dict]:
    """The cache stage (if it would be written) and what it needs; returns (its folder if known, settings)."""
    settings = OmegaConf.to_container(ccfg.settings, resolve=True)
    model_dir = cache_model_dir(ccfg)
    out = cache_out_dir(ccfg, model_dir) if model_dir is not None else None
    if out is not None and artifacts.shards_complete(out):
        report.add("cache", "activation shards", "-", f"reused: {out.name}")
        return out, settings
    if model_dir is not None:  # given or registered: its own shape and store
        facts = model_facts(model_dir)
        tokens, exact, n_ctx, d_mlp = facts["tokens"], True, facts["n_ctx"], facts["d_mlp"]
    else:
        tokens, exact = check_transformer(tcfg, report, pf)
        n_ctx, d_mlp = int(tcfg.data.n_ctx), int(tcfg.model.net.d_mlp)
    k, n = int(settings["tokens_per_context"]), int(settings["n_contexts"])
    if k > n_ctx:
        report.add("cache", "positions per context", str(k), f"{n_ctx} in a context",
                   problem=f"settings.tokens_per_context={k} exceeds the transformer's n_ctx={n_ctx}")
    _contexts_line(report, "cache", n, tokens, n_ctx, exact)
    members = {"acts": (np.dtype(settings.get("dtype", "float16")), (k, d_mlp)), "tokens": (np.int32, (k,)),
               "positions": (np.int32, (k,)), "context": (np.int32, (n_ctx,))}
    sample_bytes = SampleBatch(1, members, allocate=np.zeros).sample_bytes
    _disk(report, "cache", f"shard set ({_n(n * k)} activations)", float(n) * sample_bytes,
          out or Path(ccfg.paths.data_dir) / "activations" / "x", pf)
    return out, settings


def cache_model_dir(ccfg: DictConfig) -> Path | None:
    """The transformer a cache config uses, if it exists already (None: it would be trained first)."""
    if ccfg.model_dir:
        return Path(ccfg.model_dir)
    path = artifacts.transformer_dir(transformer_config(ccfg))
    return path if artifacts.transformer_complete(path) else None


def cache_out_dir(ccfg: DictConfig, model_dir: Path) -> Path:
    """Where a cache config's shard set is: ``out_dir``, or the folder keyed by the model and settings."""
    if ccfg.out_dir:
        return Path(ccfg.out_dir)
    settings = CacheSettings(**OmegaConf.to_container(ccfg.settings, resolve=True))
    return cache_dir_for(model_dir, settings, Path(ccfg.paths.data_dir) / "activations")


def check_sae(cfg: DictConfig, report: Report, pf: dict) -> None:
    need = int(cfg.trainer.max_steps) * int(cfg.data.batch_size) * _world(cfg)
    repeats = "allowed (preflight.allow_repeats)" if pf["allow_repeats"] else None
    if on_the_fly(cfg):
        if cfg.data.model_dir:
            facts = model_facts(cfg.data.model_dir, cfg.data.token_store)
            tokens, exact, n_ctx = facts["tokens"], True, facts["n_ctx"]
        else:
            tcfg = transformer_config(cfg)
            tokens, exact = check_transformer(tcfg, report, pf)
            n_ctx = int(tcfg.data.n_ctx)
            if cfg.data.token_store:  # contexts come from this store, whatever the transformer trained on
                tokens, exact = int(read_meta(cfg.data.token_store)["n_tokens"]["train"]), True
        k = int(cfg.data.tokens_per_context)
        if k > n_ctx:
            report.add("sae", "positions per context", str(k), f"{n_ctx} in a context",
                       problem=f"data.tokens_per_context={k} exceeds the transformer's n_ctx={n_ctx}")
            return
        tiles = n_tiles(tokens, n_ctx)
        contexts = int(cfg.data.n_contexts) if cfg.data.n_contexts else tiles
        _contexts_line(report, "sae", contexts, tokens, n_ctx, exact)
        per_pass, allowed = contexts * k, distinct_passes(n_ctx, k)
        passes = need / max(per_pass, 1)
        report.add("sae", "activations (on the fly)", f"{_n(need)} ({passes:.2f} passes)",
                   f"{_n(per_pass)} per pass, {allowed} pass(es) of new positions",
                   problem=None if passes <= allowed or repeats else
                   f"trains on {_n(need)} activations = {passes:.2f} passes of {_n(per_pass)}, but only {allowed} "
                   f"pass(es) of {k} of {n_ctx} positions are new: activations would repeat. Use a bigger corpus, "
                   "fewer steps, or preflight.allow_repeats=true")
        buf = int(cfg.data.buffer_tokens)
        report.add("sae", "shuffle chunk", f"{_n(buf)} activations",
                   f"{_n(buf / k)} contexts: a batch of {_n(cfg.data.batch_size)} draws from "
                   f"~{_n(expected_distinct(buf / k, int(cfg.data.batch_size)))} of them")
        return
    if cfg.data.shards:
        m = read_manifest(cfg.data.shards)
        n_val = int(cfg.data.val_shards)
        train = sum(int(s["n_tokens"]) for s in m["shards"][: len(m["shards"]) - n_val])
        passes = need / max(train, 1)
        report.add("sae", "activations (given shard set)", f"{_n(need)} ({passes:.2f} passes)", _n(train),
                   warning=None if passes <= 1 else f"reads its shard set {passes:.1f} times: activations repeat")
        return
    ccfg = cache_config(cfg)
    _, settings = check_cache(ccfg, report, pf, transformer_config(ccfg))
    n, k, cps = int(settings["n_contexts"]), int(settings["tokens_per_context"]), int(settings["contexts_per_shard"])
    n_shards = math.ceil(n / cps)
    n_val = int(cfg.data.val_shards)
    train = min(n, (n_shards - n_val) * cps) * k if n_shards > n_val else 0  # the held-out shards are the last
    passes = need / max(train, 1)
    report.add("sae", "activations (cache)", f"{_n(need)} ({passes:.2f} passes)", f"{_n(train)} in training shards",
               problem=None if passes <= 1 or repeats else
               f"trains on {_n(need)} activations = {passes:.2f} passes over the cache's {_n(train)}: activations "
               "would repeat. Cache more contexts (scale.cache.n_contexts), train fewer steps, use data=on_the_fly, "
               "or preflight.allow_repeats=true")


def expected_distinct(contexts: float, rows: int) -> float:
    """Expected distinct contexts among ``rows`` rows drawn from a chunk of ``contexts`` equal contexts."""
    return contexts * (1 - math.exp(rows * math.log1p(-1 / contexts))) if contexts > 1 else min(contexts, rows)


def on_the_fly(cfg: DictConfig) -> bool:
    return str(cfg.data.get("_target_", "")).endswith("OnTheFlyDataModule")


def validate(cfg: DictConfig, kind: str) -> None:
    """Types and sizes (:mod:`monosemantic.utils.validate`), whatever ``preflight.enabled`` says: every
    ``_target_`` node against what it builds, the scale's cache block and a cache run's settings against
    :class:`CacheSettings`. Raises :class:`~monosemantic.errors.ConfigError` naming the key."""
    check_targets(cfg)
    if OmegaConf.select(cfg, "scale.cache") is not None:
        check_node(cfg.scale.cache, CacheSettings, "scale.cache")
    if kind == "cache":
        check_node(cfg.settings, CacheSettings, "settings")


def check(cfg: DictConfig, kind: str) -> Report:
    """Validate the config (:func:`validate`); run the checks for a ``kind`` of run ("transformer", "cache",
    "sae"), log the table, and raise :class:`PreflightError` if any fails. ``preflight.enabled=false`` skips
    the checks (with a warning), not the validation."""
    validate(cfg, kind)
    pf = _settings(cfg)
    report = Report()
    if not pf["enabled"]:
        log.warning("pre-flight checks are off (preflight.enabled=false)")
        return report
    if kind == "transformer":
        check_transformer(cfg, report, pf, always_trains=True)  # experiment=transformer_1l replaces the model
    elif kind == "cache":
        check_cache(cfg, report, pf, transformer_config(cfg))
    else:
        check_sae(cfg, report, pf)
    log.info("pre-flight: what this run asks for and what it has\n%s", report.table())
    for w in report.warnings:
        log.warning("pre-flight: %s", w)
    if report.problems:
        raise PreflightError("pre-flight: this config cannot do what it asks, nothing was run:\n  "
                             + "\n  ".join(report.problems) + "\n" + report.table())
    return report

