"""The sparsity-aware step equals the dense SAE: same reconstruction, same loss, same gradients."""

import pytest
import torch
import torch.nn.functional as F

from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.models.components.sparse_step import sparse_forward


def _sae(d_in=16, d_sae=64, seed=0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, tied_init=False)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)  # some features off, some on
        sae.b_dec.normal_(0, 0.1)
    return sae


def _losses(sae, x, sparse: bool, l1=0.05):
    if sparse:
        out = sparse_forward(sae, x)
        l1_term = out.feats.vals.sum() / x.shape[0]
    else:
        out = sae(x)
        l1_term = out.feats.sum(-1).mean()
    return F.mse_loss(out.x_hat, x) + l1 * l1_term, out


def test_outputs_equal_the_dense_path():
    sae, x = _sae(), torch.randn(32, 16)
    dense = sae(x)
    out = sparse_forward(sae, x)
    torch.testing.assert_close(out.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    rebuilt = torch.zeros_like(dense.feats)
    rebuilt[out.feats.rows, out.feats.cols] = out.feats.vals
    torch.testing.assert_close(rebuilt, dense.feats)
    assert out.feats.vals.gt(0).all()
    assert 0 < out.feats.vals.numel() < dense.feats.numel()
    # offsets index each row's first entry
    counts = (dense.feats > 0).sum(1)
    torch.testing.assert_close(out.feats.offsets, torch.cumsum(counts, 0) - counts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_gradient_equals_the_dense_path(seed):
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(seed))
    grads = {}
    for sparse in (False, True):
        sae = _sae(seed=seed)
        loss, _ = _losses(sae, x, sparse)
        loss.backward()
        grads[sparse] = {n: p.grad.clone() for n, p in sae.named_parameters()}
        grads[sparse]["loss"] = loss.detach()
    for name in ("loss", "W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


def test_rows_with_no_active_feature():
    sae = _sae()
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # nothing fires
    x = torch.randn(4, 16)
    out = sparse_forward(sae, x)
    assert out.feats.vals.numel() == 0
    torch.testing.assert_close(out.x_hat, sae.b_dec.expand(4, -1))
    loss = F.mse_loss(out.x_hat, x)
    loss.backward()
    assert sae.W_enc.grad is None or sae.W_enc.grad.abs().sum() == 0


def test_bf16_autocast_matches_dense_autocast():
    sae, x = _sae(d_in=64, d_sae=256), torch.randn(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = sae(x).x_hat.float()
        sparse = sparse_forward(sae, x).x_hat
    assert sparse.dtype == torch.float32
    torch.testing.assert_close(sparse, dense, rtol=5e-2, atol=5e-2)
