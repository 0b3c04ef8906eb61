"""On-the-fly activations: the frozen transformer's MLP activations generated while the SAE trains, with no
cache on disk (DESIGN §6: at the paper's scale a cache would be 8.7 TB).

:class:`OnTheFlyStream` is a :class:`~monosemantic.data.chunks.ChunkedStream` whose units are *blocks* of
contexts (:mod:`monosemantic.data.contexts`): for each chunk it runs the transformer to the MLP hook over the
chunk's contexts, on the device it is given (the SAE's), keeps the sampled positions of each context in a
buffer on that device, permutes them and yields batches. Pass 0 holds exactly the activations the cache would
write for the same model and settings (a test holds them equal); later passes take new positions of the same
contexts (:func:`~monosemantic.data.contexts.block_positions`). Ranks and workers take disjoint blocks; the
same seed gives the same stream; a resume loads one chunk, whatever the step.

:class:`OnTheFlyDataModule` has the interface of :class:`~monosemantic.data.activation_datamodule.
ActivationDataModule` (``stream``, ``sample_activations``, ``lr_windows``, ``scale``, ``manifest``), so the
SAE stage, its metrics and its export do not know which source fed them. Validation activations come from
the token store's *held-out documents* (its val split), not from held-out contexts of training documents.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monosemantic.data.chunks import ChunkedStream, RowBuffer
from monosemantic.data.contexts import block_positions, context_starts, n_tiles
from monosemantic.data.shards.format import norm_scale
from monosemantic.data.shards.reader import SkippedShards
from monosemantic.data.stream_datamodule import StreamDataModule
from monosemantic.data.token_datamodule import TokenWindows, tiled_starts
from monosemantic.data.token_store import check_store_matches_model, load_split
from monosemantic.errors import ConfigError, InputError
from monosemantic.models.components.transformer import MLP_HOOK
from monosemantic.models.transformer_module import load_transformer

log = logging.getLogger(__name__)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# what an on-the-fly run records as its dataset (the export's ``dataset_path``): the source and its held-out
# settings, so evaluation and the dashboard can regenerate the same held-out activations
SOURCE_PREFIX = "on-the-fly:"
RECORDED = ("model_dir", "token_store", "n_contexts", "tokens_per_context", "contexts_per_block", "val_tokens",
            "seed", "buffer_dtype")


def source_model_dir(source: str | None) -> str | None:
    """The transformer folder of an on-the-fly source string (None: the source is a shard set)."""
    return source[len(SOURCE_PREFIX):] if source and source.startswith(SOURCE_PREFIX) else None


class OnTheFlyStream(ChunkedStream):
    """Batches of MLP activations of ``net`` over contexts of ``tokens`` starting at ``starts`` (see module).

    ``new_positions``: pass ``p`` samples the ``p``-th run of positions (training); false: every pass samples
    pass 0's (a fixed held-out set). ``ids`` (``with_ids``) are ``context index · n_ctx + position``."""

    def __init__(self, net: torch.nn.Module, tokens: np.ndarray, starts: np.ndarray, n_ctx: int,
                 tokens_per_context: int, contexts_per_block: int, batch_size: int, buffer_tokens: int,
                 scale: float = 1.0, seed: int = 0, position_seed: int | None = None, shuffle: bool = True,
                 infinite: bool = False, drop_last: bool = True, with_ids: bool = False, split_nodes: bool = True,
                 skip_batches: int = 0, device: str | torch.device = "cpu", dtype: str = "float16",
                 forward_batch: int = 64, new_positions: bool = True, blocks: list[int] | None = None) -> None:
        super().__init__(batch_size, buffer_tokens if shuffle else batch_size, scale, seed, shuffle, infinite,
                         drop_last, with_ids, split_nodes, skip_batches)
        if dtype not in DTYPES:
            raise ConfigError(f"data.buffer_dtype={dtype!r} is not one of {sorted(DTYPES)}")
        self.net, self.tokens, self.starts, self.n_ctx = net, tokens, np.asarray(starts), n_ctx
        self.k, self.cpb, self.device, self.dtype = tokens_per_context, contexts_per_block, str(device), DTYPES[dtype]
        self.position_seed = seed if position_seed is None else position_seed
        self.forward_batch, self.new_positions = forward_batch, new_positions
        self.n_blocks = math.ceil(len(self.starts) / contexts_per_block)
        self.blocks = list(range(self.n_blocks)) if blocks is None else list(blocks)
        self.contexts_forwarded = 0  # contexts run through the transformer by this process

    def block_rows(self, block: int) -> int:
        lo = block * self.cpb
        return (min(lo + self.cpb, len(self.starts)) - lo) * self.k

    def units(self, pass_index: int) -> list[tuple[int, int]]:
        blocks = list(self.blocks)
        if self.shuffle:
            random.Random(self.seed + pass_index).shuffle(blocks)  # same order on every rank, then split
        return [(b, self.block_rows(b)) for b in blocks]

    def check_slots(self, n_units: int, n_slots: int) -> None:
        if n_units < n_slots:
            raise ConfigError(f"{n_units} blocks of contexts cannot feed {n_slots} ranks × workers: lower "
                             "data.contexts_per_block or use fewer workers")

    @torch.no_grad()
    def load(self, units: list[int], pass_index: int) -> RowBuffer:
        want, have = torch.device(self.device), next(self.net.parameters()).device
        if want.type != have.type or (want.index is not None and want.index != have.index):
            self.net = self.net.to(want)  # the datamodule's one copy: every stream moves it where it runs
        buf = self.row_buffer(sum(self.block_rows(b) for b in units), self.net.cfg.d_mlp, self.dtype, self.device)
        window = np.arange(self.n_ctx)
        for b in units:
            lo, hi = b * self.cpb, min((b + 1) * self.cpb, len(self.starts))
            pos_NK = block_positions(b, hi - lo, self.n_ctx, self.k, self.position_seed,
                                     pass_index if self.new_positions else 0)
            for f in range(lo, hi, self.forward_batch):
                idx = np.arange(f, min(f + self.forward_batch, hi))
                ctx_BT = torch.from_numpy(self.tokens[self.starts[idx, None] + window].astype(np.int64))
                acts_BTM = self.net.mlp_acts(ctx_BT.to(self.device, non_blocking=True))
                pos_BK = torch.from_numpy(np.ascontiguousarray(pos_NK[f - lo : f - lo + len(idx)])).to(self.device)
                picked = acts_BTM.gather(1, pos_BK[..., None].expand(-1, -1, acts_BTM.shape[-1]))
                ids = (torch.from_numpy(idx).to(self.device)[:, None] * self.n_ctx + pos_BK).reshape(-1)
                buf.append(picked.reshape(-1, picked.shape[-1]).to(self.dtype), ids if self.with_ids else None)
                self.contexts_forwarded += len(idx)
        return buf


