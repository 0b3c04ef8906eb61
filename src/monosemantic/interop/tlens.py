"""Our transformer in TransformerLens: ``to_hooked_transformer(path)``.

``path`` is a transformer export (``data/models/<key>`` or a run's ``export/``). Exports written since the
TransformerLens form was added carry it in ``transformer_lens/``; older ones are converted in memory, the
same mapping (:mod:`monosemantic.models.components.hooked_form`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from monosemantic.errors import InputError
from monosemantic.models.transformer_module import HOOKED_DIR, HOOKED_FORMAT, load_transformer, write_hooked_form


def hf_tokenizer(folder: str | Path):
    """The ``transformers`` fast tokenizer in a TransformerLens-form folder (loaded from local files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _read_hooked(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text())
    if config.get("format") != HOOKED_FORMAT:
        raise InputError(f"{cfg_path}: format {config.get('format')!r} is not {HOOKED_FORMAT!r}")
    return config, load_file(str(folder / "model.safetensors"))


def to_hooked_transformer(path: str | Path, device: str = "cpu", cls: type | None = None):
    """A ``HookedTransformer`` (or ``cls``, e.g. ``sae_lens.HookedSAETransformer``) with our weights and
    tokenizer, in eval mode. Its ``blocks.0.mlp.hook_post`` is our ``blocks.0.mlp.hook_post``."""
    from transformer_lens import HookedTransformer

    cls = cls or HookedTransformer
    path = Path(path)
    if (path / HOOKED_DIR / "config.json").is_file():
        return _build(cls, path / HOOKED_DIR, device)
    net, meta = load_transformer(path)  # an export from before the TransformerLens form: write it aside first
    with tempfile.TemporaryDirectory() as tmp:
        tok = path / meta["tokenizer"] if meta.get("tokenizer") else None
        folder = write_hooked_form(net, Path(tmp) / HOOKED_DIR, tok)
        return _build(cls, folder, device)


def _build(cls, folder: Path, device: str):
    from transformer_lens import HookedTransformerConfig

    config, state = _read_hooked(folder)
    cfg = HookedTransformerConfig(**config["cfg"], device=device, init_weights=False)
    tokenizer = hf_tokenizer(folder) if config.get("tokenizer") else None
    model = cls(cfg, tokenizer=tokenizer, move_to_device=True)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise InputError(f"{folder}: the TransformerLens form does not match HookedTransformer "
                         f"(missing {missing}, unexpected {unexpected})")
    model.load_state_dict(state, strict=False)  # TransformerLens's own buffers (causal mask, IGNORE) stay
    model.requires_grad_(False)
    return model.eval()
