"""Sweeps through the real entry point: Hydra's basic sweeper, the Optuna sweeper with a persistent study, the
submitit launcher, and the frontier plot drawn from what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT
from wandb_records import run_record

from monosemantic.data.synthetic import random_directions, write_synthetic_shards

pytestmark = pytest.mark.slow

TINY = ["scale.sae.batch_size=256", "scale.sae.max_steps=12", "scale.sae.precision=32-true",
        "scale.sae.l1_warmup_steps=2", "scale.sae.resample_steps=[]", "scale.sae.val_check_interval=12",
        "scale.sae.limit_val_batches=1", "data.buffer_tokens=1024", "data.val_batch_size=1024",
        "model.b_dec_init_tokens=512", "trainer.log_every_n_steps=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("synthetic"), random_directions(32, 16, seed=0),
                                  n_tokens=8192, p_active=3 / 32, rows_per_sample=256, samples_per_shard=8)


def _train(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: int(p.name.split("_")[0]))


@pytest.fixture(scope="module")
def grid_sweep(shards, tmp_path_factory) -> Path:
    """``-m model.l1_coeff=a,b model.d_sae=c,d``: four jobs, the default loggers (CSV + offline W&B)."""
    tmp = tmp_path_factory.mktemp("grid")
    _train(["-m", "experiment=sae_512", f"data.shards={shards}", *TINY, "model.l1_coeff=0.003,0.3",
            "model.d_sae=32,64", f"paths.log_dir={tmp / 'logs'}"], tmp)
    (sweep,) = (tmp / "logs" / "multiruns").iterdir()
    return sweep


def test_a_2x2_multirun_is_four_runs_in_one_folder_and_one_wandb_group(grid_sweep):
    jobs = _jobs(grid_sweep)
    assert [j.name for j in jobs] == ["0_sae_32", "1_sae_64", "2_sae_32", "3_sae_64"]
    assert (grid_sweep / "multirun.yaml").is_file()  # beside its jobs, not under one job's task folder
    seen = set()
    for job in jobs:
        final = json.loads((job / "metrics.json").read_text())
        seen.add((final["l1_coeff"], final["d_sae"]))
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        run = run_record(run_file)
        assert run.run_group == f"multirun/{grid_sweep.name}"
        # named by what the sweep varies, with this job's values, not by every override on the command line
        assert run.display_name == f"sae_{final['d_sae']}[model.l1_coeff={final['l1_coeff']},model.d_sae=" \
                                   f"{final['d_sae']}]"
    assert seen == {(0.003, 32), (0.003, 64), (0.3, 32), (0.3, 64)}
    rows = json.loads((grid_sweep / "sweep.json").read_text())  # the sweep-end table
    assert len(rows) == 4 and {(r["l1_coeff"], r["d_sae"]) for r in rows} == seen
    assert all((grid_sweep / r["metrics"]).is_file() for r in rows)
    assert rows[0]["name"].startswith("0_sae_32 [model.l1_coeff=0.003,model.d_sae=32]")
    assert "loss recovered" not in (grid_sweep / "sweep.md").read_text()  # no transformer: no such column


def test_the_frontier_is_drawn_from_a_sweep(grid_sweep, tmp_path):
    from PIL import Image

    out = tmp_path / "frontier"
    r = subprocess.run([sys.executable, str(ROOT / "src" / "frontier.py"), f"runs=[{grid_sweep}]",
                        f"hydra.run.dir={out}", "wandb=true"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "frontier.json").read_text())
    assert len(rows) == 4 and {r["d_sae"] for r in rows} == {32, 64}
    with Image.open(out / "frontier.png") as im:
        assert im.size[0] > 800 and im.size[1] > 300
        assert len(set(im.convert("RGB").getdata())) > 50, "an empty canvas"
    (wb,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert run_record(wb).run_group == "frontier"


def test_the_frontier_names_a_folder_with_no_sae_metrics(tmp_path):
    from monosemantic.frontier import collect

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no SAE metrics.json"):
        collect([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect([tmp_path / "nowhere"])


def test_an_optuna_study_runs_its_trials_and_a_rerun_continues_it(shards, tmp_path):
    import optuna  # the dev extra installs the optuna extra: a missing plugin fails here, loudly

    args = ["-m", "experiment=sae_512", "hparams_search=sae_optuna", f"data.shards={shards}", *TINY,
            "model.d_sae=32", "objective.fidelity=explained_variance", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2", "logger=csv", f"paths.log_dir={tmp_path / 'logs'}",
            "hydra.sweeper.study_name=test"]
    _train(args, tmp_path)
    db = tmp_path / "logs" / "optuna" / "test.db"
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{db}")
    first = [t.params for t in study.trials]
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    for t in study.trials:  # each trial's value is the bounded objective of what that job measured
        assert -10 < t.value <= 1
    _train(args, tmp_path)
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{db}")
    assert len(study.trials) == 4 and [t.params for t in study.trials[:2]] == first
    sweeps = sorted((tmp_path / "logs" / "multiruns").iterdir())
    assert len(sweeps) == 2 and all(len(_jobs(s)) == 2 for s in sweeps)
    final = json.loads((_jobs(sweeps[0])[0] / "metrics.json").read_text())
    assert final["objective"] == pytest.approx(final["explained_variance"] - max(0.0, final["l0"] / 20 - 1))


def test_the_submitit_launcher_runs_a_job(shards, tmp_path):
    _train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "experiment=sae_512",
            f"data.shards={shards}", *TINY, "model.d_sae=32", "logger=csv", f"paths.log_dir={tmp_path / 'logs'}"],
           tmp_path)
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    (job,) = _jobs(sweep)
    assert json.loads((job / "metrics.json").read_text())["d_sae"] == 32
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "the job ran as a submitit job"


def test_the_slurm_launcher_config_asks_one_task_per_gpu(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()  # other tests leave one initialised, as a real run would
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", ["experiment=sae_4096", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
                                "hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 2)
