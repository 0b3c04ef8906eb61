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

import copy
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from monosemantic.errors import ConfigError
from monosemantic.utils.io import write_json_atomic


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
    """The active entries of ``x̄ W_enc + b_enc`` (``select(x̄ W_enc, b_enc)`` picks them); backward only over
    those entries."""

    @staticmethod
    def forward(ctx, xc_BM: torch.Tensor, W_enc_MF: torch.Tensor, b_enc_F: torch.Tensor, use_bf16: bool, select):
        # the bias is added at the active entries only: ``select`` gets the bare product and the bias, and the
        # standard SAE compares ``x̄W > −b`` (the same test as ``x̄W + b > 0`` in floating point), so no
        # second [batch, d_sae] tensor (the fp32 copy of a bf16 product, the sum) is made
        if use_bf16:
            prod_BF = xc_BM.to(torch.bfloat16) @ W_enc_MF.to(torch.bfloat16)
        else:
            prod_BF = xc_BM @ W_enc_MF
        rows, cols = select(prod_BF, b_enc_F)
        vals = prod_BF[rows, cols].float() + b_enc_F[cols]
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
                                                       sae.select_biased)
        x_hat_BM = F.embedding_bag(cols, sae.W_dec, offsets, mode="sum", per_sample_weights=vals) + sae.b_dec
    return SparseOutput(x_hat_BM, SparseFeatures(rows, cols, vals, offsets))


