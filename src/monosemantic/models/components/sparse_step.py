"""A sparsity-aware SAE forward/backward: the same math as ``SparseAutoencoder.forward``, fewer FLOPs.

Only the encoder's forward matmul must be dense (every feature's pre-activation is needed to know which
fire). Everything else touches the active features alone (L0 ≪ d_sae). Which entries are active is the SAE's
``select``: the positive ones (ReLU), each row's k largest (TopK) or the batch's k·B largest (BatchTopK); in
each case an active feature's value is its pre-activation, so one backward serves them all:

- decoder forward ``x̂ = Σ_active f_i d_i + b_d`` and its backward are ``F.embedding_bag`` with
  per-sample weights (PyTorch's C++ kernel; autograd gives ∂/∂f and ∂/∂W_dec);
- the encoder backward (∂/∂W_enc, ∂/∂b_enc, ∂/∂x̄ for b_d) is a custom autograd function that also uses
  ``embedding_bag``, so no dense ``[batch, d_sae]`` gradient is ever formed.

A dense step costs ~12·d_in·d_sae FLOPs per token; this one ~2·d_in·d_sae + O(L0·d_in). Under bf16
autocast the dense encoder matmul runs in bf16 (as in the dense path); the sparse parts stay fp32.
``tests/test_sparse_step.py`` checks outputs and every gradient against the dense path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from monosemantic.errors import ConfigError


class SparseFeatures(NamedTuple):
    """The active features of a batch, row-major: ``vals[k]`` is feature ``cols[k]`` of input ``rows[k]``."""

    rows: torch.Tensor  # [nnz] int64, sorted
    cols: torch.Tensor  # [nnz] int64
    vals: torch.Tensor  # [nnz] float32, > 0
    offsets: torch.Tensor  # [batch] int64, start of each input's entries


class SparseOutput(NamedTuple):
    x_hat: torch.Tensor  # [batch, d_in]
    feats: SparseFeatures


def _row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


class _SparseEncode(torch.autograd.Function):
    """The active entries of ``x̄ W_enc + b_enc`` (``select`` picks them); backward only over those entries."""

    @staticmethod
    def forward(ctx, xc_BM: torch.Tensor, W_enc_MF: torch.Tensor, b_enc_F: torch.Tensor, use_bf16: bool, select):
        if use_bf16:
            pre_BF = (xc_BM.to(torch.bfloat16) @ W_enc_MF.to(torch.bfloat16)).float() + b_enc_F
        else:
            pre_BF = xc_BM @ W_enc_MF + b_enc_F
        rows, cols = select(pre_BF)
        vals = pre_BF[rows, cols]
        offsets = _row_offsets(rows, xc_BM.shape[0])
        ctx.save_for_backward(xc_BM, W_enc_MF, rows, cols, offsets)
        ctx.mark_non_differentiable(rows, cols, offsets)
        return rows, cols, vals, offsets

    @staticmethod
    def backward(ctx, _g_rows, _g_cols, g_vals, _g_offsets):
        xc_BM, W_enc_MF, rows, cols, offsets = ctx.saved_tensors
        g_vals = g_vals.float()
        d_sae = W_enc_MF.shape[1]
        g_x = g_W = g_b = None
        if ctx.needs_input_grad[0]:  # ∂/∂x̄[b] = Σ_k g_k W_enc[:, col_k]: a bag per input row
            g_x = F.embedding_bag(cols, W_enc_MF.T.contiguous().float(), offsets, mode="sum",
                                  per_sample_weights=g_vals)
        if ctx.needs_input_grad[1]:  # ∂/∂W_enc[:, i] = Σ_{k: col_k = i} g_k x̄[row_k]: a bag per feature
            order = torch.argsort(cols, stable=True)
            by_col = cols[order]
            counts = torch.bincount(by_col, minlength=d_sae)
            g_W = F.embedding_bag(rows[order], xc_BM.float(), torch.cumsum(counts, 0) - counts, mode="sum",
                                  per_sample_weights=g_vals[order]).T
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(d_sae, dtype=g_vals.dtype, device=g_vals.device).index_add_(0, cols, g_vals)
        return g_x, g_W, g_b, None, None


def sparse_forward(sae, x_BM: torch.Tensor) -> SparseOutput:
    """``sae(x)`` as (reconstruction, active features), differentiable w.r.t. all four parameters. The SAE's
    ``select`` says which pre-activations are features (ReLU: the positive ones; TopK: the k largest per
    input; BatchTopK: the k·B largest of the batch); each active feature's value is its pre-activation, so
    the same backward serves them all. ``sae.sparse_ok`` is False where it cannot (JumpReLU's threshold)."""
    if not sae.sparse_ok:
        raise ConfigError(f"the sparse step cannot train a {sae.architecture} SAE: set model.sparse_step=false")
    use_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    use_bf16 = use_bf16 or (x_BM.is_cuda and torch.is_autocast_enabled("cuda")
                            and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    x_BM = x_BM.float()
    with torch.autocast(x_BM.device.type, enabled=False):
        rows, cols, vals, offsets = _SparseEncode.apply(sae.encoder_input(x_BM), sae.W_enc, sae.b_enc, use_bf16,
                                                       sae.select)
        x_hat_BM = F.embedding_bag(cols, sae.W_dec, offsets, mode="sum", per_sample_weights=vals) + sae.b_dec
    return SparseOutput(x_hat_BM, SparseFeatures(rows, cols, vals, offsets))
