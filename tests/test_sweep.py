"""k SAEs from one stream (``experiment=sae_sweep``): each ends where it would alone, each with its own folder,
export, metrics and W&B run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from safetensors.torch import load_file
from wandb_records import run_record

from monosemantic.data.synthetic import random_directions, write_synthetic_shards
from monosemantic.errors import ConfigError
from monosemantic.stages import run_training
from monosemantic.stages.sae import member_configs

# a run short enough for CI that still passes through everything that could couple the SAEs: the L1 warm-up,
# two resampling events (with dead features to resample), validation, the LR decay, the sparse step
SHORT = ["scale.sae.batch_size=256", "scale.sae.max_steps=40", "scale.sae.lr=2e-2", "scale.sae.precision=32-true",
         "scale.sae.l1_warmup_steps=5", "scale.sae.resample_steps=[15,30]", "scale.sae.dead_window_tokens=2560",
         "scale.sae.n_loss_inputs=2048", "scale.sae.val_check_interval=20", "scale.sae.limit_val_batches=2",
         "scale.sae.lr_decay_start=0.5", "data.buffer_tokens=2048", "data.val_batch_size=1024",
         "model.b_dec_init_tokens=1024", "model.sparse_max_density=0.5", "trainer.log_every_n_steps=5"]
GRID = ["saes.grid.l1_coeff=[0.003,0.5]", "saes.grid.d_sae=[32,64]"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    dirs_KM = random_directions(48, 16, seed=0)
    return write_synthetic_shards(tmp_path_factory.mktemp("synthetic"), dirs_KM, n_tokens=24_576, p_active=3 / 48,
                                  rows_per_sample=256, samples_per_shard=16)


def _weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export / "sae_weights.safetensors"))


@pytest.fixture(scope="module")
def sweep_run(synthetic, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sweep")
    cfg = compose_cfg("train", ["experiment=sae_sweep", f"data.shards={synthetic}", *SHORT, *GRID], run)
    metrics = run_training(cfg)
    assert metrics["final/l1_coeff=0.5,d_sae=64/d_sae"] == 64  # the run returns every SAE's finals by name
    return run


def test_each_sae_of_a_sweep_ends_where_it_would_alone(synthetic, sweep_run, tmp_path):
    names = sorted(p.name for p in (sweep_run / "saes").iterdir())
    assert names == sorted(f"l1_coeff={lam},d_sae={d}" for lam in ("0.003", "0.5") for d in (32, 64))
    resampled = 0
    for lam, d in (("0.003", 32), ("0.5", 64), ("0.5", 32)):
        solo = tmp_path / f"solo_{lam}_{d}"
        cfg = compose_cfg("train", ["experiment=sae_512", f"data.shards={synthetic}", *SHORT,
                                    f"model.d_sae={d}", f"model.l1_coeff={lam}", "logger=csv"], solo)
        run_training(cfg)
        member = sweep_run / "saes" / f"l1_coeff={lam},d_sae={d}"
        alone, together = _weights(solo / "export"), _weights(member / "export")
        assert alone.keys() == together.keys()
        for key in alone:
            # the same float32 operations on the same batches in the same order: equal to rounding (measured
            # exactly equal on CPU); the bound leaves room for a reordered reduction, far below one step's change
            torch.testing.assert_close(together[key], alone[key], rtol=0, atol=1e-6, msg=f"{member.name}: {key}")
        solo_m = json.loads((solo / "metrics.json").read_text())
        sweep_m = json.loads((member / "metrics.json").read_text())
        for key in ("l0", "mse", "explained_variance", "dead_frac", "training_tokens"):
            assert sweep_m[key] == pytest.approx(solo_m[key], rel=1e-5, abs=1e-7), key
        assert sweep_m["sweep_member"] == member.name and sweep_m["d_sae"] == d
        resampled += sum(int(float(r["resample/n_resampled"])) for r in _csv_rows(member)
                         if r.get("resample/n_resampled"))
    assert resampled > 0, "the run must resample something, or the comparison never exercised the resampler"


def _csv_rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_sweep_writes_each_sae_its_own_run_and_one_table(sweep_run):
    rows = json.loads((sweep_run / "sweep.json").read_text())
    assert [r["name"] for r in rows] == [f"l1_coeff={lam},d_sae={d}" for lam in ("0.003", "0.5") for d in (32, 64)]
    for r in rows:
        member = sweep_run / "saes" / r["name"]
        assert sweep_run / r["metrics"] == member / "metrics.json"  # relative: the run folder can move
        final = json.loads((member / "metrics.json").read_text())
        assert r["l0"] == final["l0"] and r["d_sae"] == final["d_sae"]
        cfg_json = json.loads((member / "export" / "cfg.json").read_text())
        assert cfg_json["d_sae"] == r["d_sae"] and cfg_json["d_in"] == 16
        logged = _csv_rows(member)
        assert any(row.get("train/l0") for row in logged) and any(row.get("val/mse") for row in logged)
        assert any(row.get("final/l0") for row in logged)
        assert list((member / "plots").glob("val_density_step*.png"))
        (wb,) = member.glob("wandb/offline-run-*/run-*.wandb")  # its own W&B run, in the sweep's group
        run = run_record(wb)
        assert (run.display_name, run.run_group) == (f"sae_sweep/{r['name']}", f"sae_sweep/{sweep_run.name}")
        assert r["name"] in run.tags
    # λ raises sparsity: at each width the larger λ fires fewer features per token
    by = {(r["l1_coeff"], r["d_sae"]): r["l0"] for r in rows}
    assert by[(0.5, 32)] < by[(0.003, 32)] and by[(0.5, 64)] < by[(0.003, 64)]
    assert "| SAE |" in (sweep_run / "sweep.md").read_text()
    # the run's own csv has the summed loss, not one SAE's numbers
    top = _csv_rows(sweep_run)
    assert any(r.get("train/loss_sum") for r in top) and not any(r.get("train/l0") for r in top)


def test_the_frontier_reads_an_in_process_sweep(sweep_run, tmp_path):
    from monosemantic.frontier import collect, frontier_figure, latest_sweep

    logs = tmp_path / "logs"
    (logs / "sae_512" / "runs" / "2026-01-01_00-00-00").mkdir(parents=True)  # a plain run: not a sweep
    (logs / "sae_sweep" / "runs").mkdir(parents=True)
    (logs / "sae_sweep" / "runs" / "2026-01-02_00-00-00").symlink_to(sweep_run)
    assert latest_sweep(logs) == logs / "sae_sweep" / "runs" / "2026-01-02_00-00-00"
    rows = collect([sweep_run])
    assert sorted(r["name"] for r in rows) == sorted(f"saes/{p.name}" for p in (sweep_run / "saes").iterdir())
    fig = frontier_figure(rows)
    lr_ax, ev_ax = fig.axes
    assert sorted(len(line.get_xdata()) for line in ev_ax.get_lines()) == [2, 2]  # a line per d_sae, a point per λ
    assert ev_ax.get_xscale() == "log"
    # synthetic shards have no transformer: that panel says so rather than drawing an empty frame
    assert not lr_ax.get_lines() and "no run measured loss recovered" in [t.get_text() for t in lr_ax.texts]


def test_a_grid_key_the_sae_does_not_have_is_named(synthetic, tmp_path):
    cfg = compose_cfg("train", ["experiment=sae_sweep", f"data.shards={synthetic}", "+saes.grid.l1_cof=[1,2]"],
                      tmp_path)
    with pytest.raises(ConfigError, match=r"saes\.grid\.l1_cof"):
        member_configs(cfg)


def test_a_grid_over_a_nested_key_names_its_saes_by_the_last_part(synthetic, tmp_path):
    cfg = compose_cfg("train", ["experiment=sae_sweep", f"data.shards={synthetic}", "~saes.grid",
                                "+saes.grid={optimizer.lr:[1e-3,3e-4]}"], tmp_path)
    members = member_configs(cfg)
    assert [n for n, _ in members] == ["lr=0.001", "lr=0.0003"]
    assert [m.optimizer.lr for _, m in members] == [1e-3, 3e-4]


def test_a_grid_over_target_l0_starts_each_sae_at_its_own_l0(synthetic, tmp_path):
    # b_enc_init_l0 is ${.target_l0}: each member follows its own grid value, not the base's (null)
    cfg = compose_cfg("train", ["experiment=sae_sweep", f"data.shards={synthetic}", "~saes.grid",
                                "+saes.grid={target_l0:[4,8]}"], tmp_path)
    members = member_configs(cfg)
    assert [(m.target_l0, m.b_enc_init_l0) for _, m in members] == [(4, 4), (8, 8)]
    cfg = compose_cfg("train", ["experiment=sae_sweep", f"data.shards={synthetic}", "~saes.grid",
                                "+saes.grid={target_l0:[4,8],b_enc_init_l0:[16]}"], tmp_path / "b")
    assert [m.b_enc_init_l0 for _, m in member_configs(cfg)] == [16, 16]  # set by the grid itself: kept
