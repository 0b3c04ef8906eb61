"""Reliability (DESIGN §8): bad input gets one clear message naming the culprit, before anything is started and
without damaging what is already written; a NaN or inf never trains on silently; results are readable by the
other users of a machine."""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ROOT, compose_cfg
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from monosemantic.activation_cache import CacheSettings, write_activation_cache
from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.data.shards.format import ShardSetError, read_manifest
from monosemantic.errors import ConfigError, DiskFullError, InputError, NonFiniteError, UserError
from monosemantic.evaluation import too_small_warnings
from monosemantic.export import load_sae
from monosemantic.models.sae_module import SAEModule
from monosemantic.stages import run_training
from monosemantic.utils.io import atomic_dir, usual_mode, write_json_atomic
from monosemantic.utils.validate import check_node, check_targets

TINY = CacheSettings(n_contexts=96, tokens_per_context=8, contexts_per_shard=16, batch_size=16)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- errors read as messages ------------------------------------------------------------------------------
def _cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *args, "logger=csv",
                           f"hydra.run.dir={tmp_path}/run", f"paths.data_dir={tmp_path}/data"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HYDRA_FULL_ERROR": "", **env})


def test_bad_input_prints_one_message_without_a_traceback(tiny_shards, tmp_path):
    """The new user's case: `data.batch_size=0` once ended in a ZeroDivisionError deep in the stream, after W&B
    and Lightning had started, its traceback printed twice. Now: one message naming the key, exit status 1,
    nothing started; the run's log file records it too. HYDRA_FULL_ERROR=1 still shows the traceback."""
    args = ["experiment=sae_4096", f"data.shards={tiny_shards}", "data.batch_size=0"]
    out = _cli(args, tmp_path)
    both = out.stdout + out.stderr
    assert out.returncode == 1
    assert "Traceback" not in both
    assert both.count("data.batch_size=0: expected a positive integer") == 1
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "csv").exists()
    (log_file,) = (tmp_path / "run").glob("*.log")
    assert "data.batch_size=0: expected a positive integer" in log_file.read_text()
    full = _cli(args, tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_a_bug_still_shows_its_traceback_once(tmp_path, monkeypatch):
    """An error that is not bad input (here a ZeroDivisionError from inside a stage) keeps its traceback: that
    is what a maintainer needs. It reaches the console once (from Hydra), not also from our task wrapper."""
    child = f"""
import sys
sys.argv = ["train.py", "experiment=transformer_1l", "hydra.run.dir={tmp_path}/run", "logger=csv"]
sys.path.insert(0, {str(ROOT / "src")!r})
import monosemantic.stages as stages
stages.run_training = lambda cfg: 1 / 0
import runpy
runpy.run_path({str(ROOT / "src" / "train.py")!r}, run_name="__main__")
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "HYDRA_FULL_ERROR": ""})
    both = out.stdout + out.stderr
    assert out.returncode == 1 and both.count("Traceback") == 1 and "ZeroDivisionError" in both
    (log_file,) = (tmp_path / "run").glob("*.log")
    assert "ZeroDivisionError" in log_file.read_text()  # the log file keeps it, with its traceback


def test_a_typo_in_an_experiment_or_a_key_gets_the_closest_names(tmp_path):
    from monosemantic.utils.hydra_utils import composition_hint

    configs = ROOT / "configs"
    assert composition_hint(configs, "train", ["experiment=sae_4069"]).startswith(
        "experiment=sae_4069: did you mean experiment=sae_4096")
    assert composition_hint(configs, "train", ["experiment=sae_4096", "model.l1_cof=3"]) == (
        "model.l1_cof: no such key; did you mean model.l1_coeff? (+model.l1_cof=... adds a new key)")
    assert composition_hint(configs, "train", ["trainr.max_steps=3"]).startswith("trainr: no such key; did you "
                                                                                 "mean trainer")
    assert composition_hint(configs, "train", ["experiment=sae_4096"]) is None  # composes: nothing to say
    assert composition_hint(configs, "train", ["experiment=zzzz"]) is None  # nothing close: Hydra's list stands
    out = _cli(["scale=papr"], tmp_path)  # through the entry point: after Hydra's own message
    assert out.returncode == 1 and out.stderr.rstrip().endswith("scale=papr: did you mean scale=paper?")


def test_config_flags_and_their_values_are_not_read_as_overrides():
    from monosemantic.utils.hydra_utils import _command_line

    assert _command_line(["-cn", "eval", "x=1", "--multirun", "a=2"], "train") == ("eval", ["x=1", "a=2"], False)
    assert _command_line(["--config-name=eval", "x=1"], "train") == ("eval", ["x=1"], False)
    assert _command_line(["-cp", "other/configs", "x=1"], "train") == ("train", ["x=1"], True)  # no hint there
    assert _command_line(["--config-dir=extra", "x=1"], "train") == ("train", ["x=1"], True)


def test_every_project_error_is_a_message_and_keeps_its_builtin():
    for cls, builtin in ((ConfigError, ValueError), (InputError, ValueError), (ShardSetError, ValueError),
                         (NonFiniteError, FloatingPointError)):
        assert issubclass(cls, UserError) and issubclass(cls, builtin)
    from hydra.errors import CompactHydraException
    assert issubclass(UserError, CompactHydraException)  # what Hydra prints as its message alone


# -- sizes and types, up front ----------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", r"data.batch_size=0: expected a positive integer"),
    ("model.d_sae=1024.0", r"model.d_sae=1024.0: expected an integer \(write 1024\)"),
    ("scale.sae.batch_size=2048.5", r"data.batch_size=2048.5 \(from scale.sae.batch_size\): expected an integer"),
    ("scale.cache.n_contexts=5e2", r"scale.cache.n_contexts=500.0: expected an integer \(write 500\)"),
    ("model.d_sae=abc", r"model.d_sae='abc': expected an integer"),
    ("callbacks.neuron_resampler.resample_steps=[3,4.5]", r"resample_steps=\[3, 4.5\]: expected a list of integers"),
])
def test_wrong_sizes_and_types_name_their_key_before_anything_runs(tiny_shards, tmp_path, override, message):
    cfg = compose_cfg("train", ["experiment=sae_4096", f"data.shards={tiny_shards}", "logger=csv", override],
                      tmp_path)
    with pytest.raises(ConfigError, match=message):
        run_training(cfg)
    assert not any(tmp_path.iterdir())  # no checkpoint, no log folder, no W&B run


def test_the_checks_follow_the_type_hints_and_skip_what_they_cannot_read():
    class Target:
        def __init__(self, n: int, x: float, maybe: int | None = None, name: str = "a", flag: bool = True,
                     steps: list[int] | None = None, other: dict | None = None) -> None:
            pass

    good = OmegaConf.create({"n": 3, "x": 2, "maybe": None, "name": "b", "flag": False, "steps": [1, 2],
                             "other": {"k": 1.5}, "unknown": 1.5})
    check_node(good, Target, "t")  # an int where a float goes, null where allowed, unknown keys: all fine
    check_node(OmegaConf.create({"n": None}), Target, "t")  # null: a value the stage fills in (model.d_in)
    for bad, msg in (({"n": 2.5}, "t.n=2.5: expected an integer"), ({"x": "y"}, "t.x='y': expected a number"),
                     ({"flag": 1}, "t.flag=1: expected true or false")):
        with pytest.raises(ConfigError, match=msg):
            check_node(OmegaConf.create(bad), Target, "t")
    # a node with a missing value or a target that does not import is left to instantiation to report
    check_targets(OmegaConf.create({"a": {"_target_": "no.such.Thing", "n": 1.5}, "b": {"n": "???"}}))


def test_a_shard_set_given_as_a_file_says_to_pass_its_folder(tiny_shards):
    for f in (tiny_shards / "manifest.json", tiny_shards / "shard-000000.tar"):
        with pytest.raises(ShardSetError, match=f"is a file; .* pass {tiny_shards}$"):
            read_manifest(f)


# -- a cache folder of unknown origin ---------------------------------------------------------------------
def test_a_shard_set_without_its_identity_is_refused(tiny_shards, transformer_export, tmp_path):
    """Reproduced on main before the fix: with a manifest, 'complete, nothing to do' although its settings
    differ; with shards only, a 'resume' that mixed the foreign shards with new ones (exit 0)."""
    other = tmp_path / "with_manifest"
    shutil.copytree(tiny_shards, other)
    (other / "cache_identity.json").unlink()
    before = _snapshot(other)
    with pytest.raises(InputError, match=r"no cache_identity.json: its settings differ \(.*tokens_per_context: 8 "
                                         r"there, 4 asked for"):
        write_activation_cache(transformer_export, other, CacheSettings(**{**vars(TINY), "tokens_per_context": 4}),
                               progress=False)
    with pytest.raises(InputError, match="the model and settings that wrote it are unknown"):
        write_activation_cache(transformer_export, other, TINY, progress=False)  # same settings: still unknown
    (other / "manifest.json").unlink()
    del before["manifest.json"]
    with pytest.raises(InputError, match=r"holds 6 shard file\(s\) \(shard-000000.tar, \.\.\.\) but no "
                                         "cache_identity.json"):
        write_activation_cache(transformer_export, other, TINY, progress=False)
    assert _snapshot(other) == before  # nothing there was touched
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a shard set")
    assert write_activation_cache(transformer_export, empty, TINY, progress=False) == empty  # nothing to refuse


# -- the held-out set has to be big enough to measure what is reported -------------------------------------
def test_a_held_out_set_too_small_is_flagged():
    assert too_small_warnings({"n_tokens": 1e6, "loss_recovered": 0.9, "lr_tokens": 65_000}, 65_536, 8_192) == []
    small = too_small_warnings({"n_tokens": 256.0, "loss_recovered": 0.989, "lr_tokens": 1_000.0}, 65_536, 8_192)
    assert len(small) == 2
    assert "256 activations" in small[0] and "rarer than 1 in 256" in small[0]
    assert "1,000 spliced tokens" in small[1]


def test_a_run_on_a_tiny_held_out_set_says_so_in_metrics_json(tiny_shards, tmp_path):
    """The new user's case: a cache too small for its own held-out split reported loss recovered 0.989 with no
    warning. The tiny set holds out one shard of 128 activations."""
    cfg = compose_cfg("train", ["experiment=sae_4096", f"data.shards={tiny_shards}", "logger=csv",
                                "model.d_sae=32", "data.batch_size=32", "data.buffer_tokens=128",
                                "trainer.max_steps=3", "trainer.val_check_interval=3",
                                "callbacks.neuron_resampler=null",
                                "model.b_dec_init=zeros", "final_eval_lr_windows=4", "data.lr_windows=2",
                                "trainer.limit_val_batches=1", "model.dead_window_tokens=64"], tmp_path)
    run_training(cfg)
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert final["n_tokens"] == 128
    assert any("128 activations, fewer than eval_min_tokens=65,536" in w for w in final["eval_warnings"])
    assert any("spliced tokens" in w for w in final["eval_warnings"])  # 4 windows of 31 tokens


# -- modes of what is written -----------------------------------------------------------------------------
def test_written_files_and_folders_get_the_usual_modes(tmp_path):
    """tempfile makes 0600 files and 0700 folders; renamed into place, metrics.json and the export and token
    store folders kept those modes, unreadable to the other users of a shared machine."""
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "export") as d:
            (d / "x").write_text("y")
        assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "export" / "x").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert usual_mode() == 0o600 and usual_mode(directory=True) == 0o700  # a private umask is respected
        write_json_atomic(tmp_path / "p.json", {})
        assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


# -- numerical guards -------------------------------------------------------------------------------------
class _Poisoned(torch.utils.data.IterableDataset):
    """The real training stream with batch ``bad`` (counting from 0) set to NaN."""

    def __init__(self, stream, bad: int) -> None:
        self.stream, self.bad = stream, bad

    def __iter__(self):
        for i, x in enumerate(self.stream, start=self.stream.skip_batches):
            yield x.fill_(float("nan")) if i == self.bad else x


class _PoisonedData(ActivationDataModule):
    def __init__(self, bad: int, **kw) -> None:
        super().__init__(**kw)
        self.bad = bad

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Poisoned(self.stream("train", skip_batches=self._resume_batches),
                                                     self.bad), batch_size=None)


def _fit(shards, root, nonfinite="stop", bad=3, max_steps=6, ckpt_path=None, callbacks=(), d_sae=32):
    torch.manual_seed(0)
    module = SAEModule(d_sae=d_sae, l1_coeff=0.01, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), d_in=64,
                       b_dec_init="zeros", dead_window_tokens=64, nonfinite=nonfinite)
    dm = _PoisonedData(bad, shards=str(shards), batch_size=32, buffer_tokens=128, lr_windows=0, seed=3)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True,
                                                                       every_n_train_steps=2), *callbacks])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


def test_a_nan_loss_stops_the_run_naming_the_step_the_batch_and_the_last_checkpoint(tiny_shards, tmp_path):
    with pytest.raises(NonFiniteError) as err:
        _fit(tiny_shards, tmp_path, bad=3)
    msg = str(err.value)
    assert msg.startswith("step 3: the loss is nan on training batch 3 (pass 0, chunk 0 of [shard-000000.tar], "
                          "batch 3 in it)")
    assert "last checkpoint: " in msg and msg.split("last checkpoint: ")[1].startswith(str(tmp_path))
    ckpt = torch.load(msg.split("last checkpoint: ")[1].split(". ")[0], weights_only=True)
    assert ckpt["global_step"] == 2  # written before the bad batch, and loadable
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_skipping_counts_the_batch_and_a_resume_starts_after_it(tiny_shards, tmp_path):
    """nonfinite=skip: the NaN batch makes no step and is counted; the stream position counts it too, so a run
    stopped after the skip and resumed trains on the batches the uninterrupted run trained on."""
    straight, _ = _fit(tiny_shards, tmp_path / "a", nonfinite="skip", bad=1, max_steps=6)
    # 6 steps, one of them the skipped batch: it moved no parameter and no counter
    assert int(straight.nonfinite_skipped) == 1 and int(straight.tokens_seen) == 5 * 32

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= 3:
                trainer.should_stop = True

    _fit(tiny_shards, tmp_path / "b", nonfinite="skip", bad=1, max_steps=6, callbacks=[Stop()])
    resumed, _ = _fit(tiny_shards, tmp_path / "b", nonfinite="skip", bad=1, max_steps=6,
                      ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert int(resumed.nonfinite_skipped) == 1
    for name, p in straight.sae.named_parameters():
        torch.testing.assert_close(resumed.sae.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_a_sweep_skipping_a_batch_for_one_sae_leaves_the_others_counters(tiny_shards, tmp_path):
    """One stream, one optimizer step: a batch whose loss is NaN for the second SAE is skipped for both, and
    the first SAE's counters (tokens, firing, L0), already moved by its own finite loss, are put back."""
    from monosemantic.models.sae_sweep import SAESweepModule

    torch.manual_seed(0)
    members = [SAEModule(d_sae=32, l1_coeff=0.01, optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                         d_in=64, b_dec_init="zeros", dead_window_tokens=64, nonfinite="skip") for _ in range(2)]
    real, calls = members[1].train_loss, []

    def nan_on_batch_1(x):
        loss, logs = real(x)
        calls.append(1)
        if len(calls) == 3:  # the third batch, after the first SAE's own (finite) loss moved its counters
            loss = loss * float("nan")
            members[1]._loss_finite = False
            return loss, {}
        return loss, logs

    members[1].train_loss = nan_on_batch_1
    sweep = SAESweepModule(members, ["a", "b"])
    dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, buffer_tokens=128, lr_windows=0, seed=3)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    trainer.fit(sweep, datamodule=dm)
    assert int(sweep.nonfinite_skipped) == 1
    # 5 batches drawn, one skipped: 4 counted by the first SAE (5 without the restore)
    assert int(members[0].tokens_seen) == 4 * 32
    assert int(members[0].window_tokens) == 4 * 32


