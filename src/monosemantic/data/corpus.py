"""Text corpora, read through Hugging Face ``datasets``.

A corpus yields documents (strings) in a fixed order and has a fingerprint that keys everything built
from it. Kinds:

- ``linux_doc`` (default): the Linux kernel documentation from Debian's ``linux-doc`` package
  (GPL-2.0, ~25 MB of technical English by thousands of authors). ``make corpus`` installs it.
  The ``.rst``/``.txt`` files (gzipped or not, ``translations/`` skipped) are gathered once into a
  JSON-lines file under ``data/corpus/`` whose SHA-256 is recorded.
- ``python_stdlib``: the Python standard library's own source (PSF licence; needs no install) —
  code and docstrings, used by the tests.
- ``files``: local ``text``/``json``/``parquet`` files (``data_files`` glob or list).
- ``hub``: a dataset on the Hugging Face hub, streamed (``streaming=True``) and cut at ``max_bytes``.

Any kind can be read as a stream (``streaming``; the hub always is): the documents, and so the token store,
are the same either way. :class:`CorpusReader` keeps the reading position (rows read, text read, and for a
stream ``datasets``' own ``state_dict``), so a tokenization that was stopped goes on where it was.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import json
import logging
import lzma
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from monosemantic.errors import UserError
from monosemantic.utils.io import atomic_write

log = logging.getLogger(__name__)

LINUX_DOC_GLOB = "/usr/share/doc/linux-doc-*/Documentation"
KINDS = ("linux_doc", "python_stdlib", "files", "hub")


class CorpusError(UserError, RuntimeError):
    """A corpus that cannot be read as asked: missing files, no text, an unknown kind."""


@dataclass
class CorpusConfig:
    kind: str = "linux_doc"
    # linux_doc / python_stdlib: where the files are (None: the standard location)
    root: str | None = None
    # files: a glob or list of local files, read with the `builder` of datasets (text/json/parquet)
    data_files: str | list[str] | None = None
    builder: str = "text"
    # hub: dataset path, config name and split, streamed
    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    # cap on the text read (hub corpora are endless); None reads all
    max_bytes: int | None = None
    # read as a stream (datasets' IterableDataset) instead of an Arrow table; hub corpora always stream
    streaming: bool = False
    extensions: list[str] = field(default_factory=lambda: [".rst", ".txt"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gather_files(cfg: CorpusConfig) -> tuple[Path, list[Path]]:
    if cfg.kind == "linux_doc":
        roots = [cfg.root] if cfg.root else sorted(glob.glob(LINUX_DOC_GLOB))
        if not roots or not Path(roots[-1]).is_dir():
            raise CorpusError(
                "the default corpus (Linux kernel documentation) is not installed: expected "
                f"{cfg.root or LINUX_DOC_GLOB}. Run `make corpus` (as root: apt-get install linux-doc), "
                "or point at other text with data=local_files data.corpus.data_files='path/*.txt'.")
        root = Path(roots[-1])
        files = [p for p in root.rglob("*") if p.is_file() and "translations" not in p.parts
                 and any(p.name.endswith(ext) or p.name.endswith(ext + ".gz") for ext in cfg.extensions)]
    else:  # python_stdlib
        root = Path(cfg.root or sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py") if p.is_file()
                 and not ({"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(p.parts))]
    return root, sorted(files)


def _read(path: Path) -> str:
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _materialize(cfg: CorpusConfig, cache_dir: Path) -> tuple[Path, dict]:
    """Gather a file-tree corpus into one JSON-lines file (written once, atomically)."""
    root, files = _gather_files(cfg)
    listing = hashlib.sha256("\n".join(f"{p.relative_to(root)}:{p.stat().st_size}" for p in files).encode())
    listing.update(f"max_bytes={cfg.max_bytes}".encode())
    key = f"{cfg.kind}-{listing.hexdigest()[:12]}"
    out = cache_dir / f"{key}.jsonl"
    if not out.exists():
        log.info("gathering %d files of %s into %s", len(files), root, out)
        cache_dir.mkdir(parents=True, exist_ok=True)

        def write(f: IO[bytes]) -> None:
            total = 0
            for p in files:
                text = _read(p)
                if text.strip():
                    f.write((json.dumps({"text": text, "source": str(p.relative_to(root))}) + "\n").encode())
                    total += len(text)
                if cfg.max_bytes is not None and total >= cfg.max_bytes:
                    break

        atomic_write(out, write, f"the gathered corpus {out.name}")  # a bad file or a kill leaves no part
    info = {"kind": cfg.kind, "root": str(root), "n_files": len(files), "file": out.name,
            "sha256": _sha256(out)}
    return out, info


# Compressed files ``datasets`` decompresses itself: the stdlib ones are checked through their decompressor (offsets
# are then in the decompressed text), the others are left to ``datasets``.
_DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_UNCHECKED_SUFFIXES = (".zst", ".zstd", ".lz4", ".zip", ".tar", ".7z")


def check_text_file(path: Path, chunk: int = 1 << 20) -> None:
    """Raise :class:`CorpusError` naming ``path`` and the byte where it stops being UTF-8 text (a NUL byte: a
    binary file; an invalid sequence: another encoding). One streaming pass, in ``chunk``-byte reads; a ``.gz``,
    ``.bz2`` or ``.xz`` file is checked decompressed, other compressed files are not checked."""
    suffix = path.suffix.lower()
    if suffix in _UNCHECKED_SUFFIXES:
        return
    opener = _DECOMPRESSORS.get(suffix, open)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with opener(path, "rb") as f:
            while block := f.read(chunk):
                nul = block.find(b"\0")
                if nul >= 0:
                    raise CorpusError(f"corpus file {path} is not text: a NUL byte at offset {offset + nul:,} "
                                      "(a binary file?); data.corpus.data_files should match text files only")
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    raise CorpusError(f"corpus file {path} is not UTF-8 text: byte {offset + e.start:,} "
                                      f"({block[e.start:e.start + 1]!r}) starts no UTF-8 character. Convert it "
                                      "(e.g. iconv -f latin1 -t utf-8) or leave it out of data.corpus.data_files"
                                      ) from None
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorpusError(f"corpus file {path} is not UTF-8 text: it ends inside a character") from None
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise CorpusError(f"corpus file {path} cannot be read: {e}") from e


class Corpus:
    """Documents of a corpus, in a fixed order, read with ``datasets``."""

    def __init__(self, cfg: CorpusConfig, cache_dir: str | os.PathLike) -> None:
        if cfg.kind not in KINDS:
            raise CorpusError(f"data.corpus.kind={cfg.kind!r} is not one of {KINDS}")
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)
        self.info: dict = {}
        self._load_args: dict = {}
        if cfg.kind in ("linux_doc", "python_stdlib"):
            path, self.info = _materialize(cfg, self.cache_dir)
            self._load_args = {"path": "json", "data_files": str(path), "split": "train",
                               "streaming": cfg.streaming}
        elif cfg.kind == "files":
            if not cfg.data_files:
                raise CorpusError("data.corpus.kind=files needs data.corpus.data_files (a glob or list)")
            files = sorted(glob.glob(cfg.data_files)) if isinstance(cfg.data_files, str) else list(cfg.data_files)
            if not files:
                raise CorpusError(f"data.corpus.data_files={cfg.data_files!r} matches no file")
            if cfg.builder in ("text", "json"):
                for f in files:
                    check_text_file(Path(f))
            self._load_args = {"path": cfg.builder, "data_files": files, "split": "train", "streaming": cfg.streaming}
            digest = hashlib.sha256()
            for f in files:
                digest.update(_sha256(Path(f)).encode())
            self.info = {"kind": "files", "builder": cfg.builder, "files": [os.path.basename(f) for f in files],
                         "sha256": digest.hexdigest()}
        else:  # hub
            if not cfg.path:
                raise CorpusError("data.corpus.kind=hub needs data.corpus.path (a hub dataset name)")
            self._load_args = {"path": cfg.path, "name": cfg.name, "split": cfg.split, "streaming": True}
            self.info = {"kind": "hub", "path": cfg.path, "name": cfg.name, "split": cfg.split,
                         "max_bytes": cfg.max_bytes}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.info, sort_keys=True).encode()).hexdigest()[:16]

    def load(self):
        """The ``datasets`` dataset (an ``IterableDataset`` when streaming)."""
        import datasets  # imported here: a cold import costs seconds

        try:
            return datasets.load_dataset(**self._load_args)
        except Exception as e:  # datasets raises many types; name what we tried to load
            raise CorpusError(f"could not load corpus {self._load_args}: {e}") from e

    def documents(self) -> Iterator[str]:
        return iter(CorpusReader(self))


class CorpusReader:
    """A corpus's non-empty documents in order, from a position (:meth:`state`) that resumes exactly. The text
    cap ``max_bytes`` counts UTF-8 bytes; the document that reaches it is the last one."""

    def __init__(self, corpus: Corpus, state: dict | None = None) -> None:
        import datasets

        self.corpus, self.ds = corpus, corpus.load()
        state = state or {}
        self.rows, self.bytes = int(state.get("rows", 0)), int(state.get("bytes", 0))
        self.streaming = isinstance(self.ds, datasets.IterableDataset)
        self._skipped = False  # positioned by skipping rows: its state is the row count alone
        if self.rows:
            if self.streaming and state.get("dataset") is not None:
                self.ds.load_state_dict(state["dataset"])  # datasets' own position: no re-reading
            else:  # a table, or a stream resumed from a position recorded without streaming: skip the rows
                self.ds = self.ds.skip(self.rows)
                self._skipped = True

    def state(self) -> dict:
        """Where the reader is: after the last document it yielded."""
        return {"rows": self.rows, "bytes": self.bytes,
                "dataset": self.ds.state_dict() if self.streaming and not self._skipped else None}

    def _capped(self) -> bool:
        return self.corpus.cfg.max_bytes is not None and self.bytes >= self.corpus.cfg.max_bytes

    def __iter__(self) -> Iterator[str]:
        cfg = self.corpus.cfg
        if self._capped():  # resumed after the last document
            return
        for row in self.ds:
            self.rows += 1
            if cfg.text_field not in row:
                raise CorpusError(f"corpus rows have no field {cfg.text_field!r} (fields: {sorted(row)}); "
                                  "set data.corpus.text_field")
            text = row[cfg.text_field]
            if not text:
                continue
            self.bytes += len(text.encode())  # before the yield: a state taken while suspended counts it
            yield text
            if self._capped():
                return
