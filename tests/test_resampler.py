"""Neuron resampling touches only dead features, follows the paper's recipe and zeroes exactly their
Adam moments; the callback resamples once per step, also across a resume."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from monosemantic.callbacks.resampler import (
    NeuronResampler,
    resample_dead_features,
    sample_inputs_by_loss,
)
from monosemantic.models.components.sae import SparseAutoencoder

D_IN, D_SAE = 8, 16
DEAD = torch.tensor([2, 7, 11])


def _trained_sae_and_adam() -> tuple[SparseAutoencoder, torch.optim.Adam]:
    torch.manual_seed(0)
    sae = SparseAutoencoder(D_IN, D_SAE)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x_NM = torch.randn(32, D_IN)
    for _ in range(2):
        opt.zero_grad()
        out = sae(x_NM)
        ((out.x_hat - x_NM).square().mean() + 1e-3 * out.feats.sum(-1).mean()).backward()
        opt.step()
        sae.normalize_decoder_()
    return sae, opt


def test_resample_only_dead_and_paper_recipe() -> None:
    sae, opt = _trained_sae_and_adam()
    params = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "step")}
               for n, p in sae.named_parameters()}
    for n in ("W_enc", "W_dec", "b_enc"):
        assert (moments[n]["exp_avg"] != 0).all() and (moments[n]["exp_avg_sq"] != 0).all()

    n_inputs = 20
    inputs_NM = torch.randn(n_inputs, D_IN) * 3
    # loss zero everywhere except three inputs: these must be the chosen ones
    loss_N = torch.zeros(n_inputs)
    expected_idx = [4, 9, 15]
    loss_N[expected_idx] = torch.tensor([1.0, 2.0, 3.0])
    alive = torch.ones(D_SAE, dtype=torch.bool)
    alive[DEAD] = False
    mean_alive_norm = params["W_enc"][:, alive].norm(dim=0).mean()

    n = resample_dead_features(sae, opt, DEAD, inputs_NM, loss_N, torch.Generator().manual_seed(0))
    assert n == 3

    # which input went to which dead feature: recover it from the new decoder rows
    unit_KM = inputs_NM[expected_idx] / inputs_NM[expected_idx].norm(dim=1, keepdim=True)
    new_rows = sae.W_dec.detach()[DEAD]
    match = (new_rows @ unit_KM.T).argmax(dim=1)
    assert sorted(match.tolist()) == [0, 1, 2]
    torch.testing.assert_close(new_rows, unit_KM[match])
    new_cols = sae.W_enc.detach()[:, DEAD].T
    torch.testing.assert_close(new_cols, unit_KM[match] * 0.2 * mean_alive_norm)
    torch.testing.assert_close(new_cols.norm(dim=1), (0.2 * mean_alive_norm).expand(3))
    assert (sae.b_enc.detach()[DEAD] == 0).all()

    # nothing else changed
    torch.testing.assert_close(sae.W_dec.detach()[alive], params["W_dec"][alive], rtol=0, atol=0)
    torch.testing.assert_close(sae.W_enc.detach()[:, alive], params["W_enc"][:, alive], rtol=0, atol=0)
    torch.testing.assert_close(sae.b_enc.detach()[alive], params["b_enc"][alive], rtol=0, atol=0)
    torch.testing.assert_close(sae.b_dec.detach(), params["b_dec"], rtol=0, atol=0)

    # Adam moments: zero exactly at the modified entries, unchanged elsewhere, step untouched
    for key in ("exp_avg", "exp_avg_sq"):
        st = {n: opt.state[p][key] for n, p in sae.named_parameters()}
        assert (st["W_enc"][:, DEAD] == 0).all() and (st["W_dec"][DEAD] == 0).all()
        assert (st["b_enc"][DEAD] == 0).all()
        assert torch.equal(st["W_enc"][:, alive], moments["W_enc"][key][:, alive])
        assert torch.equal(st["W_dec"][alive], moments["W_dec"][key][alive])
        assert torch.equal(st["b_enc"][alive], moments["b_enc"][key][alive])
        assert torch.equal(st["b_dec"], moments["b_dec"][key])
    for n, p in sae.named_parameters():
        assert torch.equal(opt.state[p]["step"], moments[n]["step"])


def test_resample_all_dead_uses_unit_mean_norm() -> None:
    sae = SparseAutoencoder(4, 3)
    inputs_KM = torch.tensor([[2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, -1.0]])
    sae.resample_(torch.arange(3), inputs_KM)
    unit = inputs_KM / inputs_KM.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.detach(), unit)
    torch.testing.assert_close(sae.W_enc.detach().T, 0.2 * unit)


def test_sampling_prefers_high_loss() -> None:
    loss_N = torch.tensor([0.0, 1.0, 0.0, 10.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert sorted(sample_inputs_by_loss(loss_N, 2, g).tolist()) == [1, 3]
    # ∝ loss²: input 3 (weight 100) beats input 1 (weight 1) nearly always when drawing one
    picks = [int(sample_inputs_by_loss(loss_N, 1, g)) for _ in range(200)]
    assert picks.count(3) > 190 and set(picks) <= {1, 3}
    # too few non-zero losses: all of them, then distinct zero-loss inputs
    idx = sample_inputs_by_loss(loss_N, 4, g).tolist()
    assert set(idx[:2]) == {1, 3} and len(set(idx)) == 4
    with pytest.raises(ValueError, match="distinct"):
        sample_inputs_by_loss(loss_N, 6, g)
    with pytest.raises(ValueError, match="finite"):
        sample_inputs_by_loss(torch.tensor([1.0, float("nan")]), 1, g)


# ---- the callback, in a real (tiny) Lightning run ----


class _DataModule(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.x_NM = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_NM), batch_size=8)

    def sample_activations(self, n_tokens: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.x_NM[torch.randperm(len(self.x_NM), generator=g)[:n_tokens]]


class _SAEModule(L.LightningModule):
    """Counts tokens since each feature fired; features in ``DEAD`` are forced silent by the test."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sae = SparseAutoencoder(D_IN, D_SAE)
        self.register_buffer("tokens_since_fired", torch.zeros(D_SAE, dtype=torch.long))
        self.n_resampled_seen: list[float] = []

    def per_input_loss(self, x_NM: torch.Tensor) -> torch.Tensor:
        out = self.sae(x_NM)
        return (out.x_hat - x_NM).square().mean(-1) + 1e-3 * out.feats.sum(-1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x_BM,) = batch
        out = self.sae(x_BM)
        fired_F = (out.feats > 0).any(0)
        fired_F[DEAD] = False
        self.tokens_since_fired += x_BM.shape[0]
        self.tokens_since_fired[fired_F] = 0
        return (out.x_hat - x_BM).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=1e-3)