def test_a_parameter_made_non_finite_stops_the_run(tiny_shards, tmp_path):
    class Corrupt(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                pl_module.sae.W_dec.grad[5, 0] = float("inf")

    with pytest.raises(NonFiniteError, match=r"step 2: after the optimizer step on training batch 2 .*W_dec has "
                                             r"\d+ non-finite entries. Last checkpoint: "):
        _fit(tiny_shards, tmp_path, bad=99, callbacks=[Corrupt()])


def test_float16_overflow_when_caching_is_reported_not_written(transformer_export, tmp_path):
    """|x| > 65,504 cast to float16 is inf: the cache stops naming the shard and the contexts, and no shard
    holding inf is ever given its final name."""
    hot = tmp_path / "hot_model"
    shutil.copytree(transformer_export, hot)
    weights = load_file(hot / "model.safetensors")
    w_in = "blocks.0.mlp.fc_in.weight"
    weights[w_in] = weights[w_in] * 1e7
    save_file(weights, hot / "model.safetensors")
    out = tmp_path / "cache"
    with pytest.raises(NonFiniteError, match=r"shard 0 \(shard-000000.tar\), contexts 0–15 .*exceed float16's "
                                             r"largest value \(65,504\)"):
        write_activation_cache(hot, out, TINY, progress=False)
    assert not list(out.glob("shard-*.tar")) and not (out / "manifest.json").exists()
    ok = write_activation_cache(hot, tmp_path / "cache32", CacheSettings(**{**vars(TINY), "dtype": "float32"}),
                                progress=False)
    assert np.isfinite(read_manifest(ok)["normalization"]["scale"])


# -- checkpoints and exports that are not what the run expects --------------------------------------------
def test_a_checkpoint_of_another_sae_is_refused_naming_both(tiny_shards, tmp_path):
    _fit(tiny_shards, tmp_path / "a", bad=99, max_steps=2)
    with pytest.raises(InputError, match=r"holds another SAE \(d_sae=32 there, 48 in this run\)"):
        _fit(tiny_shards, tmp_path / "b", bad=99, max_steps=4, ckpt_path=str(tmp_path / "a" / "last.ckpt"),
             d_sae=48)


def test_a_shard_set_of_another_width_than_the_resumed_sae_is_refused():
    module = SAEModule(d_sae=32, l1_coeff=0.01, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), d_in=64)
    saved = {"hyper_parameters": {**module.hparams, "d_in": 128}, "state_dict": module.state_dict()}
    with pytest.raises(InputError, match=r"holds another SAE \(d_in=128 there, 64 in this run\)"):
        module.on_load_checkpoint(saved)
    saved = {"hyper_parameters": {**module.hparams, "architecture": "topk", "k": 4}}
    with pytest.raises(InputError, match=r"architecture='topk' there, 'standard' in this run; k=4 there, None"):
        module.on_load_checkpoint(saved)


