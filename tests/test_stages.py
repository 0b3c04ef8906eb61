"""The chain of stages: every setting of a run reaches the stages it builds (trainer, logger, seed, unless the
stage's own overrides say otherwise), artifact keys depend only on what changes the artifact, and concurrent
jobs build an artifact once."""

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_NET, compose_cfg
from omegaconf import open_dict

from monosemantic.stages import artifacts
from monosemantic.stages import transformer as transformer_stage
from monosemantic.stages.compose import compose_stage, shared_overrides

NET = [f"model.net.{k}={v}" for k, v in TINY_NET.items() if k != "n_ctx"]
TINY_TRANSFORMER = ["data.corpus.kind=python_stdlib", "data.corpus.max_bytes=300000", "data.tokenizer.vocab_size=512",
                    *NET]
TINY_SCALE = ["scale.transformer.n_ctx=32", "scale.transformer.batch_size=8", "scale.transformer.max_steps=4",
              "scale.transformer.val_check_interval=2", "scale.transformer.val_windows=4",
              "scale.cache.n_contexts=96", "scale.cache.tokens_per_context=8", "scale.cache.contexts_per_shard=16",
              "scale.sae.batch_size=64", "scale.sae.max_steps=3", "scale.sae.val_check_interval=3",
              "scale.sae.limit_val_batches=1", "scale.sae.lr_windows=2", "scale.sae.final_eval_lr_windows=2",
              "scale.sae.resample_steps=[]", "data.buffer_tokens=256", "model.b_dec_init_tokens=64"]


def upstream_transformer_cfg(parent):
    return transformer_stage.upstream_config(parent)


def test_upstream_stage_gets_the_runs_trainer_logger_and_seed(tmp_path):
    parent = compose_cfg("train", ["experiment=sae_512", "trainer=ddp_sim", "trainer.precision=bf16-mixed",
                                   "logger=csv", "logger.csv.name=mine", "seed=7", "trainer.max_steps=3",
                                   "trainer.val_check_interval=1"], tmp_path)
    with open_dict(parent):
        parent.transformer_overrides = ["trainer.devices=1"]  # the stage's own override wins
    sub = upstream_transformer_cfg(parent)
    assert sub.stage == "transformer"
    assert sub.trainer.accelerator == "cpu" and sub.trainer.strategy._target_.endswith("DDPStrategy")
    assert sub.trainer.devices == 1 and sub.trainer.precision == "bf16-mixed" and sub.seed == 7
    assert set(sub.logger) == {"csv"} and sub.logger.csv.name == "mine"
    # the SAE run's own schedule is not the transformer's
    assert sub.trainer.max_steps == sub.scale.transformer.max_steps != 3
    assert sub.trainer.val_check_interval == sub.scale.transformer.val_check_interval

    # a group the stage chooses itself drops the run's settings for it (logger.wandb.* names no csv logger)
    parent = compose_cfg("train", ["experiment=sae_512", "logger=wandb", "logger.wandb.project=mine",
                                   "trainer.precision=bf16-mixed"], tmp_path)
    with open_dict(parent):
        parent.transformer_overrides = ["logger=csv"]
    sub = upstream_transformer_cfg(parent)
    assert set(sub.logger) == {"csv"} and sub.trainer.precision == "bf16-mixed"
    assert sum(o.startswith("logger=") for o in shared_overrides(parent)) == 1

    # the cache stage an SAE run composes carries the same settings on to the transformer it builds
    cache = compose_stage("cache_activations", ["seed=7"], parent, tmp_path / "cache")
    with open_dict(cache):
        cache.inherited_overrides = shared_overrides(parent)
    assert shared_overrides(cache) == shared_overrides(parent) and cache.settings.seed == 7


def test_transformer_key_depends_on_what_changes_the_model(tmp_path):
    def key(*overrides):
        parent = compose_cfg("train", ["experiment=sae_512", *overrides], tmp_path)
        with open_dict(parent):
            parent.transformer_overrides = []
        return artifacts.transformer_key(upstream_transformer_cfg(parent))

    base = key()
    assert key("logger=csv") == key("logger=tensorboard") == base  # loggers do not change the weights
    assert key("trainer.max_steps=7") == base  # nor the SAE's own schedule
    assert key("trainer.precision=bf16-mixed") != base and key("seed=1") != base and key("trainer=ddp_sim") != base