class OnTheFlyDataModule(StreamDataModule):
    def __init__(self, model_dir: str | None = None, token_store: str | None = None, n_contexts: int | None = None,
                 tokens_per_context: int = 64, contexts_per_block: int = 1024, batch_size: int = 4096,
                 buffer_tokens: int = 262_144, val_tokens: int = 65_536, val_batch_size: int = 8192,
                 num_workers: int = 0, seed: int = 0, d_in: int | None = None, normalize: bool = True,
                 buffer_dtype: str = "float16", forward_batch: int = 64, device: str = "auto",
                 lr_windows: int = 64, lr_batch_size: int = 16) -> None:
        """
        Args:
            model_dir: an exported transformer; null: the SAE stage fills in the one this scale implies.
            token_store: the token store whose train split gives the contexts (null: the transformer's).
            n_contexts: contexts in a pass (null: every non-overlapping context of the train split).
            tokens_per_context: positions sampled per context (paper: 250).
            contexts_per_block: contexts that share a position draw (a cache shard's worth: the same draws).
            buffer_tokens: activations per shuffled chunk, on the device (float16: 1 KB each at d_in 512).
            val_tokens: held-out activations per validation, from the val split's documents.
            normalize: scale activations so their mean norm is √d_in (measured on block 0, as the cache does);
                false trains on raw activations (the paper's λ then means what it meant there).
            buffer_dtype: the chunk buffer's dtype (float16: what a cache stores).
            forward_batch: contexts per transformer forward.
            device: where the transformer runs and the chunk lives; "auto": the trainer's device (CPU alone).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.scale = 1.0
        self.net: torch.nn.Module | None = None
        self.skipped = SkippedShards([])  # no shards: nothing to skip (the SAE stage reports the count)

    # -- setup ----------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return f"{SOURCE_PREFIX}{self.hparams.model_dir}"

    def recorded(self) -> dict:
        """The settings an export records so that ``src/eval.py`` regenerates the same held-out set."""
        return {k: self.hparams[k] for k in RECORDED}

    def setup(self, stage: str | None = None) -> None:
        if self.manifest:
            return
        if not self.hparams.model_dir:
            raise ConfigError("data.model_dir is not set: name an exported transformer (the SAE stage fills it in "
                             "with the one this scale trains)")
        self.net, mcfg = load_transformer(self.hparams.model_dir, "cpu")
        d_mlp, n_ctx = int(self.net.cfg.d_mlp), int(mcfg["model"]["n_ctx"])
        if self.hparams.d_in is not None and int(self.hparams.d_in) != d_mlp:
            raise ConfigError(f"data.d_in={self.hparams.d_in} but the transformer at {self.hparams.model_dir} has "
                             f"d_mlp={d_mlp}")
        store = self.hparams.token_store or mcfg.get("token_store")
        if not store:
            raise InputError(f"{self.hparams.model_dir}/config.json names no token store; set data.token_store")
        model_dir = Path(self.hparams.model_dir)
        check_store_matches_model(store, self.net.cfg.vocab_size,
                                  model_dir / mcfg["tokenizer"] if mcfg.get("tokenizer") else None, model_dir)
        k = int(self.hparams.tokens_per_context)
        if not 0 < k <= n_ctx:
            raise ConfigError(f"data.tokens_per_context={k} must be in [1, n_ctx={n_ctx}]")
        self.train_tokens, self.val_tokens = load_split(store, "train"), load_split(store, "val")
        self.starts = context_starts(len(self.train_tokens), n_ctx, self.hparams.n_contexts, self.hparams.seed)
        n_val = min(n_tiles(len(self.val_tokens), n_ctx), math.ceil(self.hparams.val_tokens / k))
        if n_val == 0:
            raise InputError(f"{store}/val.bin holds {len(self.val_tokens)} tokens: not one context of {n_ctx}")
        self.val_starts = np.arange(n_val) * n_ctx  # the held-out documents' contexts, in order
        self.manifest = {
            "d_in": d_mlp, "hook": MLP_HOOK, "n_ctx": n_ctx, "tokens_per_context": k, "token_store": str(store),
            "n_contexts": len(self.starts), "n_tokens": len(self.starts) * k, "val_tokens": n_val * k,
            "model": {"checkpoint": str(Path(self.hparams.model_dir).resolve()), "config": mcfg["model"]},
            "source": "on-the-fly",
        }
        if self.hparams.normalize:  # block 0's rows, as the cache measures shard 0: the same scale
            s = self.stream("train", blocks=[0], shuffle=False, infinite=False, drop_last=False, scale=1.0,
                            split_nodes=False, batch_size=self.hparams.contexts_per_block * k, device="cpu")
            self.scale = norm_scale(torch.cat(list(s)))
        log.info("on-the-fly activations of %s: %s contexts × %d positions per pass (%s activations), held-out "
                 "%s activations from the val split, scale %.4f", self.hparams.model_dir, f"{len(self.starts):,}", k,
                 f"{self.manifest['n_tokens']:,}", f"{self.manifest['val_tokens']:,}", self.scale)

    def device(self) -> str:
        if self.hparams.device != "auto":
            return self.hparams.device
        trainer = getattr(self, "trainer", None)
        return str(trainer.strategy.root_device) if trainer is not None else "cpu"

    def stream(self, split: str, **overrides: Any) -> OnTheFlyStream:
        self.setup()
        train = split == "train"
        kw = dict(net=self.net, tokens=self.train_tokens if train else self.val_tokens,
                  starts=self.starts if train else self.val_starts, n_ctx=self.manifest["n_ctx"],
                  tokens_per_context=self.manifest["tokens_per_context"],
                  contexts_per_block=self.hparams.contexts_per_block,
                  batch_size=self.hparams.batch_size if train else self.hparams.val_batch_size,
                  buffer_tokens=self.hparams.buffer_tokens, scale=self.scale, seed=self.hparams.seed,
                  shuffle=train, infinite=train, drop_last=train, new_positions=train, device=self.device(),
                  dtype=self.hparams.buffer_dtype, forward_batch=self.hparams.forward_batch)
        kw.update(overrides)
        if self.hparams.num_workers > 0 and torch.device(kw["device"]).type != "cpu":
            raise ConfigError("data.num_workers > 0 runs the transformer in worker processes, on the CPU: set "
                             "data.num_workers=0 to generate activations on the GPU")
        return OnTheFlyStream(**kw)

    # -- held-out token windows and samples --------------------------------------------------------------
    def lr_windows(self, n_windows: int | None = None) -> TokenWindows | None:
        self.setup()
        n_windows = self.hparams.lr_windows if n_windows is None else n_windows
        if not n_windows:
            return None
        n_ctx = int(self.manifest["n_ctx"])
        return TokenWindows(self.val_tokens, tiled_starts(len(self.val_tokens), n_ctx, n_windows), n_ctx - 1)

    def _sample_overrides(self, n_tokens: int) -> dict[str, Any]:
        # one chunk just big enough, at the positions training draws (the data seed), in the seed's order
        return {"buffer_tokens": n_tokens, "position_seed": self.hparams.seed}