def test_a_checkpoint_from_before_a_buffer_existed_still_resumes(tiny_shards, tmp_path):
    _fit(tiny_shards, tmp_path / "a", bad=99, max_steps=2)
    ckpt = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    del ckpt["state_dict"]["nonfinite_skipped"]  # as an older version wrote it
    torch.save(ckpt, tmp_path / "old.ckpt")
    module, trainer = _fit(tiny_shards, tmp_path / "b", bad=99, max_steps=4, ckpt_path=str(tmp_path / "old.ckpt"))
    assert trainer.global_step == 4 and int(module.nonfinite_skipped) == 0


def test_a_checkpoint_missing_a_buffer_every_version_wrote_is_refused_by_name(tmp_path):
    """Only buffers added in later versions may be missing; one the first version already wrote, or a
    parameter, means the file is damaged, and nothing is filled in for it."""
    module = SAEModule(d_sae=32, l1_coeff=0.01, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), d_in=64)
    state = module.state_dict()
    del state["tokens_seen"], state["sae.W_dec"], state["last_l0"]
    saved = {"hyper_parameters": dict(module.hparams), "state_dict": state}
    with pytest.raises(InputError, match=r"has no tokens_seen, sae.W_dec: it is damaged or not a checkpoint"):
        module.on_load_checkpoint(saved)
    assert "tokens_seen" not in state


