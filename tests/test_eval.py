"""`src/eval.py` on a Lightning checkpoint and on the export: same scale-free metrics, JSON beside each."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, compose_cfg

from monosemantic.stages import run_training
from monosemantic.stages.eval import run as run_eval
from monosemantic.utils.hydra_utils import apply_extras


@pytest.fixture(scope="module")
def trained_run(tiny_shards, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae_run")
    cfg = compose_cfg("train", [
        "experiment=sae_512", f"data.shards={tiny_shards}", "data.batch_size=64", "data.val_batch_size=64",
        "data.buffer_tokens=256", "data.lr_windows=4", "data.lr_batch_size=4", "model.b_dec_init_tokens=128",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "logger=csv",
        "scale.sae.resample_steps=[]"], out, data_root)
    apply_extras(cfg)  # as src/train.py does: writes the run's config_resolved.yaml
    run_training(cfg)
    return out


def test_eval_checkpoint_and_export_agree(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    from_ckpt = run_eval(compose_cfg("eval", [f"ckpt_path={ckpt}", "lr_windows=4"], tmp_path / "a"))
    from_export = run_eval(compose_cfg("eval", [f"ckpt_path={trained_run / 'export'}", "lr_windows=4"],
                                       tmp_path / "b"))
    # scale-free metrics agree; the checkpoint works in normalised space, the export on raw activations
    # metrics agree; mse is reported on raw activations for both (the checkpoint works in normalised space,
    # the export on raw activations)
    for key in ("l0", "explained_variance", "loss_recovered", "ce_sae", "dead_frac", "n_tokens", "mse"):
        assert from_ckpt[key] == pytest.approx(from_export[key], rel=1e-4, abs=1e-6), key
    written = json.loads((ckpt.parent / "eval_last.json").read_text())
    assert written["l0"] == from_ckpt["l0"]
    assert (trained_run / "export" / "eval_metrics.json").is_file()
    # and the end-of-training metrics.json is the same evaluation of the same held-out set
    final = json.loads((trained_run / "metrics.json").read_text())
    assert final["n_tokens"] == from_export["n_tokens"]


def test_eval_defaults_to_the_runs_own_final_evaluation(trained_run, tmp_path):
    """With no lr_windows given, eval uses as many loss-recovered windows as the run's final evaluation did (from
    the export's metadata, or the run's config beside a checkpoint) and records the count: same numbers."""
    final = json.loads((trained_run / "metrics.json").read_text())
    assert final["lr_windows"] > 4
    for i, path in enumerate((trained_run / "export", trained_run / "checkpoints" / "last.ckpt")):
        metrics = run_eval(compose_cfg("eval", [f"ckpt_path={path}"], tmp_path / str(i)))
        assert metrics["lr_windows"] == final["lr_windows"] and metrics["val_shards"] == 1
        for key in ("loss_recovered", "ce_clean", "ce_sae", "ce_ablated", "l0", "lr_tokens"):
            assert metrics[key] == pytest.approx(final[key], rel=1e-4), (path.name, key)


@pytest.mark.slow
def test_eval_entry_point(trained_run, tmp_path):
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, str(ROOT / "src" / "eval.py"), f"ckpt_path={trained_run / 'export'}",
                        "lr_windows=4", f"output={out}", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["l0"] <= 512 and "loss_recovered" in metrics


def test_eval_refuses_what_it_cannot_read(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="x.ckpt cannot be read"):
        run_eval(compose_cfg("eval", [f"ckpt_path={bad}"], tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="neither"):
        run_eval(compose_cfg("eval", [f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "o"))