class StepCosts(NamedTuple):
    """Seconds of one loss forward + backward on ``rows`` inputs: the dense path, and the sparse path at the
    L0 densities (fractions of ``d_sae``) measured. What the two paths share (the optimizer step, decoder
    hygiene) is not timed: it does not move the crossover."""

    dense_s: float
    sparse_s: tuple[tuple[float, float], ...]  # (density, seconds)
    rows: int

    def crossover(self) -> float:
        """The L0 density below which the sparse path is the cheaper one, in [0, 1]: a least-squares line
        ``a + b·density`` through the sparse timings meets the dense one. A single timing (a TopK SAE, whose
        density is fixed) gives 1 if the sparse path was faster there, else 0."""
        if len(self.sparse_s) == 1:
            return 1.0 if self.sparse_s[0][1] < self.dense_s else 0.0
        rho = torch.tensor([d for d, _ in self.sparse_s], dtype=torch.float64)
        sec = torch.tensor([s for _, s in self.sparse_s], dtype=torch.float64)
        b = float(((rho - rho.mean()) * (sec - sec.mean())).sum() / ((rho - rho.mean()) ** 2).sum())
        a = float(sec.mean()) - b * float(rho.mean())
        if b <= 0:  # timing noise swamped the slope: the level alone decides
            return 1.0 if float(sec.mean()) < self.dense_s else 0.0
        return min(1.0, max(0.0, (self.dense_s - a) / b))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_rows(d_sae: int) -> int:
    """Rows timed by :func:`measure_step_costs`: 2²³/d_sae within [128, 1024]."""
    return max(128, min(1024, 2**23 // d_sae))


def measure_step_costs(sae, x_BM: torch.Tensor, densities: tuple[float, ...] = (0.005, 0.03, 0.1),
                       rows: int | None = None, repeats: int = 2) -> StepCosts:
    """Time the dense and the sparse loss forward + backward of a copy of ``sae`` on (the first ``rows`` of) a
    real batch, under the caller's autocast, so the path is chosen by what it costs on this machine, at this
    size and precision, rather than by a fixed density. A ReLU SAE is timed at each of ``densities`` (its
    encoder bias shifted so that fraction of the pre-activations is positive); a TopK SAE at its own k.
    The fastest of ``repeats`` timings counts, after one untimed warm-up of each. ``rows`` (None: 2²³/d_sae
    within [128, 1024]) keeps the measurement to a few dense steps' worth of work at any dictionary size."""
    x_BM = x_BM[: rows or _default_rows(sae.d_sae)].detach().float()
    probe = copy.deepcopy(sae)
    for p in probe.parameters():
        p.requires_grad_(True)
        p.grad = None
    device = x_BM.device

    def timed(step) -> float:
        best = float("inf")
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            step().backward()
            _sync(device)
            if i:
                best = min(best, time.perf_counter() - t0)
            for p in probe.parameters():
                p.grad = None
        return best

    def recon(x_hat: torch.Tensor, feats) -> torch.Tensor:  # Matryoshka's prefixes cost each path its own
        return probe.recon_loss(x_BM, x_hat, feats) if probe.prefix_ends else F.mse_loss(x_hat.float(), x_BM)

    def dense_loss() -> torch.Tensor:
        x_hat, feats, pre = probe.forward_train(x_BM)
        return recon(x_hat, feats) + probe.penalty(pre, feats).mean()

    def sparse_loss() -> torch.Tensor:
        out = sparse_forward(probe, x_BM)
        return recon(out.x_hat, out.feats) + probe.sparse_penalty(out.feats.cols, out.feats.vals, x_BM.shape[0])

    with torch.enable_grad():
        dense_s = timed(dense_loss)
        if getattr(probe, "k", None) is not None:  # TopK / BatchTopK: the density is k / d_sae
            return StepCosts(dense_s, ((probe.k / probe.d_sae, timed(sparse_loss)),), x_BM.shape[0])
        with torch.no_grad():
            pre = probe.pre_acts(x_BM[:64]).float().flatten()
            b_enc = probe.b_enc.detach().clone()
        points = []
        for rho in densities:
            with torch.no_grad():
                probe.b_enc.copy_(b_enc - torch.quantile(pre, 1.0 - rho))
            points.append((rho, timed(sparse_loss)))
    return StepCosts(dense_s, tuple(points), x_BM.shape[0])


def _cost_key(sae, x_BM: torch.Tensor) -> str:
    """What a crossover depends on: the device, its precision, the SAE's shape and rule, the torch build."""
    device = torch.cuda.get_device_name(x_BM.device) if x_BM.is_cuda else f"cpu{torch.get_num_threads()}"
    bf16 = any(torch.is_autocast_enabled(t) and torch.get_autocast_dtype(t) == torch.bfloat16 for t in ("cpu", "cuda"))
    k = getattr(sae, "k", None)
    return (f"{device}|{torch.__version__}|{'bf16' if bf16 else 'fp32'}|{sae.architecture}|k={k}|"
            f"{sae.d_in}x{sae.d_sae}|rows={min(x_BM.shape[0], _default_rows(sae.d_sae))}")


def cost_cache_path() -> Path:
    """Where measured crossovers are kept: ``$MONOSEMANTIC_STEP_COSTS``, else ``~/.cache/monosemantic``."""
    env = os.environ.get("MONOSEMANTIC_STEP_COSTS")
    return Path(env) if env else Path.home() / ".cache" / "monosemantic" / "step_costs.json"


def crossover_for(sae, x_BM: torch.Tensor) -> tuple[float, StepCosts | None]:
    """The sparse/dense crossover for this SAE on this machine: measured once (:func:`measure_step_costs`) and
    kept in :func:`cost_cache_path` under :func:`_cost_key`, so two runs of one config on one machine choose
    their paths alike (a fresh timing each run would move the switch by a step or two, and with it the
    float rounding). Returns (crossover, the timings when measured now, else None)."""
    import filelock

    path, key = cost_cache_path(), _cost_key(sae, x_BM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path) + ".lock", timeout=600)
    except OSError:  # a read-only home: measure every run
        costs = measure_step_costs(sae, x_BM)
        return costs.crossover(), costs
    with lock:
        known = json.loads(path.read_text()) if path.is_file() else {}
        if key in known:
            return float(known[key]), None
        costs = measure_step_costs(sae, x_BM)
        known[key] = costs.crossover()
        write_json_atomic(path, known)
    return known[key], costs