def test_a_malformed_export_cfg_is_named(sae_export, tmp_path):
    bad = tmp_path / "export"
    shutil.copytree(sae_export, bad)
    (bad / "cfg.json").write_text('{"d_in": 64, "d_sae": ')
    with pytest.raises(InputError, match=r"cfg.json: not valid JSON"):
        load_sae(bad)
    (bad / "cfg.json").write_text(json.dumps({"d_in": 64, "d_sae": "96"}))
    with pytest.raises(InputError, match=r"'d_sae' must be a positive integer, got '96'"):
        load_sae(bad)


# -- a full disk ------------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_names_it_and_keeps_the_previous_one(tiny_shards, tmp_path, monkeypatch):
    from monosemantic.utils.checkpoint_io import AtomicCheckpointIO

    saves = []

    def write(self, checkpoint, f):
        saves.append(checkpoint["global_step"])
        if checkpoint["global_step"] >= 4:
            f.write(b"x" * 1000)  # part of it, then the disk is full
            _enospc()
        torch.save(checkpoint, f)

    monkeypatch.setattr(AtomicCheckpointIO, "_write", write)

    def fit():
        torch.manual_seed(0)
        module = SAEModule(d_sae=32, l1_coeff=0.01, optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                           d_in=64, b_dec_init="zeros", dead_window_tokens=64)
        dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, buffer_tokens=128, lr_windows=0, seed=3)
        trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, plugins=[AtomicCheckpointIO()],
                            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True,
                                                                           every_n_train_steps=2)])
        trainer.fit(module, datamodule=dm)

    with pytest.raises(DiskFullError, match=r"no space left on the device while writing the checkpoint "
                                            r"epoch=0-step=4.ckpt .*the previous version is intact"):
        fit()
    assert saves == [2, 2, 4]  # step 2 and last.ckpt, then step 4 failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no temp left
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2


