"""Every experiment runs end to end under a fast-dev-run override (tiny data, real code paths)."""

import csv
import json
import math
import shutil
import subprocess
import sys

import pytest
from conftest import CONFIGS, ROOT, TINY_NET, compose_cfg
from omegaconf import open_dict

from monosemantic.stages import run_training

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def tiny_overrides(experiment: str, token_store, tiny_shards) -> list[str]:
    if experiment == "transformer_1l":
        net = [f"model.net.{k}={v}" for k, v in TINY_NET.items() if k != "n_ctx"]
        return [f"data.store_dir={token_store}", f"data.n_ctx={TINY_NET['n_ctx']}", "data.batch_size=8", *net]
    return [f"data.shards={tiny_shards}", "data.batch_size=64", "data.val_batch_size=64", "data.buffer_tokens=256",
            "data.lr_windows=4", "data.lr_batch_size=4", "model.b_dec_init_tokens=128"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, token_store, tiny_shards, data_root, tmp_path):
    cfg = compose_cfg("train", [f"experiment={experiment}", "debug=fdr",
                                *tiny_overrides(experiment, token_store, tiny_shards)], tmp_path, data_root)
    metrics = run_training(cfg)
    if experiment == "transformer_1l":
        assert "val/loss" in metrics
        assert (tmp_path / "export" / "model.safetensors").is_file()
        assert json.loads((tmp_path / "export" / "config.json").read_text())["model"]["d_mlp"] == TINY_NET["d_mlp"]
    elif experiment == "sae_sweep":  # its SAEs each get a run folder of their own (tests/test_sweep.py)
        rows = json.loads((tmp_path / "sweep.json").read_text())
        assert len(rows) == 4 and all((tmp_path / r["metrics"]).is_file() for r in rows)
        assert {r["d_sae"] for r in rows} == {1024, 4096} and {r["l1_coeff"] for r in rows} == {3e-3, 6e-3}
    else:
        final = json.loads((tmp_path / "metrics.json").read_text())
        for key in ("l0", "explained_variance", "loss_recovered", "dead_frac", "dense_frac", "kl",
                    "train_dense_frac", "train_density_window_tokens", "norm_scale", "l1_coeff_raw", "lr_windows"):
            assert key in final, key
        # one step of 64 tokens cannot show a feature silent for the dead window: absent, not a structural 0
        assert final["training_tokens"] < final["dead_window_tokens"] and "train_dead_frac" not in final
        # a few hundred held-out tokens cannot show a density below 1e-6: absent, not a structural 0
        assert final["n_tokens"] < 1e6 and "ultralow_frac" not in final
        if final["architecture"] in ("topk", "batchtopk", "matryoshka_batchtopk"):  # no λ in their loss
            assert final["l1_coeff"] is None and final["l1_coeff_raw"] is None and final["k"] == 20
        else:  # λ/s on raw activations for an L1 term; λ/s² for JumpReLU's L0 (L0 does not scale)
            power = 2 if final["architecture"] == "jumprelu" else 1
            assert final["l1_coeff_raw"] == pytest.approx(final["l1_coeff"] / final["norm_scale"] ** power)
        assert final["n_skipped_shards"] == 0 and 0 < final["lr_windows"] <= 512  # scale.sae.final_eval_lr_windows
        cfg_json = json.loads((tmp_path / "export" / "cfg.json").read_text())
        size = experiment.split("_")[1]
        assert cfg_json["d_sae"] == (int(size) if size.isdigit() else 4096) and cfg_json["d_in"] == TINY_NET["d_mlp"]
        # the variant experiments export as SAELens names them (BatchTopK as the JumpReLU it infers as)
        arch = {"jumprelu": "jumprelu", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "topk": "topk"}.get(
            size, "standard")
        assert cfg_json["architecture"] == arch and cfg_json["metadata"]["trained_as"]["architecture"] == \
            final["architecture"]


@pytest.mark.slow
def test_multirun_glob_of_sae_experiments_through_the_entry_point(tiny_shards, tmp_path):
    """`python src/train.py -m 'experiment=glob(sae_*)'`: one job per experiment, each with its own dir."""
    # `++`: the sweeper first composes without the swept experiment, where data.shards does not exist yet
    over = ["++" + o for o in tiny_overrides("sae", None, tiny_shards)]
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "-m", "experiment=glob([sae_5*,sae_4*])", "debug=fdr",
           *over, f"hydra.sweep.dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    assert len(jobs) == 2


