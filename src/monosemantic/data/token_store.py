"""The token store (DESIGN §4): flat ``train.bin`` / ``val.bin`` token arrays plus ``meta.json``.

Documents are tokenized once, each followed by ``<|endoftext|>``, and concatenated. The held-out split
is by *document* (every ``round(1/val_fraction)``-th document goes to ``val.bin``), so no val window
can share text with a train window. The store's directory name is a hash of everything that made
it (corpus fingerprint, tokenizer settings, split), so a changed config never reuses a stale store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from monosemantic.data.corpus import Corpus, CorpusConfig
from monosemantic.data.tokenizer import EOT, TokenizerConfig, build_tokenizer

log = logging.getLogger(__name__)

FORMAT = "monosemantic.tokens"
VERSION = 1


def store_key(corpus: Corpus, tok_cfg: TokenizerConfig, val_fraction: float) -> str:
    blob = json.dumps({"corpus": corpus.fingerprint, "tokenizer": asdict(tok_cfg), "val_fraction": val_fraction,
                       "version": VERSION}, sort_keys=True)
    name = f"{corpus.cfg.kind}-{tok_cfg.kind}{tok_cfg.vocab_size if tok_cfg.kind == 'bpe' else ''}"
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def read_meta(store_dir: str | Path) -> dict:
    path = Path(store_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"token store {store_dir} has no meta.json (incomplete or not a token store)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not "
                         f"{FORMAT!r} v{VERSION}")
    return meta


def load_split(store_dir: str | Path, split: str) -> np.ndarray:
    meta = read_meta(store_dir)
    arr = np.memmap(Path(store_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    if len(arr) != meta["n_tokens"][split]:
        raise ValueError(f"{store_dir}/{split}.bin holds {len(arr)} tokens but meta.json says "
                         f"{meta['n_tokens'][split]}: the store is damaged; delete it to rebuild")
    return arr


def store_dir_for(corpus_cfg: CorpusConfig, tok_cfg: TokenizerConfig, data_dir: str | Path,
                  val_fraction: float = 0.02) -> Path:
    """Where the token store of this corpus and tokenizer is (or will be) built, keyed by what makes it."""
    data_dir = Path(data_dir)
    return data_dir / "tokens" / store_key(Corpus(corpus_cfg, data_dir / "corpus"), tok_cfg, val_fraction)


def is_complete(store_dir: str | Path) -> bool:
    """A store is complete once its ``meta.json`` exists (the folder is renamed into place whole)."""
    return (Path(store_dir) / "meta.json").is_file()


def build_token_store(corpus_cfg: CorpusConfig, tok_cfg: TokenizerConfig, data_dir: str | Path,
                      val_fraction: float = 0.02, encode_batch: int = 64) -> Path:
    """Build (or find) the token store for this corpus and tokenizer; returns its directory. The pipeline
    calls this under the artifact store's lock (``stages/artifacts.py``), so concurrent jobs build it once."""
    data_dir = Path(data_dir)
    corpus = Corpus(corpus_cfg, data_dir / "corpus")
    out = data_dir / "tokens" / store_key(corpus, tok_cfg, val_fraction)
    if is_complete(out):
        log.info("token store found: %s", out)
        return out
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 0.5)")
    val_every = max(2, round(1 / val_fraction))

    log.info("building token store %s", out)
    tokenizer = build_tokenizer(tok_cfg, corpus.documents())
    eot = tokenizer.token_to_id(EOT)
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32

    (data_dir / "tokens").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=data_dir / "tokens"))
    counts = {"train": 0, "val": 0}
    n_docs = {"train": 0, "val": 0}
    n_bytes = 0
    try:
        files = {s: open(tmp / f"{s}.bin", "wb") for s in counts}
        batch: list[str] = []
        doc_index = 0

        def flush() -> None:
            nonlocal doc_index
            for enc in tokenizer.encode_batch(batch):
                split = "val" if doc_index % val_every == 0 else "train"
                ids = np.asarray(enc.ids + [eot], dtype=dtype)
                files[split].write(ids.tobytes())
                counts[split] += len(ids)
                n_docs[split] += 1
                doc_index += 1
            batch.clear()

        with tqdm(desc="tokenizing", unit="B", unit_scale=True) as bar:
            for text in corpus.documents():
                batch.append(text)
                n_bytes += len(text.encode())
                bar.update(len(text.encode()))
                if len(batch) >= encode_batch:
                    flush()
            flush()
        for f in files.values():
            f.close()
        if counts["val"] == 0 or counts["train"] == 0:
            raise ValueError(f"corpus {corpus.info} gave {n_docs} documents: too few for a train/val split")
        tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {
            "format": FORMAT, "version": VERSION, "tokenizer": "tokenizer.json", "tokenizer_config": asdict(tok_cfg),
            "vocab_size": vocab, "eot_token": eot, "dtype": np.dtype(dtype).name,
            "n_tokens": counts, "n_docs": n_docs, "n_bytes": n_bytes,
            "bytes_per_token": round(n_bytes / max(1, sum(counts.values())), 4),
            "val_split": f"every {val_every}th document", "corpus": corpus.info,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, out)  # atomic; loses the race cleanly if another process finished first
        except OSError:
            if not (out / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("token store: %s train / %s val tokens, vocab %d", f"{counts['train']:,}", f"{counts['val']:,}", vocab)
    return out


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of the best model that ignores
    context, so a trained LM's val loss must fall clearly below it."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
