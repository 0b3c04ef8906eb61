"""Page-cache hints for files written or read once (activation shards), with fallbacks where the platform
lacks them: ``posix_fadvise`` and ``O_DIRECT`` are Linux (and some BSD) calls, macOS has neither, and it
has no ``fdatasync`` either. Without the hints the shards still read and write correctly, through the
page cache."""

from __future__ import annotations

import os

HAS_FADVISE = hasattr(os, "posix_fadvise")
HAS_O_DIRECT = hasattr(os, "O_DIRECT")


def drop(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop the file's cached pages in ``[offset, offset + length)`` (0: to the end);
    pages not yet written back stay (the call only starts their write-back). A no-op without fadvise."""
    if HAS_FADVISE:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def sequential(fd: int) -> None:
    """Hint a whole-file sequential read (a larger read-ahead). A no-op without fadvise."""
    if HAS_FADVISE:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def datasync(fd: int) -> None:
    """Flush the file's data to disk: ``fdatasync`` where it exists, ``fsync`` otherwise (macOS)."""
    getattr(os, "fdatasync", os.fsync)(fd)


def clear_direct(fd: int) -> None:
    """Turn ``O_DIRECT`` off on an open file (for an unaligned write)."""
    import fcntl  # POSIX only; reached only when O_DIRECT was set, which implies POSIX

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
