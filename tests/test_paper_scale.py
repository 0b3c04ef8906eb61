"""Paper scale on one GPU node (DESIGN §6): an SAE run fed on the fly builds only the transformer, the
pre-flight stops a run that cannot finish before anything is built, and scale=paper is the paper's recipe."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_NET, compose_cfg
from omegaconf import OmegaConf, open_dict

from monosemantic.stages import run_training
from monosemantic.stages.preflight import PreflightError

NET = [f"model.net.{k}={v}" for k, v in TINY_NET.items() if k != "n_ctx"]
TINY = ["experiment=sae_512", "scale.transformer.n_ctx=32", "scale.transformer.batch_size=8",
        "scale.transformer.max_steps=4", "scale.transformer.val_check_interval=2", "scale.transformer.val_windows=4",
        "scale.cache.tokens_per_context=8", "scale.cache.contexts_per_shard=16",
        "scale.sae.batch_size=64", "scale.sae.max_steps=3", "scale.sae.val_check_interval=3",
        "scale.sae.limit_val_batches=1", "scale.sae.lr_windows=2", "scale.sae.final_eval_lr_windows=2",
        "scale.sae.resample_steps=[]", "scale.sae.buffer_tokens=256", "scale.sae.val_tokens=128",
        "data.val_batch_size=64", "model.b_dec_init_tokens=64", "logger=csv"]
UPSTREAM = ["data.corpus.kind=python_stdlib", "data.corpus.max_bytes=300000", "data.tokenizer.vocab_size=512",
            "logger=csv", *NET]


def _cfg(over, out, data):
    cfg = compose_cfg("train", over, out, data)
    with open_dict(cfg):
        cfg.transformer_overrides = UPSTREAM
    return cfg


def _built(data):
    return {kind: sorted(p.name for p in (data / kind).iterdir() if not p.name.startswith("."))
            for kind in ("tokens", "models", "activations") if (data / kind).is_dir()}


def test_on_the_fly_sae_run_builds_the_transformer_and_no_cache(tmp_path):
    data = tmp_path / "data"
    run_training(_cfg([*TINY, "data=on_the_fly"], tmp_path / "run", data))
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert final["activation_source"] == "on_the_fly" and final["shards"].startswith("on-the-fly:")
    assert [(r["stage"], r["status"]) for r in final["stages"]] == [("token store", "built"), ("transformer", "built")]
    built = _built(data)
    assert len(built["tokens"]) == 1 and len(built["models"]) == 1 and "activations" not in built
    assert final["training_tokens"] == 3 * 64 and 0 < final["l0"] and "loss_recovered" in final
    assert final["n_tokens"] == 128  # the held-out activations: scale.sae.val_tokens, from held-out documents
    assert {ln["what"] for ln in final["preflight"]["lines"]} >= {"training tokens", "activations (on the fly)"}
    cfg_json = json.loads((tmp_path / "run" / "export" / "cfg.json").read_text())
    assert cfg_json["d_in"] == TINY_NET["d_mlp"] and cfg_json["metadata"]["activation_source"] == "on_the_fly"

    # eval regenerates the same held-out activations from the export alone; the dashboard finds its inputs
    from monosemantic.stages import eval as eval_stage
    from monosemantic.stages.inputs import load_inputs

    export = tmp_path / "run" / "export"
    again = eval_stage.run(compose_cfg("eval", [f"ckpt_path={export}", "lr_windows=2"], tmp_path / "eval", data))
    assert again["n_tokens"] == final["n_tokens"] and again["val_shards"] is None
    assert again["l0"] == pytest.approx(final["l0"], rel=1e-4)
    assert again["loss_recovered"] == pytest.approx(final["loss_recovered"], rel=1e-3, abs=1e-4)
    inputs = load_inputs(str(export), tmp_path)
    assert str(inputs.transformer_dir) == final["shards"].removeprefix("on-the-fly:")


@pytest.mark.parametrize("what, over, message", [
    ("sae", ["data=on_the_fly", "scale.sae.max_steps=100000"], "activations would repeat"),
    ("cache", ["scale.cache.n_contexts=1000000"], "asks for 1,000,000 contexts of 32 tokens"),
    ("transformer", ["data=on_the_fly", "scale.transformer.max_steps=100000"], "epochs of the"),
    ("positions", ["data=on_the_fly", "scale.cache.tokens_per_context=64"], "exceeds the transformer's n_ctx=32"),
])
def test_preflight_stops_before_anything_is_built(what, over, message, tmp_path):
    data = tmp_path / "data"
    with pytest.raises(PreflightError, match=message) as e:
        run_training(_cfg([*TINY, "scale.cache.n_contexts=96", *over], tmp_path / "run", data))
    assert "STOP" in str(e.value) and "needs" in str(e.value)  # the table with the numbers
    assert _built(data).get("tokens", []) == [] and _built(data).get("models", []) == []  # nothing tokenized
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_preflight_does_the_paper_cache_arithmetic(tmp_path):
    """scale=paper with the cache: 32.8M contexts × 250 activations is 8.7 TB, and the 48 GB Pile sample holds
    too few 1,024-token contexts: both stop the run before the transformer's 100B tokens are trained."""
    cfg = compose_cfg("train", ["experiment=sae_4096", "scale=paper", "data=sae_demo"], tmp_path, tmp_path / "d")
    with pytest.raises(PreflightError) as e:
        run_training(cfg)
    text = str(e.value)
    assert "8.7 TB" in text and "32.8M contexts of 1024 tokens" in text
    assert not (tmp_path / "d" / "tokens").exists()


def test_paper_scale_is_the_papers_recipe(tmp_path):
    cfg = compose_cfg("train", ["experiment=sae_4096", "scale=paper"], tmp_path)
    c = OmegaConf.to_container(cfg, resolve=True)
    assert c["data"]["_target_"].endswith("OnTheFlyDataModule")  # no 8.7 TB cache
    assert c["data"]["tokens_per_context"] == 250 and c["data"]["batch_size"] == 8192
    assert c["data"]["normalize"] is False and c["model"]["l1_coeff"] == 0.004  # λ on raw activations
    assert c["model"]["tied_init"] is False  # independent encoder / decoder init
    # a chunk is whole blocks of 1,024 contexts × 250 positions: 32 of them, 8.192M rows = 1,000 whole batches
    block = c["data"]["contexts_per_block"] * c["data"]["tokens_per_context"]
    assert -(-c["data"]["buffer_tokens"] // block) * block % c["data"]["batch_size"] == 0
    t = compose_cfg("train", ["experiment=transformer_1l", "scale=paper"], tmp_path)
    corpus = OmegaConf.to_container(t.data.corpus, resolve=True)
    assert corpus["kind"] == "hub" and corpus["streaming"] and corpus["max_bytes"] == 48_000_000_000
    demo = compose_cfg("train", ["experiment=sae_4096"], tmp_path)
    assert demo.data._target_.endswith(".ActivationDataModule") and demo.model.tied_init and demo.data.normalize
    shard = demo.scale.cache.contexts_per_shard * demo.scale.cache.tokens_per_context  # 2 shards, 64 batches
    assert -(-demo.data.buffer_tokens // shard) * shard % demo.data.batch_size == 0