def test_a_full_disk_inside_torch_save_is_a_disk_full_error(tmp_path, monkeypatch):
    """``torch.save`` into a buffered file reports ENOSPC as ``RuntimeError: ... unexpected pos``, the
    ``OSError`` only its context. Here the bytes go to /dev/full, a real device that is always full."""
    import contextlib

    from monosemantic.utils.checkpoint_io import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(4)}, tmp_path / "last.ckpt")

    def write(self, checkpoint, f):
        full = open("/dev/full", "wb")  # noqa: SIM115 -- closed below, its own ENOSPC swallowed
        try:
            torch.save(checkpoint, full)
        finally:
            with contextlib.suppress(OSError):
                full.close()

    monkeypatch.setattr(AtomicCheckpointIO, "_write", write)
    with pytest.raises(DiskFullError, match=r"while writing the checkpoint last.ckpt .*previous version") as ei:
        io_.save_checkpoint({"global_step": 2, "w": torch.zeros(1_000_000)}, tmp_path / "last.ckpt")
    assert isinstance(ei.value.__cause__, RuntimeError)  # what torch.save raised
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1


def test_a_full_disk_during_an_export_names_it_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import monosemantic.export as export_mod
    from monosemantic.models.components.sae import SparseAutoencoder

    sae = SparseAutoencoder(8, 16)
    out = export_mod.export_sae(sae, tmp_path / "export", 1.0, "blocks.0.mlp.hook_post", 16)
    before = _snapshot(out)
    monkeypatch.setattr(export_mod, "save_file", _enospc)
    with pytest.raises(DiskFullError, match=r"while writing the folder export .*previous version is intact"):
        export_mod.export_sae(sae, out, 2.0, "blocks.0.mlp.hook_post", 16)
    assert _snapshot(out) == before and load_sae(out)[1]["d_sae"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the half-written folder is gone


# -- a corpus file that is not text -----------------------------------------------------------------------
def test_a_corpus_file_that_is_not_text_is_named(tmp_path):
    from monosemantic.data.corpus import Corpus, CorpusConfig, CorpusError

    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(Path(os.__file__), docs / "a.txt")  # real text (the stdlib's os.py)
    Corpus(CorpusConfig(kind="files", data_files=str(docs / "*.txt")), tmp_path)  # fine
    (docs / "b.txt").write_bytes(Path(sys.executable).read_bytes()[:4096])  # an ELF binary, renamed
    with pytest.raises(CorpusError, match=r"b.txt is not text: a NUL byte at offset \d+"):
        Corpus(CorpusConfig(kind="files", data_files=str(docs / "*.txt")), tmp_path)
    (docs / "b.txt").write_bytes(Path(os.__file__).read_text()[:500].replace("e", "é").encode("latin-1"))
    with pytest.raises(CorpusError, match=r"b.txt is not UTF-8 text: byte \d+ \(b'\\xe9'\)"):
        Corpus(CorpusConfig(kind="files", data_files=str(docs / "*.txt")), tmp_path)
    assert not [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]  # no half-gathered corpus left


def test_compressed_corpus_files_are_checked_decompressed_or_left_to_datasets(tmp_path):
    """``datasets`` reads ``.jsonl.gz`` and ``.zst`` itself: the text check looks inside a gzip file (a real
    one passes, a compressed binary is named) and does not refuse a compressed format it cannot open."""
    import gzip

    from monosemantic.data.corpus import Corpus, CorpusConfig, CorpusError

    docs = tmp_path / "docs"
    docs.mkdir()
    lines = [json.dumps({"text": line}) for line in Path(os.__file__).read_text().splitlines()[:200]]
    with gzip.open(docs / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    (docs / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)))  # zstd magic + binary
    Corpus(CorpusConfig(kind="files", builder="json", data_files=str(docs / "*")), tmp_path)  # fine
    with gzip.open(docs / "c.jsonl.gz", "wb") as f:
        f.write(b'{"text": "ok"}\n\0\0')
    with pytest.raises(CorpusError, match=r"c.jsonl.gz is not text: a NUL byte at offset 15"):
        Corpus(CorpusConfig(kind="files", builder="json", data_files=str(docs / "*")), tmp_path)


