"""Kill at any moment (DESIGN §8), with real processes really SIGKILLed: an SAE run killed in the middle of an
optimizer step and a transformer run killed in the middle of writing a checkpoint are each resumed with
``ckpt_path=last`` and end with the parameters of an uninterrupted run of the same seed; the checkpoint being
written when the kill came is never one that is resumed from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_NET

pytestmark = pytest.mark.slow

SAE = ["experiment=sae_4096", "model.d_sae=32", "data.batch_size=32", "data.buffer_tokens=128",
       "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
       "model.b_dec_init=zeros", "final_eval_lr_windows=4", "data.lr_windows=2",
       "callbacks.neuron_resampler.resample_steps=[3,6]", "callbacks.neuron_resampler.dead_window_tokens=64",
       "callbacks.neuron_resampler.n_loss_inputs=256", "model.dead_window_tokens=64"]
TRANSFORMER = ["experiment=transformer_1l", "data.corpus.kind=python_stdlib", "data.corpus.max_bytes=300000",
               "data.tokenizer.vocab_size=512", *[f"model.net.{k}={v}" for k, v in TINY_NET.items() if k != "n_ctx"],
               "scale.transformer.n_ctx=32", "scale.transformer.batch_size=8", "scale.transformer.max_steps=8",
               "scale.transformer.val_check_interval=4", "scale.transformer.val_windows=4",
               "data.train_windows=48"]  # 6 batches an epoch: the kill and the resume fall inside epoch 1
COMMON = ["logger=csv", "callbacks.periodic_checkpoint.every_n_train_steps=2", "seed=7"]


def _command(args: list[str], run_dir: Path, data_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "train.py"), *args, *COMMON, f"hydra.run.dir={run_dir}",
            f"paths.data_dir={data_dir}"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def _run(args, run_dir, data_dir) -> None:
    out = subprocess.run(_command(args, run_dir, data_dir), capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=_env())
    assert out.returncode == 0, out.stderr[-3000:]


def _run_and_kill(args, run_dir, data_dir, marker: Path) -> None:
    """Start the run, wait until it has reached the moment the plugin marks, SIGKILL it (with every process it
    started: a DDP run's other ranks are its children, in its session)."""
    err = open(run_dir.parent / f"{run_dir.name}.stderr", "wb")  # a file: a full pipe would block the child
    proc = subprocess.Popen(_command(args, run_dir, data_dir), stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                            env=_env(), start_new_session=True)
    deadline = time.time() + 600
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill: {Path(err.name).read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the run never reached the moment of the kill")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    err.close()


def _params(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    return {k: v for k, v in state["state_dict"].items() if v.is_floating_point()}


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_an_sae_run_killed_mid_step_resumes_to_the_uninterrupted_result(tiny_shards, tmp_path):
    args = [*SAE, f"data.shards={tiny_shards}"]
    _run(args, tmp_path / "straight", tmp_path / "data")
    marker = tmp_path / "at_step_5"
    # killed at step 5, after its backward and before its optimizer step (a resampling was at step 3)
    _run_and_kill([*args, "+callbacks.pause._target_=kill_helpers.PauseMidStep", "+callbacks.pause.step=5",
                   f"+callbacks.pause.marker={marker}"], tmp_path / "killed", tmp_path / "data", marker)
    ckpts = tmp_path / "killed" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "killed" / "metrics.json").exists()
    _run([*args, "ckpt_path=last"], tmp_path / "killed", tmp_path / "data")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8
    _assert_same_params(tmp_path / "straight" / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
    # the resampler fired at 3 before the kill and at 6 after it: its state came back from the checkpoint
    ck = torch.load(ckpts / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ck["callbacks"].items() if k.startswith("NeuronResampler")]
    assert state["done_steps"] == [3, 6]


def test_a_ddp_sae_run_killed_mid_step_resumes_to_the_uninterrupted_result(tiny_shards, tmp_path):
    """Two ranks (trainer=ddp_sim, gloo), both SIGKILLed at step 5 between backward and optimizer step, resumed
    with ckpt_path=last on two ranks: each rank's stream continues where it was, so the SAE ends where the
    uninterrupted two-rank run does."""
    args = [*SAE, f"data.shards={tiny_shards}", "trainer=ddp_sim", "trainer.max_steps=8"]
    _run(args, tmp_path / "straight", tmp_path / "data")
    marker = tmp_path / "at_step_5"
    _run_and_kill([*args, "+callbacks.pause._target_=kill_helpers.PauseMidStep", "+callbacks.pause.step=5",
                   f"+callbacks.pause.marker={marker}"], tmp_path / "killed", tmp_path / "data", marker)
    ckpts = tmp_path / "killed" / "checkpoints"
    ck = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 4 and len(ck["rng_states"]) == 2
    _run([*args, "ckpt_path=last"], tmp_path / "killed", tmp_path / "data")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8
    _assert_same_params(tmp_path / "straight" / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")


def test_a_transformer_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    _run(TRANSFORMER, tmp_path / "straight", tmp_path / "data")
    marker = tmp_path / "writing"
    # saves: periodic@2, last@2, periodic@4 (this one stalls half-written), ...
    stall = ["+trainer.plugins=[{_target_:kill_helpers.StallingCheckpointIO,stall_at:3,marker:" + str(marker) + "}]"]
    _run_and_kill([*TRANSFORMER, *stall], tmp_path / "killed", tmp_path / "data", marker)
    ckpts = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "periodic_0000002.ckpt"]
    (half,) = ckpts.glob(".periodic_0000004.ckpt.*.tmp")  # the write the kill interrupted, under no .ckpt name
    assert half.stat().st_size > 0
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2  # whole and loadable
    _run([*TRANSFORMER, "ckpt_path=last"], tmp_path / "killed", tmp_path / "data")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8
    _assert_same_params(tmp_path / "straight" / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
