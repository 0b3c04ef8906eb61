"""The field's tools on our exports (run in the interop environment: ``make test-interop``).

Each test compares what TransformerLens, SAELens, SAEDashboard or SAEBench compute with our own code on the
same tiny transformer, SAE and held-out text (fixtures in tests/conftest.py). Tolerances: logits and
activations are compared to 1e-4 absolute (fp32, different kernels: SDPA vs TransformerLens's einsums);
losses to 1e-5 relative; L0 exactly.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from monosemantic.data.token_store import load_split
from monosemantic.evaluation import splice_losses
from monosemantic.export import load_sae
from monosemantic.interop import saebench, saelens
from monosemantic.interop.tlens import to_hooked_transformer
from monosemantic.models.components import hooks
from monosemantic.models.components.transformer import MLP_HOOK
from monosemantic.models.transformer_module import HOOKED_DIR, load_transformer

ATOL = 1e-4


@pytest.fixture(scope="module")
def windows(transformer_export, token_store) -> torch.Tensor:
    """16 held-out windows of the tiny store, n_ctx tokens each."""
    _, meta = load_transformer(transformer_export)
    n_ctx = meta["model"]["n_ctx"]
    val = np.asarray(load_split(token_store, "val"), dtype=np.int64)
    return torch.as_tensor(val[: 16 * n_ctx].reshape(16, n_ctx))


@pytest.fixture(scope="module")
def hooked_sae_model(transformer_export):
    from sae_lens import HookedSAETransformer

    return to_hooked_transformer(transformer_export, cls=HookedSAETransformer)


def test_transformer_lens_logits_hooks_and_tokenizer_equal_ours(transformer_export, windows, tmp_path):
    from transformer_lens import HookedTransformer

    net, meta = load_transformer(transformer_export)
    model = to_hooked_transformer(transformer_export)
    assert isinstance(model, HookedTransformer)
    assert (transformer_export / HOOKED_DIR / "config.json").is_file()  # written beside our own form
    ours = net(windows)
    theirs = model(windows)
    assert ours.abs().max() > 1.0  # a trained model's logits, not zeros
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    _, cache = model.run_with_cache(windows, names_filter=[MLP_HOOK])
    torch.testing.assert_close(cache[MLP_HOOK], net.mlp_acts(windows), atol=ATOL, rtol=0)
    # our tokenizer, attached: the same ids as the token store's tokenizer, no BOS prepended
    from tokenizers import Tokenizer

    text = "def main(argv):\n    return 0\n"
    ids = Tokenizer.from_file(str(transformer_export / meta["tokenizer"])).encode(text).ids
    assert model.to_tokens(text)[0].tolist() == ids
    assert model.tokenizer.decode(ids) == text
    # an export from before the TransformerLens form: converted in memory, same logits
    old = tmp_path / "old"
    shutil.copytree(transformer_export, old)
    shutil.rmtree(old / HOOKED_DIR)
    torch.testing.assert_close(to_hooked_transformer(old)(windows), theirs, atol=1e-6, rtol=0)


def test_sae_lens_loads_our_export_and_reconstructs_as_we_do(sae_export, transformer_export, windows):
    sae = saelens.load_sae_lens(sae_export)
    ours, cfg = load_sae(sae_export)
    assert sae.cfg.metadata.hook_name == cfg["metadata"]["hook_name"] == MLP_HOOK
    net, _ = load_transformer(transformer_export)
    x = net.mlp_acts(windows)
    with torch.no_grad():
        mine = ours(x)
    assert (mine.feats > 0).any()
    torch.testing.assert_close(saelens.reconstruct(sae, x), mine.x_hat, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.encode(x), mine.feats, atol=1e-5, rtol=0)


def test_hooked_sae_transformer_spliced_loss_and_steering_equal_ours(sae_export, transformer_export, windows,
                                                                     hooked_sae_model):
    sae = saelens.load_sae_lens(sae_export)
    ours, _ = load_sae(sae_export)
    net, _ = load_transformer(transformer_export)
    ce_clean, ce_sae, _, _, n = splice_losses(net, windows, lambda a: ours(a).x_hat, hooks.zero_ablate())
    theirs = saelens.spliced_loss(hooked_sae_model, sae, windows)
    # the fixture's SAE reconstructs well, yet the splice moves the loss by more than the tolerance below
    assert abs(ce_sae - ce_clean) / ce_clean > 5e-5
    assert theirs == pytest.approx(ce_sae / n, rel=1e-5)
    # steering: feature 3 pinned to 4.0 from position 5 on, error term kept
    steered = saelens.steered_logits(hooked_sae_model, sae, 3, 4.0, 5, windows)
    with torch.no_grad():
        mine = net.forward_with_mlp_hook(windows, hooks.pin_features(ours, [3], [4.0], keep_error=True, start=5))
        clean = net(windows)
    assert (mine[:, 5:] - clean[:, 5:]).abs().max() > 0.1  # the edit moves the logits
    torch.testing.assert_close(mine[:, :5], clean[:, :5], atol=ATOL, rtol=0)
    torch.testing.assert_close(steered, mine, atol=ATOL, rtol=0)


def test_sae_dashboard_writes_feature_centric_html(sae_export, transformer_export, tmp_path):
    from monosemantic.interop.dashboard import render

    out = render(sae_export, transformer_export, [0, 1, 2], tmp_path / "dash.html", n_windows=32)
    html = out.read_text()
    assert html.lstrip().lower().startswith("<")
    # the page embeds its data as one JSON object (defineData): exactly the chosen features, with statistics
    start = html.index("return ", html.index("function defineData")) + len("return ")
    data, _ = json.JSONDecoder().raw_decode(html, start)
    assert sorted(data["DASHBOARD_DATA"]) == ["0", "1", "2"]
    assert len(data["AGGDATA"]["max"]) == 3 and max(data["AGGDATA"]["max"]) > 0


def test_sae_bench_core_matches_our_l0_ce_score_and_explained_variance(sae_export, transformer_export, windows,
                                                                       hooked_sae_model):
    sae = saelens.load_sae_lens(sae_export)
    theirs = saebench.run_core(sae, hooked_sae_model, windows.numpy(), batch_prompts=8)
    ours = saebench.our_metrics(sae_export, transformer_export, windows.numpy())
    assert theirs["sparsity/l0"] == pytest.approx(ours["l0"], abs=1e-4)
    assert theirs["model_performance_preservation/ce_loss_score"] == pytest.approx(ours["loss_recovered"], abs=1e-4)
    assert theirs["model_performance_preservation/ce_loss_without_sae"] == pytest.approx(ours["ce_clean"], rel=1e-5)
    # explained variance: the definitions differ (module docstring); SAEBench's is its own formula exactly
    net, _ = load_transformer(transformer_export)
    own, _ = load_sae(sae_export)
    with torch.no_grad():
        x = net.mlp_acts(windows).flatten(0, 1)
        x_hat = own(x).x_hat
        ev_ours = 1 - (x - x_hat).square().sum() / (x - x.mean(0)).square().sum()
        ev_sb = saebench.saebench_explained_variance(x, x_hat)  # equal batches: pooled = SAEBench's mean
    assert ours["explained_variance"] == pytest.approx(float(ev_ours), abs=1e-4)
    assert theirs["reconstruction_quality/explained_variance"] == pytest.approx(ev_sb, abs=1e-4)


@pytest.mark.parametrize("architecture,kw", [("topk", {"k": 8}), ("batchtopk", {"k": 8}), ("jumprelu", {}),
                                             ("matryoshka_batchtopk", {"k": 8, "widths": [16, 48]}),
                                             ("standard", {"pre_encoder_bias": False})])
def test_sae_lens_reconstructs_every_exported_architecture_as_we_do(architecture, kw, transformer_export, windows,
                                                                    tmp_path):
    """Each variant, with a non-trivial activation scale folded in, through SAELens's own class for it."""
    from monosemantic.export import export_sae
    from monosemantic.models.components.sae import build_sae

    torch.manual_seed(1)
    net, meta = load_transformer(transformer_export)
    d_in = meta["model"]["d_mlp"]
    sae = build_sae(d_in, 96, architecture, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        if architecture == "jumprelu":
            sae.log_threshold.fill_(float(np.log(0.05)))
        if architecture in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.05)  # exported as a JumpReLU with this threshold for every feature
    sae.eval()
    export = export_sae(sae, tmp_path / architecture, 2.5, MLP_HOOK, meta["model"]["n_ctx"])
    theirs = saelens.load_sae_lens(export)
    ours, _ = load_sae(export)
    x = net.mlp_acts(windows)
    with torch.no_grad():
        mine = ours(x)
        trained_space = sae(2.5 * x).x_hat / 2.5  # the SAE as trained, on normalised inputs
    assert (mine.feats > 0).any()
    torch.testing.assert_close(mine.x_hat, trained_space, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saelens.reconstruct(theirs, x), mine.x_hat, atol=1e-5, rtol=1e-5)


