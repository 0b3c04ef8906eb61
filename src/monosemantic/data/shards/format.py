"""The activation shard-set contract (DESIGN §4): reading and validating ``manifest.json``, decoding samples.

A shard set is a directory of webdataset tars ``shard-000000.tar`` … and a ``manifest.json`` written last,
atomically: its presence means the set is complete. Each tar sample is one context: ``acts.npy``
(``[n, d_in]`` float16/float32) and, for activations of text, ``tokens.npy``, ``positions.npy`` and
``context.npy`` (int32). Arrays are decoded with ``allow_pickle=False``: never pickle.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from monosemantic.errors import UserError

FORMAT = "monosemantic.activations"
VERSION = 1
KNOWN_VERSIONS = (1,)
DTYPES = ("float16", "float32")


class ShardSetError(UserError, ValueError):
    """A shard set that does not follow the contract; the message names the directory or shard."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def read_manifest(shards_dir: str | Path, d_in: int | None = None) -> dict:
    """Read and check a shard set's manifest; raise :class:`ShardSetError` naming what is wrong."""
    shards_dir = Path(shards_dir)
    path = shards_dir / "manifest.json"
    if shards_dir.is_file():
        raise ShardSetError(f"shard set {shards_dir} is a file; a shard set is the folder that holds manifest.json "
                            f"and the shards: pass {shards_dir.parent}")
    if not shards_dir.is_dir():
        raise ShardSetError(f"shard set {shards_dir} does not exist")
    if not path.is_file():
        raise ShardSetError(f"shard set {shards_dir} has no manifest.json: it is incomplete (a cache run was "
                            "interrupted; re-run `python src/cache_activations.py` to finish it) or not a shard set")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardSetError(f"{path} is not valid JSON: {e}") from e
    if m.get("format") != FORMAT:
        raise ShardSetError(f"{path}: format {m.get('format')!r} is not {FORMAT!r}")
    if m.get("version") not in KNOWN_VERSIONS:
        raise ShardSetError(f"{path}: format version {m.get('version')!r} is unknown (this code reads "
                            f"versions {list(KNOWN_VERSIONS)})")
    for key in ("d_in", "dtype", "n_tokens", "shards"):
        if key not in m:
            raise ShardSetError(f"{path}: missing key {key!r}")
    if m["dtype"] not in DTYPES:
        raise ShardSetError(f"{path}: dtype {m['dtype']!r} is not one of {DTYPES}")
    if d_in is not None and int(m["d_in"]) != int(d_in):
        raise ShardSetError(f"{path}: d_in={m['d_in']} but the model expects d_in={d_in}")
    total = sum(int(s["n_tokens"]) for s in m["shards"])
    if total != int(m["n_tokens"]):
        raise ShardSetError(f"{path}: shards hold {total} tokens but n_tokens={m['n_tokens']}")
    missing = [s["name"] for s in m["shards"] if not (shards_dir / s["name"]).is_file()]
    if missing:
        raise ShardSetError(f"{shards_dir}: shards listed in manifest.json are missing: {missing[:5]}")
    return m


def row_norms(acts_NM: np.ndarray | torch.Tensor) -> np.ndarray:
    """‖x‖ of each row, in float32 (each row's value does not depend on how the rows are batched)."""
    x = torch.as_tensor(np.asarray(acts_NM)).float()
    return torch.linalg.vector_norm(x, dim=1).numpy()


def scale_from_norms(norms_N: np.ndarray, d_in: int) -> float:
    """s such that mean ‖s·x‖ = √d_in, given the rows' norms."""
    return float(math.sqrt(d_in) / max(float(np.mean(norms_N, dtype=np.float64)), 1e-8))


def norm_scale(acts_NM: np.ndarray | torch.Tensor) -> float:
    """s such that mean ‖s·x‖ = √d_in (SAELens-style normalisation; folded back into the export)."""
    return scale_from_norms(row_norms(acts_NM), np.shape(acts_NM)[1])


_NPY_MAGIC = b"\x93NUMPY\x01"  # format 1.0: 2-byte header length at 8..10, then the header text
_npy_layouts: dict[bytes, tuple[np.dtype, tuple[int, ...], str]] = {}  # header bytes → how to read the data


def load_npy(data: bytes, what: str) -> np.ndarray:
    """A ``.npy`` array from its bytes (never pickle). Within a shard set every sample's header is the same,
    so a header seen before is not parsed again (``np.load`` evaluates it as a Python literal each time: a
    third of the decoding cost): the data is read straight from the bytes after it. Anything else, or data
    of the wrong length, goes through ``np.load`` (and its error)."""
    header = data[: 10 + int.from_bytes(data[8:10], "little")] if data[:7] == _NPY_MAGIC else None
    layout = _npy_layouts.get(header) if header is not None else None
    if layout is not None:
        dtype, shape, order = layout
        if len(data) - len(header) == dtype.itemsize * math.prod(shape):
            return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape, order=order).copy(order=order)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError for damaged arrays
        raise ShardSetError(f"{what}: not a plain .npy array ({e})") from e
    if header is not None and len(_npy_layouts) < 256:
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        _npy_layouts[header] = (arr.dtype, arr.shape, order)
    return arr


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or inf. For float16 the exponent bits are tested as integers: numpy's ``isfinite`` has no fast
    path for half floats (61 vs 4 µs for a 128 × 512 context, a sixth of the decoding)."""
    if arr.dtype == np.float16:
        return arr.size == 0 or int((arr.view(np.uint16) & 0x7C00).max()) != 0x7C00
    return bool(np.isfinite(arr).all())


def decode_context(sample: dict, d_in: int, extras: tuple[str, ...] = ("tokens", "positions", "context")
                   ) -> dict[str, np.ndarray]:
    """Decode one tar sample into arrays (``acts`` and those of ``extras`` present); checks shape and
    finiteness, naming the shard and key. The training stream asks for ``acts`` alone."""
    where = f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"
    if "acts.npy" not in sample:
        raise ShardSetError(f"{where}: no acts.npy (keys: {sorted(k for k in sample if not k.startswith('__'))})")
    out = {"acts": load_npy(sample["acts.npy"], where)}
    acts = out["acts"]
    if acts.ndim != 2 or acts.shape[1] != d_in:
        raise ShardSetError(f"{where}: acts has shape {acts.shape}, expected [n, {d_in}]")
    if not all_finite(acts):
        raise ShardSetError(f"{where}: acts contain NaN or inf")
    for name in extras:
        if f"{name}.npy" in sample:
            out[name] = load_npy(sample[f"{name}.npy"], where)
    return out
