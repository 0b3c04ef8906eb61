"""The token store (DESIGN §4): flat ``train.bin`` / ``val.bin`` token arrays plus ``meta.json``.

Documents are tokenized once, in one resumable streaming pass, each followed by ``<|endoftext|>``, and
concatenated; the BPE is trained first, on a stated sample of training documents only. The held-out split
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
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from monosemantic.data.corpus import Corpus, CorpusConfig, CorpusReader
from monosemantic.data.tokenizer import EOT, TokenizerConfig, build_tokenizer, load_tokenizer
from monosemantic.errors import ConfigError, InputError, MissingInputError
from monosemantic.utils.io import write_json_atomic

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
        raise MissingInputError(f"token store {store_dir} has no meta.json (incomplete or not a token store)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise InputError(f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not "
                         f"{FORMAT!r} v{VERSION}")
    return meta


def check_store_matches_model(store_dir: str | Path, vocab_size: int, tokenizer_file: str | Path | None,
                              model_dir: str | Path) -> None:
    """Refuse a token store tokenized otherwise than the transformer at ``model_dir`` was trained: another
    vocabulary size (its ids would index another embedding, or past its end), or, when both have one, another
    tokenizer file (same size, other tokens). Raises :class:`~monosemantic.errors.InputError` naming both."""
    meta = read_meta(store_dir)
    fix = "pass the token store the transformer was trained on (its config.json names it: token_store)"
    if int(meta["vocab_size"]) != int(vocab_size):
        raise InputError(f"token store {store_dir} has vocab_size={meta['vocab_size']} but the transformer "
                         f"{model_dir} has vocab_size={vocab_size}: {fix}")
    store_tok = Path(store_dir) / meta.get("tokenizer", "tokenizer.json")
    if tokenizer_file is None or not Path(tokenizer_file).is_file() or not store_tok.is_file():
        return
    if hashlib.sha256(Path(tokenizer_file).read_bytes()).digest() != hashlib.sha256(store_tok.read_bytes()).digest():
        raise InputError(f"token store {store_dir} was tokenized with {store_tok}, another tokenizer than the "
                         f"transformer's {tokenizer_file} (same vocabulary size, other tokens): {fix}")


def load_split(store_dir: str | Path, split: str) -> np.ndarray:
    meta = read_meta(store_dir)
    arr = np.memmap(Path(store_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    if len(arr) != meta["n_tokens"][split]:
        raise InputError(f"{store_dir}/{split}.bin holds {len(arr)} tokens but meta.json says "
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


def _train_sample(corpus: Corpus, val_every: int, max_bytes: int | None) -> tuple[Iterator[str], dict]:
    """The BPE's training text: the first ``max_bytes`` of training documents (every ``val_every``-th document
    is held out, as in the store, and never seen by the tokenizer). The dict is filled in as it is read."""
    info = {"docs": 0, "bytes": 0, "rule": f"the first {max_bytes or 'all'} bytes of training documents "
            f"(every {val_every}th document is held out and skipped)"}

    def texts() -> Iterator[str]:
        for i, text in enumerate(corpus.documents()):
            if i % val_every == 0:
                continue
            yield text
            info["docs"] += 1
            info["bytes"] += len(text.encode())
            if max_bytes is not None and info["bytes"] >= max_bytes:
                return

    return texts(), info


def _finish(tmp: Path, out: Path) -> Path:
    """Put a finished build in place: drop its progress records, rename the folder whole."""
    for name in ("progress.json", "tokenizer_sample.json"):
        (tmp / name).unlink(missing_ok=True)
    try:
        os.rename(tmp, out)  # atomic; loses the race cleanly if another process finished first
    except OSError:
        if not (out / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_token_store(corpus_cfg: CorpusConfig, tok_cfg: TokenizerConfig, data_dir: str | Path,
                      val_fraction: float = 0.02, encode_batch: int = 64, checkpoint_bytes: int = 64 << 20,
                      progress: bool = True) -> Path:
    """Build (or find, or finish) the token store for this corpus and tokenizer; returns its directory.

    One streaming pass: documents are tokenized in batches and appended to ``train.bin`` / ``val.bin`` in a
    ``.<name>.partial`` folder; every ``checkpoint_bytes`` of text the files are synced and ``progress.json``
    records the counts and the corpus reader's position, so a killed build resumes there (the bytes written
    after the last record are cut off) and ends with the same store. The folder is renamed into place whole.
    The pipeline calls this under the artifact store's lock (``stages/artifacts.py``), so concurrent jobs build
    it once and never share a partial folder."""
    data_dir = Path(data_dir)
    corpus = Corpus(corpus_cfg, data_dir / "corpus")
    out = data_dir / "tokens" / store_key(corpus, tok_cfg, val_fraction)
    if is_complete(out):
        log.info("token store found: %s", out)
        return out
    if not 0 < val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 0.5)")
    if corpus_cfg.kind == "hub" and corpus_cfg.max_bytes is None:
        raise ConfigError("data.corpus.max_bytes is null for a hub corpus: its stream is endless; set the text "
                         "budget (scale.corpus_max_bytes at scale=paper)")
    val_every = max(2, round(1 / val_fraction))
    tmp = data_dir / "tokens" / f".{out.name}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    progress_file = tmp / "progress.json"
    if (tmp / "meta.json").is_file():  # a build killed while it was being put in place: only that is left
        return _finish(tmp, out)
    state = json.loads(progress_file.read_text()) if progress_file.is_file() else None

    if (tmp / "tokenizer.json").is_file() and (tmp / "tokenizer_sample.json").is_file():
        tokenizer = load_tokenizer(tmp / "tokenizer.json")
        sample_info = json.loads((tmp / "tokenizer_sample.json").read_text())
    else:
        log.info("building token store %s", out)
        texts, sample_info = _train_sample(corpus, val_every, tok_cfg.train_bytes)
        tokenizer = build_tokenizer(tok_cfg, texts)
        if tok_cfg.kind != "bpe":
            sample_info = {"docs": 0, "bytes": 0, "rule": f"none: the {tok_cfg.kind} tokenizer is not trained"}
        write_json_atomic(tmp / "tokenizer_sample.json", sample_info)
        tokenizer.save(str(tmp / "tokenizer.json.tmp"))
        os.replace(tmp / "tokenizer.json.tmp", tmp / "tokenizer.json")  # after its sample's record
    eot = tokenizer.token_to_id(EOT)
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)

    counts = dict(state["counts"]) if state else {"train": 0, "val": 0}
    n_docs = dict(state["n_docs"]) if state else {"train": 0, "val": 0}
    n_bytes = int(state["n_bytes"]) if state else 0
    doc_index = int(state["doc_index"]) if state else 0
    if state:
        log.info("resuming token store %s after %s documents (%s tokens)", out, f"{doc_index:,}",
                 f"{sum(counts.values()):,}")
    reader = CorpusReader(corpus, state["reader"] if state else None)
    files = {}
    for split in counts:
        f = open(tmp / f"{split}.bin", "r+b" if state and (tmp / f"{split}.bin").is_file() else "wb")
        f.truncate(counts[split] * dtype.itemsize)  # drop what was written after the last record
        f.seek(0, os.SEEK_END)
        files[split] = f
    batch: list[str] = []

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

    def record() -> None:
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
        write_json_atomic(progress_file, {"counts": counts, "n_docs": n_docs, "n_bytes": n_bytes,
                                          "doc_index": doc_index, "reader": reader.state()})

    try:
        with tqdm(desc="tokenizing", unit="B", unit_scale=True, initial=n_bytes, total=corpus_cfg.max_bytes,
                  disable=not progress) as bar:
            last = n_bytes
            for text in reader:
                batch.append(text)
                size = len(text.encode())
                n_bytes += size
                bar.update(size)
                if len(batch) >= encode_batch:
                    flush()
                    if n_bytes - last >= checkpoint_bytes:
                        record()
                        last = n_bytes
            flush()
            record()
    finally:
        for f in files.values():
            f.close()
    if counts["val"] == 0 or counts["train"] == 0:
        raise InputError(f"corpus {corpus.info} gave {n_docs} documents: too few for a train/val split")
    meta = {
        "format": FORMAT, "version": VERSION, "tokenizer": "tokenizer.json", "tokenizer_config": asdict(tok_cfg),
        "tokenizer_sample": sample_info, "vocab_size": vocab, "eot_token": eot, "dtype": dtype.name,
        "n_tokens": counts, "n_docs": n_docs, "n_bytes": n_bytes,
        "bytes_per_token": round(n_bytes / max(1, sum(counts.values())), 4),
        "val_split": f"every {val_every}th document", "corpus": corpus.info,
    }
    write_json_atomic(tmp / "meta.json", meta)  # first: from here on a killed build only has to be renamed
    _finish(tmp, out)
    log.info("token store: %s train / %s val tokens, vocab %d", f"{counts['train']:,}", f"{counts['val']:,}", vocab)
    return out


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of the best model that ignores
    context, so a trained LM's val loss must fall clearly below it."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
