"""SparseAutoencoder: the forward math, decoder hygiene and the geometric-median init."""

import pytest
import torch

from monosemantic.models.components.sae import SAEOutput, SparseAutoencoder


@pytest.fixture
def sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(d_in=8, d_sae=32)


def test_shapes_and_init(sae: SparseAutoencoder) -> None:
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8)
    assert sae.b_enc.shape == (32,) and sae.b_dec.shape == (8,)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.all(sae.b_enc == 0) and torch.all(sae.b_dec == 0)
    # tied start (default): the encoder begins as the decoder's transpose, as separate parameters
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert [n for n, _ in sae.named_parameters()] == ["W_enc", "b_enc", "W_dec", "b_dec"]


def test_paper_init_is_untied() -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32, tied_init=False)
    # Kaiming-uniform with fan_in = d_in: |W_enc| ≤ sqrt(6 / d_in)
    assert sae.W_enc.abs().max() <= (6 / 8) ** 0.5
    # independent draws: the encoder is not the decoder's transpose (up to scale)
    cos = torch.nn.functional.cosine_similarity(sae.W_enc.T, sae.W_dec, dim=1)
    assert cos.abs().max() < 0.999


def test_forward_is_decode_of_encode(sae: SparseAutoencoder) -> None:
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x_BTM = torch.randn(3, 5, 8)
    out = sae(x_BTM)
    assert isinstance(out, SAEOutput)
    torch.testing.assert_close(out.feats, sae.encode(x_BTM))
    torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x_BTM)))
    assert out.x_hat.shape == x_BTM.shape and out.feats.shape == (3, 5, 32)
    expected_feats = torch.relu((x_BTM - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(out.feats, expected_feats)
    torch.testing.assert_close(out.x_hat, expected_feats @ sae.W_dec + sae.b_dec)
    assert (out.feats >= 0).all()


def test_normalize_decoder(sae: SparseAutoencoder) -> None:
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) * 5 + 0.1)
    direction_before = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(sae.W_dec.detach(), direction_before.detach())


def test_unit_norm_after_adam_step(sae: SparseAutoencoder) -> None:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-1)
    x_NM = torch.randn(16, 8)
    for _ in range(2):
        opt.zero_grad()
        out = sae(x_NM)
        loss = (out.x_hat - x_NM).square().mean() + 1e-2 * out.feats.sum(-1).mean()
        loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))  # the step leaves the sphere
        sae.normalize_decoder_()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_remove_parallel_grads(sae: SparseAutoencoder) -> None:
    grad_FM = torch.randn(32, 8)
    sae.W_dec.grad = grad_FM.clone()
    d_FM = sae.W_dec.detach()
    sae.remove_parallel_grads_()
    g_FM = sae.W_dec.grad
    torch.testing.assert_close((g_FM * d_FM).sum(1), torch.zeros(32), atol=1e-6, rtol=0)
    # the perpendicular part is untouched: g_new == g − (g·d) d
    perp_FM = grad_FM - (grad_FM * d_FM).sum(1, keepdim=True) * d_FM
    torch.testing.assert_close(g_FM, perp_FM)
    # idempotent: nothing parallel is left to remove
    sae.remove_parallel_grads_()
    torch.testing.assert_close(sae.W_dec.grad, perp_FM)


def test_remove_parallel_grads_without_grad_is_noop(sae: SparseAutoencoder) -> None:
    sae.remove_parallel_grads_()
    assert sae.W_dec.grad is None


def test_geometric_median_symmetric_points() -> None:
    sae = SparseAutoencoder(d_in=2, d_sae=4)
    center = torch.tensor([1.0, -2.0])
    square = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    # the median of a symmetric set is its centre, including when a point lies on it
    x_NM = torch.cat([square + center, center[None]])
    median = sae.init_b_dec_geometric_median_(x_NM)
    torch.testing.assert_close(median, center, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.b_dec.detach(), center, atol=1e-5, rtol=0)
    assert torch.isfinite(sae.b_dec).all()


def test_geometric_median_robust_to_outlier() -> None:
    sae = SparseAutoencoder(d_in=2, d_sae=4)
    # five points on a line and one far outlier: the median of the 1-D cluster (x=2) stays near the
    # cluster, while the mean is dragged far away
    x_NM = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [1000.0, 0.0]])
    median = sae.init_b_dec_geometric_median_(x_NM, n_iter=500)
    assert abs(float(median[0]) - 2.5) < 0.51 and abs(float(median[1])) < 1e-6
    assert x_NM.mean(0)[0] > 150
    # on a line the geometric median is any 1-D median: sum of distances is minimal
    def cost(y: torch.Tensor) -> float:
        return float((x_NM - y).norm(dim=1).sum())
    assert cost(median) <= cost(x_NM.mean(0)) and cost(median) <= cost(torch.tensor([2.0, 0.0])) + 1e-4


def test_geometric_median_rejects_bad_shape(sae: SparseAutoencoder) -> None:
    with pytest.raises(ValueError, match="expected a sample"):
        sae.init_b_dec_geometric_median_(torch.randn(5, 3))
