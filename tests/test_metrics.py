"""Metrics equal hand-computed values and do not depend on how the data is batched."""

import math

import pytest
import torch
from matplotlib.figure import Figure

from monosemantic.evaluation import splice_losses
from monosemantic.metrics import (
    L0,
    ExplainedVariance,
    FeatureDensity,
    LossRecovered,
    ReconstructionMSE,
)
from monosemantic.models.components import hooks
from monosemantic.models.components.transformer import Transformer
from monosemantic.plots import density_histogram_figure, save_density_histogram

X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
X_HAT = torch.tensor([[1.0, 1.0], [3.0, 5.0], [7.0, 6.0]])
# errors: (0, 1), (0, -1), (-2, 0) -> squared: 0+1+0+1+4+0 = 6 over 6 elements
# mean x = (3, 4); Σ‖x − μ‖² = (4+4) + 0 + (4+4) = 16


def test_mse_hand_value() -> None:
    m = ReconstructionMSE()
    m.update(X, X_HAT)
    assert m.compute().item() == pytest.approx(6 / 6)


def test_explained_variance_hand_value() -> None:
    m = ExplainedVariance()
    m.update(X, X_HAT)
    assert m.compute().item() == pytest.approx(1 - 6 / 16)
    m_fixed = ExplainedVariance(d_in=2)
    m_fixed.update(X, X_HAT)
    assert m_fixed.compute().item() == pytest.approx(1 - 6 / 16)


def test_batch_split_invariance() -> None:
    torch.manual_seed(0)
    # batches with very different means: per-batch EV uses the wrong mean
    x_NM = torch.cat([torch.randn(10, 4) + 5.0, torch.randn(6, 4) - 5.0, torch.randn(4, 4)])
    x_hat_NM = x_NM + 0.5 * torch.randn_like(x_NM)
    whole_mse, whole_ev = ReconstructionMSE(), ExplainedVariance()
    whole_mse.update(x_NM, x_hat_NM)
    whole_ev.update(x_NM, x_hat_NM)
    expected_ev = 1 - (x_NM - x_hat_NM).square().sum() / (x_NM - x_NM.mean(0)).square().sum()
    assert whole_ev.compute().item() == pytest.approx(expected_ev.item(), rel=1e-6)
    assert whole_mse.compute().item() == pytest.approx((x_NM - x_hat_NM).square().mean().item(), rel=1e-6)

    split_mse, split_ev = ReconstructionMSE(), ExplainedVariance()
    per_batch_ev = []
    for sl in (slice(0, 10), slice(10, 16), slice(16, 20)):
        split_mse.update(x_NM[sl], x_hat_NM[sl])
        split_ev.update(x_NM[sl], x_hat_NM[sl])
        one = ExplainedVariance()
        one.update(x_NM[sl], x_hat_NM[sl])
        per_batch_ev.append(one.compute().item())
    assert split_mse.compute().item() == pytest.approx(whole_mse.compute().item(), rel=1e-12)
    assert split_ev.compute().item() == pytest.approx(whole_ev.compute().item(), rel=1e-12)
    assert abs(sum(per_batch_ev) / 3 - whole_ev.compute().item()) > 0.05


def test_metrics_accept_token_dims() -> None:
    m = ReconstructionMSE()
    m.update(X[None], X_HAT[None])  # [1, 3, 2]
    assert m.compute().item() == pytest.approx(1.0)


def test_l0_hand_value() -> None:
    feats = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.5, 1e-3, 7.0]])
    m = L0()
    m.update(feats[:1])
    m.update(feats[1:])
    assert m.compute().item() == pytest.approx((2 + 0 + 4) / 3)


def test_feature_density_fractions() -> None:
    n_tokens, d_sae = 200, 10
    feats = torch.zeros(n_tokens, d_sae)
    feats[:, 0] = 1.0  # density 1: dense
    feats[:100, 1] = 2.0  # density 0.5: dense
    feats[0, 2] = 1.0  # density 0.005: neither
    feats[:2, 3] = 1.0  # density 0.01: not > 1e-2
    feats[:3, 4] = 1.0  # density 0.015: dense
    # features 5..9 never fire: dead
    m = FeatureDensity(d_sae)
    m.update(feats[:150])
    m.update(feats[150:])
    out = m.compute()
    assert out["dead_frac"].item() == pytest.approx(5 / 10)
    assert out["dense_frac"].item() == pytest.approx(3 / 10)
    # 200 tokens cannot show a density below 1e-6 (one firing is 5e-3): the fraction is absent, not 0
    assert "ultralow_frac" not in out and out["n_tokens"].item() == 200
    expected = torch.tensor([0.0, math.log10(0.5), math.log10(0.005), math.log10(0.01), math.log10(0.015)]
                            + [-10.0] * 5, dtype=torch.float64)
    torch.testing.assert_close(out["log10_density"], expected)