def _fit(callback: NeuronResampler, max_steps: int, tmp_path, ckpt_path=None) -> _SAEModule:
    module = _SAEModule()
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_DataModule(), ckpt_path=ckpt_path)
    module.trainer_ref = trainer
    return module


def test_callback_resamples_dead_once(tmp_path) -> None:
    cb = NeuronResampler(resample_steps=[2, 4], dead_window_tokens=24, n_loss_inputs=32, seed=0)
    module = _fit(cb, max_steps=4, tmp_path=tmp_path)
    assert cb.done_steps == [2, 4]
    # at step 2 only 16 tokens have passed (nothing is dead yet); at step 4 at least the forced-silent are
    assert [h["step"] for h in cb.history] == [2, 4]
    assert cb.history[0]["n_resampled"] == 0 and cb.history[1]["n_resampled"] >= 3
    assert (module.tokens_since_fired[DEAD] == 0).all()
    # the last step resampled: dead rows are unit-norm copies of data inputs
    rows_KM = module.sae.W_dec.detach()[DEAD]
    data_NM = _DataModule().x_NM
    unit_NM = data_NM / data_NM.norm(dim=1, keepdim=True)
    best_KN = (rows_KM @ unit_NM.T).max(dim=1).values
    torch.testing.assert_close(best_KN, torch.ones(3))


def test_callback_state_dict_roundtrip() -> None:
    """The state a checkpoint keeps, and that loading it restores it (through a real Lightning checkpoint,
    with a negative control, in ``test_resume.py::test_resampler_state_comes_back_from_the_checkpoint``)."""
    cb = NeuronResampler(resample_steps=[1, 3], dead_window_tokens=8, n_loss_inputs=32, seed=5)
    cb.done_steps = [1]
    state = cb.state_dict()
    assert state == {"done_steps": [1], "seed": 5}
    resumed = NeuronResampler(resample_steps=[1, 3], dead_window_tokens=8, n_loss_inputs=32, seed=0)
    resumed.load_state_dict(state)
    assert resumed.done_steps == [1] and resumed.seed == 5


def test_callback_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="score"):
        NeuronResampler(resample_steps=[1], dead_window_tokens=8, score="l1")
    with pytest.raises(ValueError, match="positive"):
        NeuronResampler(resample_steps=[1], dead_window_tokens=0)