# -- a token store the transformer was not trained on -----------------------------------------------------
def test_a_token_store_of_another_tokenizer_is_refused(transformer_export, tmp_path):
    """Same vocabulary size, other tokens (a tokenizer trained on other text), or another size: caching, the
    on-the-fly source and the reading commands all refuse the pair before a forward, naming both."""
    from monosemantic.data.corpus import CorpusConfig
    from monosemantic.data.onthefly import OnTheFlyDataModule
    from monosemantic.data.token_store import build_token_store
    from monosemantic.data.tokenizer import TokenizerConfig

    for vocab, msg in ((512, "was tokenized with .*another tokenizer than the transformer's"),
                       (300, "has vocab_size=300 but the transformer .* has vocab_size=512")):
        store = build_token_store(CorpusConfig(kind="python_stdlib", max_bytes=120_000),
                                  TokenizerConfig(kind="bpe", vocab_size=vocab), tmp_path / f"data{vocab}",
                                  val_fraction=0.1)
        model = tmp_path / f"model{vocab}"
        shutil.copytree(transformer_export, model)
        config = json.loads((model / "config.json").read_text())
        config["token_store"] = str(store)
        (model / "config.json").write_text(json.dumps(config))
        with pytest.raises(InputError, match=msg):
            write_activation_cache(model, tmp_path / f"cache{vocab}", TINY, progress=False)
        assert not list((tmp_path / f"cache{vocab}").glob("shard-*"))
        with pytest.raises(InputError, match=msg):
            OnTheFlyDataModule(model_dir=str(model), n_contexts=16, tokens_per_context=8, contexts_per_block=8,
                               batch_size=32, buffer_tokens=64, lr_windows=0, device="cpu").setup()