def test_feature_density_ultralow_needs_a_million_tokens() -> None:
    m = FeatureDensity(3)
    m.update(torch.zeros(0, 3))
    m.fire_counts += torch.tensor([1.0, 0.0, 5000.0], dtype=torch.float64)  # as if over 2e6 tokens
    m.n_tokens += 2_000_000
    out = m.compute()
    assert out["ultralow_frac"].item() == pytest.approx(1 / 3)  # density 5e-7
    assert out["dead_frac"].item() == pytest.approx(1 / 3)
    assert out["dense_frac"].item() == 0.0
    m.reset()
    m.fire_counts += torch.tensor([1.0, 0.0, 5000.0], dtype=torch.float64)
    m.n_tokens += 1_000_000  # exactly a million: one firing is density 1e-6, not below it
    assert "ultralow_frac" not in m.compute()


def test_feature_density_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="d_sae=4"):
        FeatureDensity(4).update(torch.zeros(2, 5))


def test_density_histogram(tmp_path) -> None:
    log10_density = torch.tensor([-10.0, -5.0, -2.0, -2.1, 0.0])
    fig = density_histogram_figure(log10_density, "test")
    assert isinstance(fig, Figure)
    counts = sum(p.get_height() for p in fig.axes[0].patches)
    assert counts == 5
    path = save_density_histogram(log10_density, tmp_path / "hist" / "density.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_recovered_hand_value() -> None:
    m = LossRecovered()
    m.update(ce_clean=20.0, ce_sae=30.0, ce_ablated=60.0, kl=5.0, n_tokens=10)
    m.update(ce_clean=0.0, ce_sae=0.0, ce_ablated=0.0, kl=0.0, n_tokens=0)
    out = m.compute()
    assert out["ce_clean"].item() == pytest.approx(2.0)
    assert out["ce_sae"].item() == pytest.approx(3.0)
    assert out["ce_ablated"].item() == pytest.approx(6.0)
    assert out["kl"].item() == pytest.approx(0.5)
    assert out["loss_recovered"].item() == pytest.approx((6 - 3) / (6 - 2))
    with pytest.raises(ValueError, match="ablation"):
        LossRecovered(ablation="resample")


def test_loss_recovered_on_no_tokens_is_absent_not_nan() -> None:
    """A transformer that loads but no token window: nothing to compute, and no 0/0 NaN to log or optimise."""
    m = LossRecovered()
    assert m.compute() == {}
    m.update(ce_clean=0.0, ce_sae=0.0, ce_ablated=0.0, kl=0.0, n_tokens=0)
    assert m.compute() == {}
    m.update(ce_clean=20.0, ce_sae=25.0, ce_ablated=20.0, kl=1.0, n_tokens=10)  # ablation costs nothing
    out = m.compute()
    assert "loss_recovered" not in out and out["ce_sae"].item() == pytest.approx(2.5)


@pytest.fixture
def model_and_tokens() -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(vocab_size=50, n_ctx=8, d_model=16, n_heads=2, d_head=8, d_mlp=32).eval()
    return model, torch.randint(0, 50, (3, 8))


def test_splice_identity_recovers_everything(model_and_tokens) -> None:
    model, tokens_BT = model_and_tokens
    ce_clean, ce_sae, ce_abl, kl, n = splice_losses(model, tokens_BT, lambda a: a, hooks.zero_ablate())
    assert n == 3 * 7
    assert ce_sae == ce_clean and kl == pytest.approx(0.0, abs=1e-9)
    # clean CE is the usual mean next-token cross-entropy
    logits = model(tokens_BT)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), tokens_BT[:, 1:].reshape(-1))
    assert ce_clean / n == pytest.approx(expected.item(), rel=1e-5)
    m = LossRecovered()
    m.update(ce_clean, ce_sae, ce_abl, kl, n)
    assert m.compute()["loss_recovered"].item() == 1.0


def test_splice_ablation_recovers_nothing(model_and_tokens) -> None:
    model, tokens_BT = model_and_tokens
    ce_clean, ce_sae, ce_abl, kl, n = splice_losses(model, tokens_BT, torch.zeros_like, hooks.zero_ablate())
    assert ce_sae == ce_abl and ce_abl != ce_clean and kl > 0
    m = LossRecovered()
    m.update(ce_clean, ce_sae, ce_abl, kl, n)
    assert m.compute()["loss_recovered"].item() == 0.0


def test_splice_kl_hand_value(model_and_tokens) -> None:
    model, tokens_BT = model_and_tokens
    mean_M = torch.rand(32)
    _, _, _, kl, n = splice_losses(model, tokens_BT, lambda a: 0.5 * a, hooks.mean_ablate(mean_M))
    p = model(tokens_BT)[:, :-1].double().softmax(-1)
    q = model.forward_with_mlp_hook(tokens_BT, lambda a: 0.5 * a)[:, :-1].double().softmax(-1)
    expected = (p * (p.log() - q.log())).sum()
    assert n == 21 and expected > 0
    # the splice works in float32; a KL this small (~5e-4 over 21 positions) carries its rounding
    assert kl == pytest.approx(expected.item(), rel=5e-3)
