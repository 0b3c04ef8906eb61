"""Resume (DESIGN §8): a run stopped at step k and resumed from its checkpoint trains on exactly the batches an
uninterrupted run trains on — model, optimizer, dead counters and the stream position all come back."""

import functools

import lightning as L
import pytest
import torch

from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.models.sae_module import SAEModule


def _dm(shards, **kw) -> ActivationDataModule:
    dm = ActivationDataModule(shards=str(shards), batch_size=32, buffer_tokens=128, lr_windows=0, seed=3, **kw)
    dm.setup()
    return dm


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_skips_exactly_the_batches_already_trained_on(tiny_shards, num_workers):
    def first(n, skip):
        loader = torch.utils.data.DataLoader(_dm(tiny_shards).stream("train", skip_batches=skip), batch_size=None,
                                             num_workers=num_workers)
        out = []
        for x in loader:
            out.append(x)
            if len(out) == n:
                return out

    full, resumed = first(12, 0), first(6, 5)
    if num_workers == 0:
        for a, b in zip(full[5:11], resumed):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:  # a DataLoader always starts at worker 0: order may differ within a round of k batches, no more
        key = [float(x.double().sum()) for x in full[5:11]]
        assert sorted(key) == sorted(float(x.double().sum()) for x in resumed)


class _Recorder(L.Callback):
    """Records each training batch; with ``stop_at`` it stops the run there, as a kill between two
    checkpointed steps would (the schedule still plans for max_steps)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.sums: list[float] = []
        self.stop_at = stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sums.append(float(batch.double().sum()))

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def _fit(shards, max_steps, root, ckpt_path=None, stop_at=None):
    torch.manual_seed(0)
    module = SAEModule(d_sae=32, l1_coeff=0.01, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), d_in=64,
                       b_dec_init="zeros", dead_window_tokens=64)
    rec = _Recorder(stop_at)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[rec, L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)])
    trainer.fit(module, datamodule=_dm(shards), ckpt_path=ckpt_path)
    return module, rec.sums


def test_resumed_run_equals_uninterrupted_run(tiny_shards, tmp_path):
    straight, seen = _fit(tiny_shards, 8, tmp_path / "a")
    _, first = _fit(tiny_shards, 8, tmp_path / "b", stop_at=4)
    assert len(first) == 4
    resumed, rest = _fit(tiny_shards, 8, tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert first + rest == pytest.approx(seen, rel=0, abs=0)  # the same 8 batches, none twice
    for name, p in straight.sae.named_parameters():
        torch.testing.assert_close(resumed.sae.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(resumed.tokens_since_fired, straight.tokens_since_fired)
    assert int(resumed.tokens_seen) == int(straight.tokens_seen) == 8 * 32
