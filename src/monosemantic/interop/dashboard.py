"""SAEDashboard's feature-centric view of chosen features of our SAE, on our transformer and held-out text.

An optional path beside our own browser (``python src/dashboard.py``)::

    .venv-interop/bin/python -m monosemantic.interop dashboard --sae <export> --transformer <data/models/...> \\
        --features 0 1 2 --out logs/sae_dashboard.html
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from monosemantic.errors import InputError


def held_out_windows(transformer_dir: str | Path, n_windows: int) -> torch.Tensor:
    """The first ``n_windows`` n_ctx-token windows of the validation split the transformer was trained beside."""
    from monosemantic.analysis.collect import token_windows
    from monosemantic.data.token_store import load_split

    meta = json.loads((Path(transformer_dir) / "config.json").read_text())
    store = meta.get("token_store")
    if not store or not Path(store).is_dir():
        raise InputError(f"{transformer_dir}/config.json: token_store {store!r} is not a folder here")
    n_ctx = int(meta["model"]["n_ctx"])
    first = next(token_windows(load_split(store, "val"), n_ctx, n_windows), None)
    if first is None:
        raise InputError(f"{store}: the val split has fewer than {n_ctx} tokens")
    return first[0]


def render(sae_export: str | Path, transformer_dir: str | Path, features: list[int], out: str | Path,
           n_windows: int = 1024, device: str = "cpu") -> Path:
    """Write SAEDashboard's feature-centric HTML for ``features`` to ``out``; returns ``out``."""
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import HookedSAETransformer

    from monosemantic.interop.saelens import load_sae_lens
    from monosemantic.interop.tlens import to_hooked_transformer

    sae = load_sae_lens(sae_export, device=device)
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise InputError(f"features {bad} out of range for {sae_export} (d_sae={sae.cfg.d_sae})")
    model = to_hooked_transformer(transformer_dir, device=device, cls=HookedSAETransformer)
    tokens = held_out_windows(transformer_dir, n_windows).to(device)
    cfg = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name, features=list(features),
                       minibatch_size_features=max(1, len(features)), minibatch_size_tokens=64, device=device,
                       verbose=False)
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_feature_centric_vis(data, out)
    return out