def test_a_full_disk_while_caching_names_it_and_keeps_the_complete_shards(transformer_export, tmp_path, monkeypatch):
    import monosemantic.data.shards.writer as sw

    real_write, out = os.write, tmp_path / "cache"

    def write(fd, data):
        if list(out.glob("shard-*.tar")):  # once one shard is complete (however many writes it took), full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(sw.os, "write", write)
    with pytest.raises(DiskFullError, match=r"while writing shard set cache .*GB free there now.*previous version"):
        write_activation_cache(transformer_export, out, TINY, progress=False, max_pending=1)
    complete = sorted(p.name for p in out.glob("shard-*.tar"))
    assert complete and not list(out.glob("*.tar.tmp")) and not (out / "manifest.json").exists()
    monkeypatch.undo()
    write_activation_cache(transformer_export, out, TINY, progress=False)  # resumes after them
    assert len(read_manifest(out)["shards"]) == 6


# -- the random state on resume -----------------------------------------------------------------------------
class _Draws(L.LightningModule):
    """Each step draws from torch's, numpy's and Python's global generators, as a stochastic component would."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.draws: dict[int, tuple] = {}

    def training_step(self, batch, batch_idx):
        self.draws[self.global_step] = (torch.rand(3).tolist(), np.random.rand(3).tolist(),
                                        [random.random() for _ in range(3)])
        return (self.w * batch[0]).sum() ** 2

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(64, 2)), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("restore", [True, False])
def test_a_resumed_run_draws_the_uninterrupted_runs_random_numbers(tmp_path, restore):
    """With ``callbacks.rng_state`` (in every default config) the steps after a resume draw what the
    uninterrupted run drew; without it (Lightning alone) they do not, which is what the callback is for."""
    from monosemantic.callbacks.rng import RNGState
    from monosemantic.utils.checkpoint_io import AtomicCheckpointIO

    def fit(max_steps, ckpt_path=None):
        L.seed_everything(0)
        ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
        module = _Draws()
        L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                  callbacks=[ckpt] + ([RNGState()] if restore else [])).fit(module, ckpt_path=ckpt_path)
        return module.draws

    whole = fit(6)
    torch.rand(5), np.random.rand(5), random.random()  # the new process's generators are elsewhere
    for p in tmp_path.glob("*.ckpt"):
        p.unlink()
    fit(2)  # killed after its checkpoint at step 2
    assert ("rng_states" in torch.load(tmp_path / "last.ckpt", weights_only=True)) == restore  # weights_only
    resumed = fit(6, ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(resumed) == [2, 3, 4, 5]
    assert all((resumed[s] == whole[s]) == restore for s in resumed)


def test_the_default_callbacks_save_the_random_state(tmp_path):
    for experiment in ("sae_4096", "transformer_1l", "sae_topk"):
        cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
        assert cfg.callbacks.rng_state._target_ == "monosemantic.callbacks.rng.RNGState", experiment