@pytest.mark.slow
def test_ddp_sae_run_builds_its_upstream_stages_on_both_ranks(tmp_path):
    """`experiment=sae_512 trainer=ddp_sim seed=7 logger=csv` on an empty data dir: the transformer is trained
    with DDP on 2 processes, that seed and that logger; the cache is built once; the SAE trains on 2 ranks."""
    run_dir, data = tmp_path / "run", tmp_path / "data"
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "experiment=sae_512", "trainer=ddp_sim", "seed=7",
           "logger=csv", *TINY_SCALE, f"hydra.run.dir={run_dir}", f"paths.data_dir={data}",
           "transformer_overrides=[" + ",".join(f'"{o}"' for o in TINY_TRANSFORMER) + "]"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    [model] = [p for p in (data / "models").iterdir() if not p.name.startswith(".")]
    info = json.loads((model / "config.json").read_text())
    assert info["trainer"]["world_size"] == 2 and info["trainer"]["strategy"] == "DDPStrategy"
    assert info["seed"] == 7
    assert info["trained_tokens"] == 4 * 8 * 32 * 2  # steps × batch × n_ctx × ranks
    assert (run_dir / "upstream" / "transformer_1l" / "csv" / "metrics.csv").is_file()
    final = json.loads((run_dir / "metrics.json").read_text())
    # rank 0's record: it built the token store and (with rank 1) the transformer; the cache is built by
    # whichever rank takes its lock first, and the other waits for it and reuses it
    assert [(s["stage"], s["status"]) for s in final["stages"]][:2] == [("token store", "built"),
                                                                        ("transformer", "built")]
    assert final["stages"][2]["stage"] == "activation cache"
    run_log = (run_dir / "sae_512.log").read_text()  # both ranks log here
    assert run_log.count("activation cache: ") and run_log.count("is missing, building it") == 3  # once each
    assert final["training_tokens"] == 3 * 64 * 2
    manifest = json.loads((data / "activations" / final["shards"].split("/")[-1] / "manifest.json").read_text())
    assert manifest["n_tokens"] == 96 * 8 and manifest["settings"]["seed"] == 7
    assert "built in" in r.stdout and "transformer" in r.stdout  # the summary says what was built