def test_our_matryoshka_loss_is_saelens_matryoshka_loss():
    """Our Matryoshka BatchTopK against SAELens's own training class on the same weights and batch: the same
    features, and the same reconstruction term up to units (SAELens sums the squared error over dimensions, we
    average it; both add the prefixes' MSEs to the whole dictionary's)."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    from monosemantic.models.components.sae import MatryoshkaSAE

    torch.manual_seed(0)
    ours = MatryoshkaSAE(16, 64, k=6, widths=[8, 24]).train()
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.3)
        ours.b_dec.normal_(0, 0.1)
    theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=16, d_sae=64, k=6, matryoshka_widths=[8, 24, 64], rescale_acts_by_decoder_norm=False))
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "threshold"}, strict=False)
    x = torch.randn(40, 16)
    out = theirs.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                      n_training_steps=0, is_logging_step=False))
    x_hat, f, _ = ours.forward_train(x)
    torch.testing.assert_close(out.feature_acts, f)
    assert set(out.losses) >= {"mse_loss", "inner_mse_loss_8", "inner_mse_loss_24"}
    mine = ours.recon_loss(x, x_hat, f)
    assert float(out.loss) == pytest.approx(float(mine) * 16, rel=1e-5)  # × d_in
    full = float(torch.nn.functional.mse_loss(x_hat, x))
    assert abs(float(mine) - full) > 0.05 * full  # the prefixes weigh in: not the plain MSE


def test_the_frontier_bench_trains_ours_and_saelens_side_by_side(tiny_shards, tmp_path):
    """bench/bench_saelens.py at a tiny size: our recipe through src/train.py and SAELens's StandardTrainingSAE
    through its own SAETrainer, saved at two budgets from one run, both scored by src/eval.py on the same shard."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "frontier"
    cmd = [sys.executable, "bench/bench_saelens.py", "--shards", str(tiny_shards), "--steps", "20", "40",
           "--ours-l1", "0.01", "--saelens-l1", "1.0", "--d-sae", "32", "--batch-size", "32", "--lr-windows", "2",
           "--out", str(out), "--saelens-python", sys.executable, "--ours-extra", "data.buffer_tokens=128",
           "model.b_dec_init_tokens=64", "final_eval_lr_windows=2", "data.lr_windows=2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "frontier.json").read_text())["rows"]
    assert sorted((row["library"].split()[0], row["steps"]) for row in rows) == [
        ("SAELens", 20), ("SAELens", 40), ("ours", 20), ("ours", 40)]
    for row in rows:
        assert 0 < row["l0"] <= 32 and np.isfinite(row["loss_recovered"]) and 0 <= row["dead_frac"] <= 1, row
        assert 0 <= row["train_dead_frac"] <= 1 and row["n_tokens"] > 0, row  # silent in training; held out
    # both libraries count "silent in training" over the same window of each budget (8% of its steps)
    assert {(r["steps"], r["dead_window_tokens"]) for r in rows} == {(20, round(0.08 * 20) * 32),
                                                                     (40, round(0.08 * 40) * 32)}
    saelens_cfg = json.loads((out / "saelens" / "l1_1" / "steps_40" / "cfg.json").read_text())
    assert saelens_cfg["d_sae"] == 32 and saelens_cfg.get("architecture", "standard") == "standard"
    assert (out / "frontier.png").stat().st_size > 10_000
    table = (out / "frontier.md").read_text()
    assert "| SAELens standard |" in table and "silent in training" in table and "held-out tokens" in table


def test_the_bench_table_times_saelenss_own_step(tiny_shards):
    """``make bench``'s saelens part at a tiny size: SAELens's SAETrainer step on our shards, one rate per size;
    the step really trains (its parameters move)."""
    import argparse
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_table

    res = bench_table.part_saelens(argparse.Namespace(shards=tiny_shards, batch=32, sizes=[16, 64], steps=3))
    assert [r["d_sae"] for r in res["rows"]] == [16, 64] and all(r["tokens_per_s"] > 0 for r in res["rows"])
    from monosemantic.data.activation_datamodule import ActivationDataModule

    dm = ActivationDataModule(shards=str(tiny_shards), batch_size=32, lr_windows=0)
    dm.setup()
    import sae_lens

    assert res["version"] == sae_lens.__version__
    rate, trained = bench_table._saelens_tokens_per_s(dm, 16, 32, 3)
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(0)  # the helper's init, untrained
    fresh = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=dm.d_in, d_sae=16, l1_coefficient=5.0,
                                                          dtype="float32", device="cpu"))
    assert rate > 0 and not torch.equal(trained.W_enc, fresh.W_enc)
    torch.testing.assert_close(trained.W_enc, fresh.W_enc, atol=0.05, rtol=0)  # 5 Adam steps of lr 3e-4 from it