@pytest.mark.parametrize("experiment", ["transformer_1l", "sae_512"])
def test_default_loggers_write_an_offline_wandb_run_and_csv(experiment, token_store, tiny_shards, data_root, tmp_path):
    """The default logger group (W&B offline + CSV) through the real training path, whole config logged."""
    cfg = compose_cfg("train", [f"experiment={experiment}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                "trainer.limit_val_batches=1", *tiny_overrides(experiment, token_store, tiny_shards)],
                      tmp_path, data_root)
    assert set(cfg.logger) == {"wandb", "csv"}
    run_training(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert all(isinstance(t, str) for t in cfg.tags)


@pytest.mark.slow
def test_sae_run_builds_every_missing_stage_then_reuses_them(data_root, tmp_path):
    """`experiment=sae_512` with no shards: token store → transformer → cache → SAE, keyed; a second run reuses."""
    data = tmp_path / "data"
    net = [f"model.net.{k}={v}" for k, v in TINY_NET.items() if k != "n_ctx"]
    over = ["experiment=sae_512", "scale.transformer.n_ctx=32", "scale.transformer.batch_size=8",
            "scale.transformer.max_steps=4", "scale.transformer.val_check_interval=2",
            "scale.transformer.val_windows=4",
            "scale.cache.n_contexts=96", "scale.cache.tokens_per_context=8", "scale.cache.contexts_per_shard=16",
            "scale.sae.batch_size=64", "scale.sae.max_steps=3", "scale.sae.val_check_interval=3",
            "scale.sae.limit_val_batches=1", "scale.sae.lr_windows=2", "scale.sae.final_eval_lr_windows=2",
            "scale.sae.resample_steps=[]", "data.buffer_tokens=256", "model.b_dec_init_tokens=64", "logger=csv"]
    runs = []
    for i in range(2):
        cfg = compose_cfg("train", over, tmp_path / f"run{i}", data)
        with open_dict(cfg):
            cfg.transformer_overrides = ["data.corpus.kind=python_stdlib", "data.corpus.max_bytes=300000",
                                         "data.tokenizer.vocab_size=512", "logger=csv", *net]
        run_training(cfg)
        runs.append(json.loads((tmp_path / f"run{i}" / "metrics.json").read_text()))
    def artifacts(kind):  # the hidden .locks folder beside them is the artifact store's
        return [p for p in (data / kind).iterdir() if not p.name.startswith(".")]

    assert len(artifacts("tokens")) == 1
    assert len(artifacts("models")) == 1
    [shards] = artifacts("activations")
    assert (shards / "manifest.json").is_file() and runs[0]["shards"] == str(shards)
    # the scale.* overrides reached the upstream stages
    assert json.loads((shards / "manifest.json").read_text())["n_tokens"] == 96 * 8
    # built or reused, as the artifact store saw it (not guessed from timing)
    assert [(r["stage"], r["status"]) for r in runs[0]["stages"]] == [
        ("token store", "built"), ("transformer", "built"), ("activation cache", "built")]
    assert [(r["stage"], r["status"]) for r in runs[1]["stages"]] == [
        ("transformer", "reused"), ("activation cache", "reused")]
    assert runs[1]["stages"][1]["path"] == str(shards)
    # the upstream stage logged inside the run that built it, with that run's logger (logger=csv)
    assert (tmp_path / "run0" / "upstream" / "transformer_1l" / "csv" / "metrics.csv").is_file()
    assert runs[0]["l0"] == pytest.approx(runs[1]["l0"])  # same data, same seed: the same SAE


def test_transformer_shorter_than_its_val_interval_still_validates(token_store, data_root, tmp_path):
    """3 steps with val_check_interval=10: the final weights are validated, and the export records a real loss."""
    over = ["experiment=transformer_1l", "trainer.max_steps=3", "trainer.val_check_interval=10", "data.val_windows=4",
            "logger=csv", *tiny_overrides("transformer_1l", token_store, None)]
    cfg = compose_cfg("train", over, tmp_path, data_root)
    metrics = run_training(cfg)
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] > 0
    info = json.loads((tmp_path / "export" / "config.json").read_text())
    assert info["val_loss"] == pytest.approx(metrics["val/loss"]) and info["trainer"]["world_size"] == 1


def test_loss_recovered_is_absent_with_a_reason_and_skipped_shards_are_counted(tiny_shards, data_root, tmp_path):
    """No token windows (data.lr_windows=0, final_eval_lr_windows=0): no val/loss_recovered anywhere — not a NaN
    — the reason in metrics.json, and the sweep metric is None. A damaged shard skipped goes into metrics.json."""
    from monosemantic.data.shards.format import shard_name
    from monosemantic.utils.hydra_utils import metric_value

    damaged = tmp_path / "shards"
    shutil.copytree(tiny_shards, damaged)
    with open(damaged / shard_name(1), "r+b") as f:
        f.truncate(f.seek(0, 2) // 2 + 700)
    over = [o for o in tiny_overrides("sae", None, damaged) if not o.startswith("data.lr_windows")]
    cfg = compose_cfg("train", ["experiment=sae_512", *over, "data.lr_windows=0", "final_eval_lr_windows=0",
                                "data.skip_corrupt=true", "trainer.max_steps=4", "trainer.val_check_interval=2",
                                "trainer.limit_val_batches=1", "scale.sae.resample_steps=[]", "logger=csv"],
                      tmp_path / "run", data_root)
    metrics = run_training(cfg)
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "loss_recovered" not in final and "no held-out token windows" in final["loss_recovered_skipped"]
    assert not [k for k in metrics if "loss_recovered" in k]
    assert metric_value(metrics, cfg.optimized_metric) is None  # val/loss_recovered: the sweeper gets None
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/mse" in header and not [h for h in header if "loss_recovered" in h]
    assert final["n_skipped_shards"] == 1 and final["skipped_shards"] == [shard_name(1)]  # once, read or not


def test_train_and_val_mse_share_one_unit(tiny_shards, data_root, tmp_path):
    """train/mse and val/mse are both on raw activations; the normalised one has its own name (a factor s²)."""
    over = ["experiment=sae_512", *tiny_overrides("sae", None, tiny_shards), "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
            "scale.sae.resample_steps=[]", "logger=csv"]
    cfg = compose_cfg("train", over, tmp_path, data_root)
    run_training(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    s2 = json.loads((tmp_path / "metrics.json").read_text())["norm_scale"] ** 2
    train = [r for r in rows if r.get("train/mse")]
    assert train and all(float(r["train/mse_normalized"]) == pytest.approx(float(r["train/mse"]) * s2, rel=1e-4)
                         for r in train)
    val = float(next(r["val/mse"] for r in rows if r.get("val/mse")))
    assert 0.1 < val / float(train[-1]["train/mse"]) < 10  # the same unit: same order (s² here is ~1e4)