@pytest.mark.slow
def test_two_jobs_building_one_cache_at_once_build_it_once(transformer_export, tmp_path):
    """Two `cache_activations.py` processes for the same set, started while a third holder keeps the lock:
    both wait, one builds, the other reuses it; both succeed and the set is whole."""
    from filelock import FileLock

    from monosemantic.data.shards.format import read_manifest

    out = tmp_path / "acts"
    common = [f"model_dir={transformer_export}", f"out_dir={out}", "settings.n_contexts=96",
              "settings.tokens_per_context=8", "settings.contexts_per_shard=16", "settings.batch_size=16"]
    lock = FileLock(str(artifacts.lock_path(out)))
    artifacts.lock_path(out).parent.mkdir(parents=True, exist_ok=True)
    with lock:
        procs = [subprocess.Popen([sys.executable, str(ROOT / "src" / "cache_activations.py"), *common,
                                   f"hydra.run.dir={tmp_path / f'job{i}'}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=tmp_path) for i in range(2)]
        logs = [tmp_path / f"job{i}" / "cache_activations.log" for i in range(2)]
        deadline = time.time() + 300
        while not all(p.is_file() and "waiting for" in p.read_text() for p in logs):  # both are at the lock
            assert time.time() < deadline and all(p.poll() is None for p in procs), "a job did not wait"
            time.sleep(0.5)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    texts = [p.read_text() for p in logs]
    assert sum("is missing, building it" in t for t in texts) == 1
    assert sum("built by another process while this one waited" in t for t in texts) == 1
    m = read_manifest(out)
    assert m["n_tokens"] == 96 * 8 and len(m["shards"]) == 6 and not list(out.glob("*.tmp"))


def _in_thread(fn, timeout=30):
    """Run ``fn`` in a thread; fail (not hang) if it does not return in time, and re-raise its error."""
    import threading

    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test below
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "did not return in time"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_a_follower_rank_never_builds_alone(tmp_path, monkeypatch):
    """Rank 1 of a multi-rank build (as srun starts it: RANK=1) waits; it reuses what rank 0 finds complete, joins
    the build only once rank 0's marker (named by this launch) says "building", and stops when it says "failed"."""
    from monosemantic.utils.io import write_json_atomic

    monkeypatch.setattr(artifacts, "POLL_S", 0.05)
    monkeypatch.setenv("MONOSEMANTIC_LAUNCH_ID", "launch-a")
    monkeypatch.setenv("RANK", "1")
    assert not artifacts.is_rank_zero()
    built, ledger = [], []

    def complete(p):
        return (p / "done").is_file()

    def finish(p):
        p.mkdir(exist_ok=True)
        (p / "done").write_text("")

    # 1. rank 0 finds it complete (another job built it while rank 0 waited): rank 1 reuses, builds nothing
    art = tmp_path / "a"
    threading_timer(0.3, lambda: finish(art))
    _in_thread(lambda: artifacts.ensure("x", art, complete, lambda: built.append(1), ledger, multi_rank=True))
    assert built == [] and ledger[-1].status == "reused"

    # 2. a marker a killed launch left is not this launch's: ignored; this launch's marker: rank 1 joins
    art = tmp_path / "b"
    stale = artifacts.lock_path(art).with_suffix(".launch-old.building")
    stale.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stale, {"state": "building", "path": str(art)})
    threading_timer(0.3, lambda: write_json_atomic(artifacts.marker_path(art), {"state": "building",
                                                                                "path": str(art)}))
    _in_thread(lambda: artifacts.ensure("x", art, complete, lambda: (built.append(2), finish(art)), ledger,
                                        multi_rank=True))
    assert built == [2] and ledger[-1].status == "built"

    # 3. rank 0 failed: rank 1 stops with its error instead of waiting for ever
    art = tmp_path / "c"
    threading_timer(0.3, lambda: write_json_atomic(artifacts.marker_path(art), {
        "state": "failed", "path": str(art), "error": "RuntimeError('out of memory')"}))
    with pytest.raises(RuntimeError, match="rank 0 failed to build.*out of memory"):
        _in_thread(lambda: artifacts.ensure("x", art, complete, lambda: built.append(3), ledger, multi_rank=True))
    assert built == [2]

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # the main process of node 1 under Lightning's launcher
    assert not artifacts.is_rank_zero()


def test_rank_zero_marks_its_build_and_clears_or_fails_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_LAUNCH_ID", "launch-b")
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    art = tmp_path / "art"
    marker = artifacts.marker_path(art)
    seen = {}

    def build():
        seen["during"] = json.loads(marker.read_text())
        art.mkdir()
        (art / "done").write_text("")

    artifacts.ensure("x", art, lambda p: (p / "done").is_file(), build, multi_rank=True)
    assert seen["during"] == {"state": "building", "path": str(art)} and not marker.exists()

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        artifacts.ensure("x", tmp_path / "other", lambda p: p.is_dir(), broken, multi_rank=True)
    state = json.loads(artifacts.marker_path(tmp_path / "other").read_text())
    assert state["state"] == "failed" and "disk full" in state["error"]


def threading_timer(delay, fn):
    import threading

    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()
    return t


def test_skipped_shards_union_after_the_final_evaluation():
    """Flags summed over ranks after training, OR what rank 0 skipped since; unattributed skips add up."""
    from monosemantic.stages.sae import union_skipped

    all_ranks = torch.tensor([0, 2, 0, 1])  # shard 1 skipped by both ranks, 1 unattributed skip
    before, after = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 3])  # the final eval skipped shard 2
    assert union_skipped(all_ranks, before, after).tolist() == [0, 1, 1, 3]


def test_world_size_in_the_key_is_resolved():
    assert artifacts.world_size({"devices": 2, "num_nodes": 3}) == 6
    assert artifacts.world_size({"devices": [0, 1, 3]}) == 3 and artifacts.world_size({"devices": "0,1"}) == 2
    assert artifacts.world_size({"devices": -1, "accelerator": "cpu"}) == 1
