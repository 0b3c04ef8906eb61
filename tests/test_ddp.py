"""DDP with 2 CPU processes (trainer=ddp_sim) through the real entry point, for both stages."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_NET
from safetensors.torch import load_file


def run(args, tmp_path, timeout=600):
    env_cmd = [sys.executable, str(ROOT / "src" / "train.py"), *args, f"hydra.run.dir={tmp_path}", "logger=csv"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # for the test-only rank_state callback
    r = subprocess.run(env_cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.slow
def test_transformer_ddp_sim(token_store, data_root, tmp_path):
    net = [f"model.net.{k}={v}" for k, v in TINY_NET.items() if k != "n_ctx"]
    run(["experiment=transformer_1l", "trainer=ddp_sim", f"data.store_dir={token_store}",
         f"data.n_ctx={TINY_NET['n_ctx']}", "data.batch_size=8", "trainer.max_steps=6", "trainer.val_check_interval=3",
         "data.val_windows=8", f"paths.data_dir={data_root}", *net], tmp_path)
    # one run directory (no per-rank Hydra dirs), one export, checkpoints from rank 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.glob("*/.hydra/config.yaml"))
    # each rank's random state, gathered when the checkpoint was written (every rank has the run's seed)
    rng = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["rng_states"]
    assert len(rng) == 2 and all(r["torch"].dtype == torch.uint8 and len(r["python"][1]) == 625 for r in rng)


@pytest.mark.slow
def test_sae_ddp_sim_with_resampling(tiny_shards, tmp_path):
    shards = tmp_path / "shards"  # with one damaged training shard, skipped by whichever rank reads it
    shutil.copytree(tiny_shards, shards)
    with open(shards / "shard-000002.tar", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2 + 700)
    run(["experiment=sae_512", "trainer=ddp_sim", f"data.shards={shards}", "data.skip_corrupt=true",
         "data.batch_size=32",
         "data.val_batch_size=64", "data.buffer_tokens=128", "data.lr_windows=4", "data.lr_batch_size=2",
         "model.b_dec_init_tokens=64", "trainer.max_steps=8", "trainer.val_check_interval=4",
         "trainer.limit_val_batches=2", "scale.sae.resample_steps=[4]", "scale.sae.dead_window_tokens=64",
         "scale.sae.n_loss_inputs=256", "scale.sae.l1_coeff=1.0", "scale.sae.l1_warmup_steps=0",
         "scale.sae.lr=1.0", "+callbacks.rank_state._target_=rank_state.DumpRankState",
         f"+callbacks.rank_state.out_dir={tmp_path / 'ranks'}", "+callbacks.rank_state.steps=[4,8]"], tmp_path)
    final = json.loads((tmp_path / "metrics.json").read_text())
    # both ranks counted tokens: 8 steps × 32 × 2 ranks
    assert final["training_tokens"] == 8 * 32 * 2
    assert final["skipped_shards"] == ["shard-000002.tar"] and final["n_skipped_shards"] == 1  # summed over ranks
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("resample/n_resampled")
    resampled = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert resampled and resampled[0] > 0, "a heavy λ kills features; the resampler revived some on both ranks"
    # right after the resampling step and at the end, both ranks hold the same SAE and the same counters
    for step in (4, 8):
        r0, r1 = (load_file(str(tmp_path / "ranks" / f"step{step}_rank{r}.safetensors")) for r in (0, 1))
        assert set(r0) == set(r1) and "sae.W_dec" in r0
        for name in r0:
            assert torch.equal(r0[name], r1[name]), (step, name)
    assert int(r0["tokens_seen"]) == 8 * 32 * 2


@pytest.mark.slow
def test_sae_sweep_ddp_sim_keeps_every_sae_identical_across_ranks(tiny_shards, tmp_path):
    """k SAEs under DDP: each SAE's gradients are all-reduced, its counters reduced, its resampling broadcast."""
    run(["experiment=sae_sweep", "trainer=ddp_sim", f"data.shards={tiny_shards}", "saes.grid.l1_coeff=[0.003,1.0]",
         "saes.grid.d_sae=[32]", "data.batch_size=32", "data.val_batch_size=64", "data.buffer_tokens=128",
         "data.lr_windows=4", "data.lr_batch_size=2", "model.b_dec_init_tokens=64", "trainer.max_steps=8",
         "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "scale.sae.resample_steps=[4]",
         "scale.sae.dead_window_tokens=64", "scale.sae.n_loss_inputs=256", "scale.sae.l1_warmup_steps=0",
         "scale.sae.lr=1.0", "+callbacks.rank_state._target_=rank_state.DumpRankState",
         f"+callbacks.rank_state.out_dir={tmp_path / 'ranks'}", "+callbacks.rank_state.steps=[4,8]"], tmp_path)
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["name"] for r in rows] == ["l1_coeff=0.003,d_sae=32", "l1_coeff=1,d_sae=32"]
    for r in rows:
        final = json.loads((tmp_path / r["metrics"]).read_text())
        assert final["training_tokens"] == 8 * 32 * 2  # both ranks' tokens, for each SAE
        assert "loss_recovered" in final  # the tiny cache has a transformer behind it
    for step in (4, 8):
        r0, r1 = (load_file(str(tmp_path / "ranks" / f"step{step}_rank{r}.safetensors")) for r in (0, 1))
        assert {"members.0.sae.W_dec", "members.1.sae.W_dec"} <= set(r0) and set(r0) == set(r1)
        for name in r0:
            assert torch.equal(r0[name], r1[name]), (step, name)
    # the two SAEs differ (λ 1.0 against 0.003): the ranks agree per SAE, not by sharing one
    assert not torch.equal(r0["members.0.sae.W_dec"], r0["members.1.sae.W_dec"])
