"""``ActivationDataModule``: a shard set (DESIGN §4) as Lightning's training and validation data.

- Training: an endless, token-shuffled :class:`~monosemantic.data.shards.reader.ActivationStream` over the
  manifest's shards but the last ``val_shards`` (each pass re-orders the shards with ``seed + pass``);
  ``max_steps`` bounds training, so ranks never disagree on when an epoch ends. A resume starts at the
  chunk it stopped in (O(1): nothing already trained on is read again).
- Validation: the held-out shards once, in order, and held-out token windows for loss recovered when the
  set came from text (the token store its manifest names).
- Batches are float32 ``[batch, d_in]``, multiplied by the normalisation scale (mean norm √d_in).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monosemantic.data.shards.format import ShardSetError, norm_scale, read_manifest
from monosemantic.data.shards.reader import ActivationStream, SkippedShards
from monosemantic.data.stream_datamodule import StreamDataModule
from monosemantic.data.token_datamodule import TokenWindows, tiled_starts
from monosemantic.data.token_store import load_split

log = logging.getLogger(__name__)


class ActivationDataModule(StreamDataModule):
    def __init__(self, shards: str | None = None, batch_size: int = 4096, buffer_tokens: int = 262_144,
                 val_shards: int = 1, val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 d_in: int | None = None, normalize: bool = True, skip_corrupt: bool = False,
                 lr_windows: int = 64, lr_batch_size: int = 16, drop_page_cache: bool = True) -> None:
        """
        Args:
            shards: the shard-set directory (``data.shards=<dir>``); null: the SAE stage builds or finds one.
            batch_size: activations per training batch (paper: 8,192).
            buffer_tokens: token-level shuffle buffer, in activations.
            val_shards: the last N shards of the manifest are held out for validation.
            d_in: expected activation width; null takes the manifest's (a mismatch is an error).
            normalize: scale activations so their mean norm is √d_in (the manifest's scale, or estimated).
            skip_corrupt: skip truncated or corrupt shards with a warning instead of failing.
            lr_windows: held-out token windows for loss recovered (when the manifest names a transformer).
            drop_page_cache: drop each shard's pages from the page cache as it is read (a shard set is read
                once per pass and at scale is far larger than RAM); false keeps a small, re-read set cached.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.scale = 1.0
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []

    @property
    def shards_dir(self) -> Path:
        if self.hparams.shards is None:
            raise ShardSetError("data.shards is not set: name a shard-set directory (data.shards=<dir>)")
        return Path(self.hparams.shards)

    @property
    def source(self) -> str:
        """Where the activations come from (recorded in metrics.json and the export)."""
        return str(self.shards_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.manifest:
            return
        m = read_manifest(self.shards_dir, self.hparams.d_in)
        names = [s["name"] for s in m["shards"]]
        n_val = self.hparams.val_shards
        if len(names) <= n_val:
            raise ShardSetError(f"{self.shards_dir}: {len(names)} shards cannot give {n_val} held-out "
                                "validation shard(s) and at least one for training")
        urls = [str(self.shards_dir / n) for n in names]
        self.skipped = SkippedShards(urls)
        self.train_urls, self.val_urls = urls[: len(urls) - n_val], urls[len(urls) - n_val :]
        self.manifest = m
        if self.hparams.normalize:
            norm = m.get("normalization") or {}
            self.scale = float(norm["scale"]) if "scale" in norm else self._estimate_scale()
        log.info("shard set %s: %s tokens, d_in %d, %d train / %d val shards, scale %.4f", self.shards_dir,
                 f"{m['n_tokens']:,}", m["d_in"], len(self.train_urls), len(self.val_urls), self.scale)

    def _estimate_scale(self, n_tokens: int = 65_536) -> float:
        # every rank reads the same shards (no split by node), so all ranks normalise alike
        stream = self.stream("train", urls=self.train_urls[:4], batch_size=n_tokens, scale=1.0, shuffle=False,
                             infinite=False, drop_last=False, split_nodes=False)
        return norm_scale(next(iter(stream)))

    def stream(self, split: str, **overrides: Any) -> ActivationStream:
        train = split == "train"
        kw = dict(urls=self.train_urls if train else self.val_urls, d_in=self.d_in,
                  batch_size=self.hparams.batch_size if train else (self.hparams.val_batch_size
                                                                    or self.hparams.batch_size),
                  buffer_tokens=self.hparams.buffer_tokens, scale=self.scale, seed=self.hparams.seed,
                  shuffle=train, infinite=train, drop_last=train, skip_corrupt=self.hparams.skip_corrupt,
                  drop_page_cache=self.hparams.drop_page_cache, skipped=self.skipped,
                  shard_tokens={str(self.shards_dir / s["name"]): int(s["n_tokens"])
                                for s in self.manifest["shards"]})
        kw.update(overrides)
        return ActivationStream(**kw)

    def lr_windows(self, n_windows: int | None = None) -> TokenWindows | None:
        """Held-out token windows (val split of the token store) for loss recovered, if the set came from text.

        ``n_windows`` overrides ``lr_windows`` (e.g. more windows for the final evaluation than during training);
        0 windows, like a set that did not come from text, gives None.
        """
        store = self.manifest.get("token_store")
        n_ctx = self.manifest.get("n_ctx")
        n_windows = self.hparams.lr_windows if n_windows is None else n_windows
        if not store or not n_ctx or not n_windows or not Path(store, "meta.json").is_file():
            return None
        val = load_split(store, "val")
        return TokenWindows(val, tiled_starts(len(val), int(n_ctx), n_windows), int(n_ctx) - 1)
