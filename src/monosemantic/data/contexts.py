"""Which contexts and positions an activation stream holds: shared by the cache (written once) and the
on-the-fly source (generated while training), so both give the same activations for the same settings.

- Contexts are non-overlapping ``n_ctx`` windows of a token split, in a seeded random order, never repeated.
- They are grouped in *blocks* of ``contexts_per_block`` consecutive contexts of that order (a cache shard is
  one block). From each context ``k`` distinct positions are drawn from a generator seeded by
  ``(seed, block)``: a resumed run, a cache that restarts at a shard, or another worker draws the same ones.
- Later passes over the same contexts take the next ``k`` positions of the same per-context permutation, so
  ``n_ctx // k`` passes (4 at the paper's 250 of 1,024) see no (context, position) twice; only after those
  does a fresh permutation start, and activations may repeat (:func:`distinct_passes`).
"""

from __future__ import annotations

import numpy as np

from monosemantic.errors import ConfigError


def context_starts(n_tokens: int, n_ctx: int, n_contexts: int | None, seed: int) -> np.ndarray:
    """The first ``n_contexts`` (None: all) non-overlapping ``n_ctx`` tiles of ``n_tokens`` tokens, in a seeded
    random order."""
    tiles = np.arange(0, n_tokens - n_ctx + 1, n_ctx)
    n_contexts = len(tiles) if n_contexts is None else n_contexts
    if n_contexts > len(tiles):
        raise ConfigError(f"n_contexts={n_contexts:,} but the token split holds only {len(tiles):,} "
                         f"non-overlapping contexts of {n_ctx} tokens (contexts are never repeated)")
    return np.random.default_rng(seed).permutation(tiles)[:n_contexts]


def n_tiles(n_tokens: int, n_ctx: int) -> int:
    """How many non-overlapping ``n_ctx`` contexts a split of ``n_tokens`` holds."""
    return max(0, (n_tokens - n_ctx) // n_ctx + 1)


def distinct_passes(n_ctx: int, k: int) -> int:
    """Passes over the same contexts before a (context, position) can come back: ``n_ctx // k``."""
    return max(1, n_ctx // k)


def block_positions(block: int, n: int, n_ctx: int, k: int, seed: int, pass_index: int = 0) -> np.ndarray:
    """``[n, k]``: for each of a block's ``n`` contexts, ``k`` distinct positions in ascending order.

    Pass 0 is what the cache writes (every position, without drawing, when ``k == n_ctx``); pass ``p`` takes
    the ``p``-th run of ``k`` positions of the same per-context permutation while they last
    (:func:`distinct_passes`), then a permutation seeded by the cycle as well."""
    if k > n_ctx:
        raise ConfigError(f"tokens_per_context={k} exceeds n_ctx={n_ctx}")
    if k == n_ctx:
        return np.broadcast_to(np.arange(n_ctx), (n, n_ctx))
    cycle, slot = divmod(pass_index, distinct_passes(n_ctx, k))
    rng = np.random.default_rng([seed, block] if cycle == 0 else [seed, block, cycle])
    perm = np.argsort(rng.random((n, n_ctx)), axis=1)
    return np.sort(perm[:, slot * k : (slot + 1) * k], axis=1)
