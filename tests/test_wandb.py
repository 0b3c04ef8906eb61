"""W&B with no key and no network writes an offline run into the run directory."""

import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import os, sys
os.environ["PROJECT_ROOT"] = sys.argv[1]
from monosemantic.utils.hydra_utils import wandb_offline
assert wandb_offline(), "no key, no netrc: must be offline"
from lightning.pytorch.loggers import WandbLogger
lg = WandbLogger(project="monosemantic-test", save_dir=sys.argv[2], offline=wandb_offline())
lg.log_hyperparams({"l1_coeff": 0.004})
lg.log_metrics({"train/loss": 1.5}, step=1)
lg.experiment.finish()
"""


def test_wandb_offline_run_without_key_or_network(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update({"HOME": str(tmp_path), "WANDB_SILENT": "true",
                # any attempt to reach a server would hang on this unroutable proxy, failing the timeout
                "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the run's data file was written"


def test_wandb_online_when_key_present(monkeypatch, tmp_path):
    from monosemantic.utils.hydra_utils import wandb_offline

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()
