"""``TransformerModule``: next-token training of the one-layer transformer, and its export.

Export (read by activation caching, eval and steering): a folder with ``config.json`` (the
:class:`TransformerConfig`, the token store and training facts), ``model.safetensors`` and a copy of
``tokenizer.json``. Loading uses safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchmetrics import MeanMetric

from monosemantic.errors import InputError, MissingInputError
from monosemantic.models import guards
from monosemantic.models.components.hooked_form import hooked_config, hooked_state_dict
from monosemantic.models.components.transformer import Transformer
from monosemantic.utils.io import atomic_dir

EXPORT_FORMAT = "monosemantic.transformer"
EXPORT_VERSION = 1
HOOKED_DIR = "transformer_lens"  # the TransformerLens form, inside every transformer export
HOOKED_FORMAT = "monosemantic.hooked_transformer"
EOT = "<|endoftext|>"  # the document separator of both tokenizers (data/tokenizer.py)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


class TransformerModule(L.LightningModule):
    def __init__(self, net: Transformer, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, weight_decay_embeddings: bool = False) -> None:
        """
        Args:
            net: the transformer (instantiated from ``model.net``).
            optimizer: a partial optimizer (``_partial_: true``) given the parameter groups.
            warmup_steps: linear LR warm-up; cosine decay follows to the end of training.
            min_lr_ratio: the final LR as a fraction of the peak.
            weight_decay_embeddings: decay embeddings, biases and norms too (GPT-2 practice: no).
        """
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer"])  # weights_only-loadable
        self.optimizer_factory = optimizer
        self.net = net
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.validated_at_step: int | None = None  # the step of the last validation (None: never)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.net(tokens_BT)

    def _loss(self, window_BT1: torch.Tensor) -> torch.Tensor:
        logits_BTV = self.net(window_BT1[:, :-1])
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), window_BT1[:, 1:].flatten())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        guards.nonfinite_loss(self, loss, "stop")  # a NaN/inf loss stops the run, naming the step and checkpoint
        self.train_loss(loss)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), weight=batch.shape[0])
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def param_groups(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(decayed, not decayed), chosen by parameter identity: the matrices of the linear layers (the
        unembedding among them) decay; the token and position embeddings, biases and LayerNorm weights do
        not (GPT-2 practice). A tied unembedding *is* the token embedding, so it is not decayed."""
        embeddings = {id(self.net.embed.weight), id(self.net.pos_embed.weight)}
        params = list(self.net.parameters())  # each parameter once, also when tied
        if self.hparams.weight_decay_embeddings:
            return params, []
        decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
        decay_ids = {id(p) for p in decay}
        return decay, [p for p in params if id(p) not in decay_ids]

    def configure_optimizers(self):
        decay, no_decay = self.param_groups()
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = self.optimizer_factory(params=groups)
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(min(self.hparams.warmup_steps, max(1, total // 10)), total, self.hparams.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def export_transformer(net: Transformer, out_dir: str | Path, tokenizer_path: str | Path | None,
                       info: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``) into ``out_dir``, atomically: a
    reader (or a concurrent writer) sees the old folder or the new one whole, never a half-deleted one."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if net.cfg.tied_unembed:
        state.pop("unembed.weight", None)
    config = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": net.cfg.to_dict(),
              "hook": "blocks.0.mlp.hook_post", "tokenizer": "tokenizer.json" if tokenizer_path else None,
              **(info or {})}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        if tokenizer_path is not None:
            shutil.copy(tokenizer_path, tmp / "tokenizer.json")
        write_hooked_form(net, tmp / HOOKED_DIR, tokenizer_path)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def write_hooked_form(net: Transformer, out_dir: str | Path, tokenizer_path: str | Path | None) -> Path:
    """The TransformerLens form of ``net`` in ``out_dir`` (created; parents must exist)::

        config.json             HookedTransformerConfig(**config["cfg"])
        model.safetensors       the HookedTransformer state dict's parameters (models/components/hooked_form.py)
        tokenizer.json          our tokenizer, with tokenizer_config.json so that
                                transformers.AutoTokenizer.from_pretrained(out_dir) loads it offline

    ``monosemantic.interop.tlens.to_hooked_transformer`` loads it; so can plain TransformerLens.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir()
    save_file(hooked_state_dict(net), str(out_dir / "model.safetensors"))
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, out_dir / "tokenizer.json")
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": net.cfg.n_ctx,
                   "bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "clean_up_tokenization_spaces": False}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    config = {"format": HOOKED_FORMAT, "version": 1, "cfg": hooked_config(net.cfg),
              "tokenizer": "tokenizer.json" if tokenizer_path is not None else None}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def load_transformer(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """Load an exported transformer folder; returns the frozen model (eval mode) and its config.json."""
    path = Path(path)
    cfg_path, weights = path / "config.json", path / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise MissingInputError(f"{p} is missing: {path} is not an exported transformer "
                                    "(run `python src/train.py experiment=transformer_1l`)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != EXPORT_FORMAT or config.get("version") != EXPORT_VERSION:
        raise InputError(f"{cfg_path}: format {config.get('format')!r} v{config.get('version')} is not "
                         f"{EXPORT_FORMAT!r} v{EXPORT_VERSION}")
    net = Transformer(**config["model"])
    missing, unexpected = net.load_state_dict(load_file(str(weights), device="cpu"), strict=False)
    # a tied model has no unembed tensor (it is the embedding); anything else missing would load random weights
    if missing or unexpected:
        what = "; ".join(s for s in (f"missing tensor(s) {missing}" if missing else "",
                                     f"unexpected tensor(s) {unexpected}" if unexpected else "") if s)
        raise InputError(f"{weights}: {what} for the model described in {cfg_path}")
    net.requires_grad_(False)
    return net.eval().to(device), config


@torch.no_grad()
def shuffled_transformer(net: Transformer, seed: int = 0) -> Transformer:
    """The randomized control (the paper trains the same SAE on a transformer whose weights are shuffled): a
    copy of ``net`` with the entries of every parameter tensor permuted independently, so each matrix keeps
    its distribution of weights (scale, sparsity, outliers) but none of what training put where."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(net)
    for p in out.parameters():
        flat = p.detach().reshape(-1)
        p.copy_(flat[torch.randperm(flat.numel(), generator=g)].view_as(p))
    return out


def export_shuffled(model_dir: str | Path, out_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write the shuffled control of the transformer export ``model_dir`` beside it (or to ``out_dir``), with
    the same tokenizer and token store, so every stage that takes a transformer takes it."""
    model_dir = Path(model_dir)
    net, cfg = load_transformer(model_dir)
    out_dir = Path(out_dir) if out_dir else model_dir.with_name(f"{model_dir.name}-shuffled-s{seed}")
    tokenizer = model_dir / (cfg.get("tokenizer") or "tokenizer.json")
    # what the text and the data were stays true of the copy; what training measured does not
    info = {k: cfg[k] for k in ("token_store", "n_ctx", "corpus") if k in cfg}
    info["control"] = {"shuffled_from": str(model_dir), "seed": seed}
    return export_transformer(shuffled_transformer(net, seed), out_dir, tokenizer if tokenizer.is_file() else None,
                              info)
