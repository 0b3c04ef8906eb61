"""Export and load SAEs in SAELens' v6 on-disk layout (DESIGN §4), so SAELens, SAEDashboard and
Neuronpedia tooling can read them::

    <out_dir>/cfg.json                  architecture, d_in, d_sae, dtype, ..., metadata
    <out_dir>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
                                        (+ threshold [d_sae] for a jumprelu SAE)
    <out_dir>/sparsity.safetensors      sparsity [d_sae]: log10 feature density (optional)

The SAE trains on normalised activations ``s·x``; the export folds ``s`` into the weights so that it
works on raw activations and needs no ``normalize_activations`` step. A folder is written under a
temporary name and renamed into place, so a killed export never leaves a half-written folder.

Architectures (``cfg.json``'s ``architecture``, as SAELens names them): ``standard`` (ReLU; the paper's, and
Anthropic's later recipe with ``apply_b_dec_to_input: false``), ``topk`` (with ``k``) and ``jumprelu`` (with a
``threshold`` tensor; a BatchTopK SAE is exported as one, its running threshold for every feature, as SAELens
does). Dictionary rows are unit-norm in every export: free rows' norms are folded into the encoder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from monosemantic.errors import InputError
from monosemantic.models.components.sae import SparseAutoencoder, sae_from_inference
from monosemantic.utils.io import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAE_LENS_VERSION = "6.0.0"
MODEL_NAME = "monosemantic-1l"
LOADABLE = ("standard", "topk", "jumprelu")


def folded_weights(sae: SparseAutoencoder, norm_scale: float) -> dict[str, torch.Tensor]:
    """The SAE's weights with the activation scale ``s = norm_scale`` folded in, for raw inputs ``x``
    (:meth:`SparseAutoencoder.inference_tensors`; a threshold ``θ`` becomes ``θ/s`` alike).

    Trained on ``x_n = s·x``::

        f  = ReLU((s·x − b_dec) W_enc + b_enc) = s · ReLU((x − b_dec/s) W_enc + b_enc/s)   (s > 0)

    because ReLU is positively homogeneous. So with ``b_dec' = b_dec/s``, ``b_enc' = b_enc/s`` and the same
    ``W_enc``, the exported features are ``f' = f/s``, and::

        x̂' = f' W_dec + b_dec' = (f W_dec + b_dec) / s = x̂_n / s

    the raw-space reconstruction, with ``W_dec`` untouched, hence still unit-norm rows. TopK selection and
    a JumpReLU threshold commute with the positive scale in the same way.
    """
    tensors = sae.inference_tensors(norm_scale)
    return {k: v.to(device="cpu", dtype=torch.float32).contiguous().clone() for k, v in tensors.items()}


def sae_lens_cfg(d_in: int, d_sae: int, hook_name: str, context_size: int,
                 extra_metadata: dict[str, Any] | None = None,
                 arch_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``cfg.json`` contents: an SAE on raw activations; ``arch_fields`` (from
    :meth:`SparseAutoencoder.inference_cfg`) name the architecture, default a standard one with b_dec
    subtracted on input."""
    metadata = {"sae_lens_version": SAE_LENS_VERSION, "hook_name": hook_name, "context_size": context_size,
                "prepend_bos": False, "model_name": MODEL_NAME, **(extra_metadata or {})}
    return {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", **(arch_fields or {}),
            "metadata": metadata}


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
    metadata = {"activation_norm_scale_folded": float(norm_scale), "trained_as": sae.config(),
                **(extra_metadata or {})}
    cfg = sae_lens_cfg(sae.d_in, sae.d_sae, hook_name, context_size, metadata, sae.inference_cfg())

    with atomic_dir(out_dir) as tmp_dir:
        save_file(tensors, str(tmp_dir / WEIGHTS_FILE))
        if log10_density is not None:
            sparsity = log10_density.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
            save_file({"sparsity": sparsity}, str(tmp_dir / SPARSITY_FILE))
        write_json_atomic(tmp_dir / CFG_FILE, cfg)
    log.info("exported %s SAE (d_in=%d, d_sae=%d, norm scale %.6g folded) to %s",
             sae.architecture, sae.d_in, sae.d_sae, norm_scale, out_dir)
    return out_dir


def load_sae(path: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read an export written by :func:`export_sae` (or any SAELens v6 standard, topk or jumprelu SAE on raw
    activations).

    Strict: ``cfg.json`` must name one of those architectures with no activation normalisation (a topk SAE
    its ``k``), and ``sae_weights.safetensors`` must hold exactly the tensors with the shapes ``cfg.json``
    implies. Anything else raises ``ValueError`` naming the file and what is wrong.
    """
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise InputError(f"{p}: missing; an SAE export folder holds {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from e
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise InputError(f"{cfg_path}: '{key}' must be a positive integer, got {cfg.get(key)!r}")
    arch = cfg.get("architecture", "standard")
    if arch not in LOADABLE:
        raise InputError(f"{cfg_path}: 'architecture' is {arch!r}; supported: {', '.join(LOADABLE)}")
    if cfg.get("normalize_activations", "none") != "none":
        raise InputError(f"{cfg_path}: 'normalize_activations' is {cfg['normalize_activations']!r}; only 'none' "
                         "is supported")
    if not isinstance(cfg.get("apply_b_dec_to_input", True), bool):
        raise InputError(f"{cfg_path}: 'apply_b_dec_to_input' must be true or false")
    if arch == "topk" and not (isinstance(cfg.get("k"), int) and 0 < cfg["k"] <= cfg["d_sae"]):
        raise InputError(f"{cfg_path}: a topk SAE needs 'k', an integer in [1, d_sae], got {cfg.get('k')!r}")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        raise InputError(f"{cfg_path}: 'rescale_acts_by_decoder_norm' true is not supported (fold the norms)")

    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{weights_path}: unreadable safetensors file ({e})") from e
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
              **({"threshold": (d_sae,)} if arch == "jumprelu" else {})}
    if set(tensors) != set(shapes):
        raise InputError(f"{weights_path}: expected exactly the tensors {sorted(shapes)}, "
                         f"found {sorted(tensors)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise InputError(f"{weights_path}: '{name}' has shape {tuple(tensors[name].shape)}, expected "
                             f"{shape} from {CFG_FILE} (d_in={d_in}, d_sae={d_sae})")

    if arch == "jumprelu" and (tensors["threshold"] < 0).any():
        raise InputError(f"{weights_path}: 'threshold' has negative entries; a JumpReLU threshold is >= 0")
    return sae_from_inference({**cfg, "architecture": arch}, tensors), cfg
