"""SAEModule: the loss, the dead-feature counter across ranks, decoder hygiene inside Lightning's loop."""

import functools
import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monosemantic.models.sae_module import SAEModule

Adam = functools.partial(torch.optim.Adam, lr=1e-3)


def module(d_in=8, d_sae=16, **kw) -> SAEModule:
    torch.manual_seed(0)
    kw.setdefault("b_dec_init", "zeros")
    return SAEModule(d_sae=d_sae, l1_coeff=0.01, optimizer=Adam, d_in=d_in, dead_window_tokens=10, **kw)


def test_training_loss_is_mse_plus_l1_sum_over_features():
    m = module()
    x = torch.randn(5, 8)
    out = m.sae(x)
    expected = ((out.x_hat - x) ** 2).mean() + 0.01 * out.feats.sum(-1).mean()
    m._trainer = None
    m.log_dict = m.log = lambda *a, **k: None
    torch.testing.assert_close(m.training_step(x, 0), expected)
    # per-input loss averages back to the batch loss
    torch.testing.assert_close(m.per_input_loss(x).mean(), expected)


def test_dead_counter_counts_tokens_and_resets_on_firing():
    m = module(d_sae=4)
    m._count_firing(torch.tensor([1, 0, 0, 3]), 6)
    m._count_firing(torch.tensor([0, 0, 2, 0]), 4)
    assert m.tokens_since_fired.tolist() == [4, 10, 0, 4]
    assert int(m.tokens_seen) == 10
    assert float(m.dead_frac()) == 0.25  # feature 1: silent for 10 tokens = the window


def _rank_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    m = module(d_sae=4)
    # rank 0 sees feature 0 fire, rank 1 sees feature 2 fire; feature 1 and 3 fire nowhere
    fires = [torch.tensor([2, 0, 0, 0]), torch.tensor([0, 0, 1, 0])][rank]
    m._count_firing(fires, batch_tokens=5 + rank)  # unequal batch sizes: 5 and 6 tokens
    m._count_firing(torch.zeros(4, dtype=torch.int64), batch_tokens=3)
    results[rank] = m.tokens_since_fired.tolist() + [int(m.tokens_seen)]
    dist.destroy_process_group()


def test_dead_counter_agrees_across_two_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(port, results), nprocs=2, join=True)
    # global tokens: 5 + 6, then 3 + 3; fired anywhere on step 1 → reset then count step 2 only
    assert results[0] == results[1] == [6, 17, 6, 17, 17]


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(32, 8, generator=g)


class _DM(L.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Stream(), batch_size=None)

    def sample_activations(self, n, seed):
        return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def test_decoder_unit_norm_and_no_parallel_grad_in_lightning_loop():
    seen: dict = {}

    class Probed(SAEModule):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)  # the projection under test
            seen["W"], seen["grad"] = self.sae.W_dec.detach().clone(), self.sae.W_dec.grad.clone()

        def on_train_batch_end(self, *a):
            seen["norms"] = self.sae.W_dec.norm(dim=1)

    torch.manual_seed(0)
    m = Probed(d_sae=16, l1_coeff=0.01, optimizer=Adam, d_in=8, dead_window_tokens=10, b_dec_init_tokens=64)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, datamodule=_DM())
    torch.testing.assert_close(seen["norms"], torch.ones(16))
    # the gradient the optimizer stepped with has no component along the decoder rows it saw
    assert (seen["grad"] * seen["W"]).sum(1).abs().max() < 1e-6
    assert seen["grad"].abs().max() > 1e-4
    assert int(m.tokens_seen) == 3 * 32
    assert not torch.equal(m.sae.b_dec.detach(), torch.zeros(8)), "b_dec initialised to the geometric median"


def test_bad_config_named():
    with pytest.raises(ValueError, match="d_in"):
        SAEModule(d_sae=4, l1_coeff=0.1, optimizer=Adam, d_in=None)
    with pytest.raises(ValueError, match="l1_reduction"):
        SAEModule(d_sae=4, l1_coeff=0.1, optimizer=Adam, d_in=4, l1_reduction="sum")
