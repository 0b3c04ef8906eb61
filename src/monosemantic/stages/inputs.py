"""What the reading stages (dashboard, steering) start from: an SAE on raw activations, the transformer that
made its training activations, that transformer's tokenizer and its token store; all found from the SAE
alone (its export or checkpoint records its shard set, whose manifest names the rest), each overridable."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from monosemantic.data.onthefly import source_model_dir
from monosemantic.data.shards.format import read_manifest
from monosemantic.data.token_store import check_store_matches_model, load_split, read_meta
from monosemantic.data.tokenizer import load_tokenizer
from monosemantic.errors import ConfigError, MissingInputError
from monosemantic.export import folded_weights
from monosemantic.models.components.sae import SparseAutoencoder, sae_from_inference
from monosemantic.models.components.transformer import Transformer
from monosemantic.models.transformer_module import load_transformer
from monosemantic.stages.eval import load_any

log = logging.getLogger(__name__)


@dataclass
class ReadingInputs:
    sae: SparseAutoencoder
    """on raw activations (any training normalisation folded in, as in the export)"""
    sae_path: Path
    transformer: Transformer
    transformer_dir: Path
    tokenizer: Tokenizer
    token_store: Path

    @property
    def n_ctx(self) -> int:
        return self.transformer.cfg.n_ctx


def latest_export(log_dir: str | Path) -> Path:
    """The newest SAE export under ``logs/``: ``<task>/runs/<stamp>/export``, a multirun job's
    (``multiruns/<stamp>/<job>/export``), or one SAE of a sweep (``…/saes/<name>/export``)."""
    root = Path(log_dir)
    found = [p for pattern in ("*/*/*/export/cfg.json", "*/*/*/saes/*/export/cfg.json",
                               "*/multiruns/*/*/export/cfg.json")  # the last: the layout before v0.4's
             for p in root.glob(pattern)]
    if not found:
        raise MissingInputError(f"ckpt_path=latest: no SAE export under {log_dir} (none of "
                                "<task>/runs/<stamp>/export/cfg.json): run `make train`, or pass ckpt_path=<export "
                                "folder or .ckpt>")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def raw_space_sae(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """The same SAE on raw activations: ``scale`` folded into its biases exactly as the export does."""
    if scale == 1.0 and sae.unit_decoder:
        return sae.eval()
    return sae_from_inference({"d_in": sae.d_in, "d_sae": sae.d_sae, **sae.inference_cfg()},
                              folded_weights(sae, scale))


def load_inputs(ckpt_path: str, log_dir: str | Path, shards: str | None = None, transformer: str | None = None,
                token_store: str | None = None, device: str = "cpu") -> ReadingInputs:
    path = latest_export(log_dir) if ckpt_path == "latest" else Path(ckpt_path)
    sae, scale, recorded = load_any(path)
    log.info("SAE: %s (%d features on %d inputs)", path, sae.d_sae, sae.d_in)
    manifest: dict = {}
    shards = shards or recorded["shards"]
    if source_model_dir(shards):  # trained on the fly: the transformer is named in the source itself
        transformer = transformer or source_model_dir(shards)
        token_store = token_store or (recorded.get("on_the_fly") or {}).get("token_store")
    elif shards and Path(shards, "manifest.json").is_file():
        manifest = read_manifest(shards)
    elif not (transformer and token_store):
        raise MissingInputError(f"{path} records the shard set {shards!r}, which has no manifest.json: pass "
                                "shards=<dir>, or transformer=<export dir> and token_store=<dir>")
    transformer = transformer or (manifest.get("model") or {}).get("checkpoint")
    if not transformer:
        raise ConfigError(f"shard set {shards} names no transformer (manifest 'model.checkpoint'): pass "
                         "transformer=<export dir>")
    transformer_dir = Path(transformer)
    net, net_cfg = load_transformer(transformer_dir, device)
    if net.cfg.d_mlp != sae.d_in:
        raise ConfigError(f"the SAE {path} reads {sae.d_in} inputs but the transformer {transformer_dir} has "
                         f"d_mlp={net.cfg.d_mlp}: pass the transformer it was trained on (transformer=)")
    store = Path(token_store or manifest.get("token_store") or net_cfg.get("token_store") or "")
    if not str(store) or not (store / "meta.json").is_file():
        where = "token_store=" if token_store else "the shard manifest or the transformer's config"
        raise MissingInputError(f"token store {str(store)!r} (from {where}) has no meta.json: pass token_store=<dir>")
    tok_file = transformer_dir / (net_cfg.get("tokenizer") or "tokenizer.json")
    check_store_matches_model(store, net.cfg.vocab_size, tok_file, transformer_dir)
    if not tok_file.is_file():
        tok_file = store / "tokenizer.json"
    tokenizer = load_tokenizer(tok_file)
    if tokenizer.get_vocab_size() != net.cfg.vocab_size:
        raise ConfigError(f"tokenizer {tok_file} has {tokenizer.get_vocab_size()} tokens but the transformer "
                         f"{transformer_dir} has vocab_size={net.cfg.vocab_size}")
    return ReadingInputs(raw_space_sae(sae, scale).to(device), path, net, transformer_dir, tokenizer, store)


def read_text(store: Path, n_tokens: int, window_len: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Up to ``n_tokens`` tokens in whole windows: the held-out split first, then the training split if it is
    too short. Returns the tokens, the token that follows each in its split (-1 at a split's end) and how
    many came from each split."""
    meta = read_meta(store)
    toks, nexts, counts, need = [], [], {}, n_tokens
    for split in ("val", "train"):
        if need < window_len or split not in meta["n_tokens"]:
            continue
        arr = load_split(store, split)
        take = min(len(arr), need) // window_len * window_len
        if take <= 0:
            continue
        part = np.asarray(arr[:take + 1], dtype=np.int32)
        toks.append(part[:take])
        nexts.append(np.concatenate([part[1:take + 1], [-1] * (take + 1 - len(part))]).astype(np.int32))
        counts[split] = take
        need -= take
    if not toks:
        raise ConfigError(f"{n_tokens} tokens asked for, fewer than one window of {window_len} (n_ctx): ask for "
                         f"more, or the token store {store} is too small")
    return np.concatenate(toks), np.concatenate(nexts), counts
