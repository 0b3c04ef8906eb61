"""Read an offline W&B run's data file (``run-<id>.wandb``) the way ``wandb sync`` does: a LevelDB-style log
(32 KiB blocks of records, each with a 7-byte header: CRC32, little-endian length, type) after a 7-byte W&B
header, each record a ``wandb_internal_pb2.Record``. For tests that check what a run recorded (its name,
group, tags) without a server."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + n]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: record at byte {pos} fails its checksum")
        parts += payload
        pos += 7 + n
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            yield rec


def run_record(path: str | Path):
    """The run's ``RunRecord`` (``display_name``, ``run_group``, ``tags``, ``job_type``…)."""
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    raise ValueError(f"{path}: no run record")
