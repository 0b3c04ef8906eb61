"""Export and load SAEs in SAELens' v6 on-disk layout (DESIGN §4), so SAELens, SAEDashboard and
Neuronpedia tooling can read them::

    <out_dir>/cfg.json                  architecture, d_in, d_sae, dtype, ..., metadata
    <out_dir>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    <out_dir>/sparsity.safetensors      sparsity [d_sae]: log10 feature density (optional)

The SAE trains on normalised activations ``s·x``; the export folds ``s`` into the weights so that it
works on raw activations and needs no ``normalize_activations`` step. A folder is written under a
temporary name and renamed into place, so a killed export never leaves a half-written folder.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.utils.io import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAE_LENS_VERSION = "6.0.0"
MODEL_NAME = "monosemantic-1l"


def folded_weights(sae: SparseAutoencoder, norm_scale: float) -> dict[str, torch.Tensor]:
    """The SAE's weights with the activation scale ``s = norm_scale`` folded in, for raw inputs ``x``.

    Trained on ``x_n = s·x``::

        f  = ReLU((s·x − b_dec) W_enc + b_enc) = s · ReLU((x − b_dec/s) W_enc + b_enc/s)   (s > 0)

    because ReLU is positively homogeneous. So with ``b_dec' = b_dec/s``, ``b_enc' = b_enc/s`` and the same
    ``W_enc``, the exported features are ``f' = f/s``, and::

        x̂' = f' W_dec + b_dec' = (f W_dec + b_dec) / s = x̂_n / s

    the raw-space reconstruction, with ``W_dec`` untouched, hence still unit-norm rows.
    """
    if not (math.isfinite(norm_scale) and norm_scale > 0):
        raise ValueError(f"norm_scale must be a positive finite number, got {norm_scale}")
    with torch.no_grad():
        tensors = {
            "W_enc": sae.W_enc.detach(),
            "b_enc": sae.b_enc.detach() / norm_scale,
            "W_dec": sae.W_dec.detach(),
            "b_dec": sae.b_dec.detach() / norm_scale,
        }
    return {k: v.to(device="cpu", dtype=torch.float32).contiguous().clone() for k, v in tensors.items()}


def sae_lens_cfg(d_in: int, d_sae: int, hook_name: str, context_size: int,
                 extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``cfg.json`` contents: a standard (ReLU) SAE on raw activations, b_dec subtracted on input."""
    metadata = {"sae_lens_version": SAE_LENS_VERSION, "hook_name": hook_name, "context_size": context_size,
                "prepend_bos": False, "model_name": MODEL_NAME, **(extra_metadata or {})}
    return {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": metadata}


def export_sae(sae: SparseAutoencoder, out_dir: str | Path, norm_scale: float, hook_name: str,
               context_size: int, extra_metadata: dict[str, Any] | None = None,
               log10_density: torch.Tensor | None = None) -> Path:
    """Write ``sae`` to ``out_dir`` in SAELens v6 layout with ``norm_scale`` folded in; returns ``out_dir``.

    ``extra_metadata`` is merged into ``cfg.json``'s ``metadata`` (the scale itself is recorded as
    ``activation_norm_scale_folded``). ``log10_density`` ``[d_sae]``, when given, becomes
    ``sparsity.safetensors``. An existing ``out_dir`` is replaced only once the new one is complete.
    """
    out_dir = Path(out_dir)
    if log10_density is not None and tuple(log10_density.shape) != (sae.d_sae,):
        raise ValueError(f"log10_density must have shape [{sae.d_sae}], got {tuple(log10_density.shape)}")
    tensors = folded_weights(sae, norm_scale)
    metadata = {"activation_norm_scale_folded": float(norm_scale), **(extra_metadata or {})}
    cfg = sae_lens_cfg(sae.d_in, sae.d_sae, hook_name, context_size, metadata)

    with atomic_dir(out_dir) as tmp_dir:
        save_file(tensors, str(tmp_dir / WEIGHTS_FILE))
        if log10_density is not None:
            sparsity = log10_density.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
            save_file({"sparsity": sparsity}, str(tmp_dir / SPARSITY_FILE))
        write_json_atomic(tmp_dir / CFG_FILE, cfg)
    log.info("exported SAE (d_in=%d, d_sae=%d, norm scale %.6g folded) to %s",
             sae.d_in, sae.d_sae, norm_scale, out_dir)
    return out_dir


def load_sae(path: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read an export written by :func:`export_sae` (or any standard SAELens v6 SAE on raw activations).

    Strict: ``cfg.json`` must describe a standard SAE with ``apply_b_dec_to_input`` and no activation
    normalisation, and ``sae_weights.safetensors`` must hold exactly the four tensors with the shapes
    ``cfg.json`` implies. Anything else raises ``ValueError`` naming the file and what is wrong.
    """
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise ValueError(f"{p}: missing; an SAE export folder holds {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ValueError(f"{cfg_path}: '{key}' must be a positive integer, got {cfg.get(key)!r}")
    expected_cfg = {"architecture": "standard", "apply_b_dec_to_input": True, "normalize_activations": "none"}
    for key, want in expected_cfg.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"{cfg_path}: '{key}' is {cfg[key]!r}; only {want!r} is supported")

    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from e
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if set(tensors) != set(shapes):
        raise ValueError(f"{weights_path}: expected exactly the tensors {sorted(shapes)}, "
                         f"found {sorted(tensors)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights_path}: '{name}' has shape {tuple(tensors[name].shape)}, expected "
                             f"{shape} from {CFG_FILE} (d_in={d_in}, d_sae={d_sae})")

    sae = SparseAutoencoder(d_in, d_sae)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(sae, name).copy_(t.to(torch.float32))
    return sae, cfg
