"""Small file helpers shared by every writer: nothing is ever left half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from monosemantic.errors import DiskFullError


def current_umask() -> int:
    """The process's umask (Linux reports it in /proc; elsewhere it is read by setting it and back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file or folder: 0o666 (0o777) less the umask. ``tempfile``
    creates 0o600 files and 0o700 folders; renamed into place they would keep that, and other users of a shared
    machine could not read the results."""
    return (0o777 if directory else 0o666) & ~current_umask()


def _disk_full_cause(e: BaseException | None) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT`` error behind ``e``, if any. ``torch.save`` into a buffered file reports a full
    disk as ``RuntimeError: ... unexpected pos``, with the ``OSError`` only as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def raise_if_disk_full(e: BaseException, what: str, where: str | Path) -> None:
    """Turn ``ENOSPC`` (or a quota's ``EDQUOT``) while writing ``what``, raised or behind the error raised,
    into one clear :class:`~monosemantic.errors.DiskFullError`; any other error is left to the caller to
    re-raise."""
    if _disk_full_cause(e) is not None:
        try:
            folder = Path(where) if Path(where).is_dir() else Path(where).parent
            free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free there now"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(f"no space left on the device while writing {what} ({where}; {free}). Nothing "
                            "already there was replaced: the previous version is intact. Free space, or write "
                            "elsewhere (paths.output_dir / paths.data_dir), then run again (a training run "
                            "resumes with ckpt_path=last).") from e


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], what: str | None = None) -> None:
    """``write(f)`` into a temporary file beside ``path`` (binary, the mode a new file gets under the umask),
    fsync it, then ``os.replace`` it into place: ``path`` is the old file or the new one, never a part. On any
    error the temporary file is removed; a full disk becomes a :class:`DiskFullError` naming ``what``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, usual_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(e, what or path.name, path)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (indented, a final newline) through :func:`atomic_write`."""
    text = (json.dumps(obj, indent=2) + "\n").encode()  # serialised first: an unserialisable obj writes nothing
    atomic_write(path, lambda f: f.write(text))


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
        tmp.chmod(usual_mode(directory=True))
        yield tmp
        replace_dir(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(e, f"the folder {dst.name}", dst)
        raise
