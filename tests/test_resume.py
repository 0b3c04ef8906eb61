"""Resume (DESIGN §8): a run stopped at step k and resumed from its checkpoint trains on exactly the batches an
uninterrupted run trains on — model, optimizer, dead counters and the stream position all come back."""

import functools
import shutil

import lightning as L
import pytest
import torch

from monosemantic.callbacks.resampler import NeuronResampler
from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.data.onthefly import OnTheFlyDataModule
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


def _fit(shards, max_steps, root, ckpt_path=None, stop_at=None, make_dm=None):
    torch.manual_seed(0)
    module = SAEModule(d_sae=32, l1_coeff=0.01, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), d_in=64,
                       b_dec_init="zeros", dead_window_tokens=64)
    rec = _Recorder(stop_at)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[rec, L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)])
    trainer.fit(module, datamodule=(make_dm or _dm)(shards), ckpt_path=ckpt_path)
    return module, rec.sums


def _on_the_fly(model_dir):
    # chunks of 8 batches: the stop at step 4 falls inside a chunk
    dm = OnTheFlyDataModule(model_dir=str(model_dir), n_contexts=96, tokens_per_context=8, contexts_per_block=16,
                            batch_size=32, buffer_tokens=256, lr_windows=0, seed=3, device="cpu")
    dm.setup()
    return dm


@pytest.mark.parametrize("source", ["cache", "on_the_fly"])
def test_resumed_run_equals_uninterrupted_run(tiny_shards, transformer_export, tmp_path, source):
    src, make = (tiny_shards, None) if source == "cache" else (transformer_export, _on_the_fly)
    straight, seen = _fit(src, 8, tmp_path / "a", make_dm=make)
    _, first = _fit(src, 8, tmp_path / "b", stop_at=4, make_dm=make)
    assert len(first) == 4
    resumed, rest = _fit(src, 8, tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"), make_dm=make)
    assert first + rest == pytest.approx(seen, rel=0, abs=0)  # the same 8 batches, none twice
    for name, p in straight.sae.named_parameters():
        torch.testing.assert_close(resumed.sae.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(resumed.tokens_since_fired, straight.tokens_since_fired)
    assert int(resumed.tokens_seen) == int(straight.tokens_seen) == 8 * 32


class _ForgetfulResampler(NeuronResampler):
    """A resampler whose checkpoint state is never restored: the negative control of the test below."""

    def load_state_dict(self, state_dict) -> None:
        pass


class _Silence(L.Callback):
    """Makes features 0–7 silent from the start and 8–15 from step 4 (a huge negative encoder bias), so both
    resampling steps have dead features to revive, in the uninterrupted and the resumed run alike."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in (0, 4):
            first = 0 if trainer.global_step == 0 else 8
            with torch.no_grad():
                pl_module.sae.b_enc[first : first + 8] = -1e4


def _fit_resampling(shards, max_steps, root, resampler, ckpt_path=None, stop_at=None):
    torch.manual_seed(0)
    module = SAEModule(d_sae=32, l1_coeff=0.01, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), d_in=64,
                       b_dec_init="zeros", dead_window_tokens=64, sparse_step=False)
    callbacks = [_Silence(), resampler, _Recorder(stop_at),
                 L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)]
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root, callbacks=callbacks)
    trainer.fit(module, datamodule=_dm(shards), ckpt_path=ckpt_path)
    return module


def test_resampler_state_comes_back_from_the_checkpoint(tiny_shards, tmp_path):
    """Stopped after the first resampling and resumed with a resampler built with another seed (as a changed
    config would), the run must resample at the second step exactly as the uninterrupted run did — which it
    can only do with the seed and the steps done restored from the checkpoint."""
    def resampler(cls=NeuronResampler, seed=3):
        return cls(resample_steps=[3, 6], dead_window_tokens=64, n_loss_inputs=256, seed=seed)

    straight_cb = resampler()
    straight = _fit_resampling(tiny_shards, 8, tmp_path / "a", straight_cb)
    assert [(h["step"], h["n_resampled"] >= 8) for h in straight_cb.history] == [(3, True), (6, True)]

    _fit_resampling(tiny_shards, 8, tmp_path / "b", resampler(), stop_at=4)
    stopped = tmp_path / "stopped_at_4.ckpt"
    shutil.copy(tmp_path / "b" / "last.ckpt", stopped)
    resumed_cb = resampler(seed=99)
    resumed = _fit_resampling(tiny_shards, 8, tmp_path / "b", resumed_cb, ckpt_path=str(stopped))
    assert resumed_cb.seed == 3 and resumed_cb.done_steps == [3, 6]
    torch.testing.assert_close(resumed.sae.W_dec, straight.sae.W_dec, rtol=1e-5, atol=1e-6)
    assert torch.equal(resumed.tokens_since_fired, straight.tokens_since_fired)

    # the same resume with load_state_dict doing nothing: step 3 forgotten and a different draw at step 6,
    # so the assertions above would fail
    forgetful_cb = resampler(_ForgetfulResampler, seed=99)
    forgetful = _fit_resampling(tiny_shards, 8, tmp_path / "c", forgetful_cb, ckpt_path=str(stopped))
    assert forgetful_cb.done_steps == [6] and forgetful_cb.seed == 99
    assert not torch.allclose(forgetful.sae.W_dec, straight.sae.W_dec, rtol=1e-5, atol=1e-6)
