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


# -- the path chosen by measured cost ----------------------------------------------------------------------
def test_crossover_is_where_the_fitted_sparse_cost_meets_the_dense_one():
    from monosemantic.models.components.sparse_step import StepCosts

    # sparse = 0.02 s + 1.5 s per unit density; dense 0.17 s: equal at density 0.1
    costs = StepCosts(0.17, tuple((d, 0.02 + 1.5 * d) for d in (0.005, 0.03, 0.1)), 1024)
    assert costs.crossover() == pytest.approx(0.1)
    assert StepCosts(0.01, costs.sparse_s, 1024).crossover() == 0.0  # dense cheaper everywhere
    assert StepCosts(9.0, costs.sparse_s, 1024).crossover() == 1.0
    assert StepCosts(0.2, ((0.01, 0.05),), 1024).crossover() == 1.0  # TopK: one density, the faster path
    assert StepCosts(0.04, ((0.01, 0.05),), 1024).crossover() == 0.0


def test_measured_rule_picks_the_sparse_path_whose_gradients_equal_the_dense_ones(monkeypatch):
    """At the demo's shape (512 → 4,096) the module times both paths on its first batch; an SAE whose L0
    density is half the measured crossover then trains on the sparse path, and that step's loss and every
    gradient equal the dense step's on the same batch."""
    import functools

    import monosemantic.models.sae_module as sae_module
    from monosemantic.models.sae_module import SAEModule

    torch.manual_seed(0)
    x = torch.randn(1024, 512)
    module = SAEModule(d_sae=4096, l1_coeff=1e-3, d_in=512, optimizer=functools.partial(torch.optim.Adam))
    assert float(module.sparse_crossover) == -1.0  # not measured yet
    crossover = module.sparse_limit(x)
    assert 0.01 < crossover < 1.0, crossover  # 2 CPU cores: 5–14% of d_sae
    assert float(module.sparse_crossover) == crossover and module.sparse_limit(x[:1]) == crossover  # kept
    # a second run of this shape on this machine reads the measured value back: it chooses alike
    again = SAEModule(d_sae=4096, l1_coeff=1e-3, d_in=512, optimizer=functools.partial(torch.optim.Adam))
    assert again.sparse_limit(x) == crossover
    with torch.no_grad():  # shift b_enc so that ~crossover/2 of the pre-activations fire
        pre = module.sae.pre_acts(x[:64]).flatten()
        module.sae.b_enc.sub_(torch.quantile(pre, 1 - crossover / 2))
        density = float((module.sae.pre_acts(x) > 0).float().mean())
    assert density < crossover
    module.last_l0.fill_(density * 4096)
    calls = []
    monkeypatch.setattr(sae_module, "sparse_forward", lambda *a: calls.append(1) or sparse_forward(*a))
    grads = {}
    for path in ("chosen", "dense"):
        module.zero_grad(set_to_none=True)
        if path == "dense":
            module.last_l0.fill_(4096.0)  # above any crossover: the dense path
        loss, _ = module.train_loss(x)
        loss.backward()
        grads[path] = {"loss": loss.detach(), **{n: p.grad.clone() for n, p in module.sae.named_parameters()}}
        if path == "chosen":
            assert calls == [1]  # the sparse path ran
    assert calls == [1]
    for name, g in grads["dense"].items():
        torch.testing.assert_close(grads["chosen"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_biased_is_the_select_of_the_sum_at_every_edge(dtype):
    """``x̄W > −b`` (bf16: against −b rounded down) picks exactly the entries ``x̄W + b > 0`` picks, including
    products equal to −b, one ulp either side of it, and biases that bf16 cannot hold."""
    g = torch.Generator().manual_seed(0)
    sae = _sae(d_in=8, d_sae=512)
    b = torch.randn(512, generator=g) * 0.3
    prod = torch.randn(256, 512, generator=g).to(dtype)
    edge = (-b).to(dtype)  # products on the bias itself (exact in fp32; the nearest bf16 otherwise) ...
    prod[0] = edge
    prod[1] = torch.nextafter(edge, torch.full_like(edge, float("inf")))  # ... and one step either side
    prod[2] = torch.nextafter(edge, torch.full_like(edge, float("-inf")))
    rows, cols = sae.select_biased(prod, b)
    want_rows, want_cols = (prod.float() + b > 0).nonzero(as_tuple=True)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    assert 0 < rows.numel() < prod.numel()
