"""Small file helpers shared by every writer: nothing is ever left half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to a temporary file in the same folder, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the complete folder ``src`` to ``dst``. An existing ``dst`` is first renamed aside and then
    removed, so at every moment ``dst`` is the old complete folder, absent, or the new one (never a mix,
    and never a half-deleted one, which ``rmtree`` then ``rename`` would leave to a concurrent reader)."""
    src, dst = Path(src), Path(dst)
    try:
        os.rename(src, dst)  # atomic when dst does not exist (or is an empty folder)
        return
    except OSError:
        if not dst.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)  # put the old folder back: dst is never left missing
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)  # only once the new folder is in place


@contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` write into ``tmp`` (a fresh folder beside ``out``); on success it
    replaces ``out`` whole (:func:`replace_dir`), on an error it is removed and ``out`` is left as it was.
    Each writer gets its own temporary folder, so no writer touches another's files; two writers that replace
    the same ``out`` at once must hold its lock (the artifact store's), or one of them may fail."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
