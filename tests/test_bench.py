"""``make bench``'s table script: the tiled trained init keeps a trained SAE's sparsity per copy, the markdown
quotes the ratios it is given, and the child reports its own peak memory rather than its parent's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_table  # noqa: E402

from monosemantic.export import export_sae  # noqa: E402
from monosemantic.models.components.sae import SparseAutoencoder  # noqa: E402


def test_tiled_init_fires_each_trained_feature_in_every_copy(tmp_path):
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 32)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)  # a sparse SAE
    export = export_sae(sae, tmp_path / "export", 2.0, "blocks.0.mlp.hook_post", 8)
    state = bench_table.trained_init(export, 128, scale=2.0)
    tiled = SparseAutoencoder(16, 128)
    tiled.load_state_dict(state)
    x = torch.randn(512, 16)
    base = SparseAutoencoder(16, 32)
    base.load_state_dict(bench_table.trained_init(export, 32, scale=2.0))
    l0, l0_tiled = (float((m.encode(x) > 0).sum(1).float().mean()) for m in (base, tiled))
    assert 0 < l0 < 16
    assert l0_tiled == pytest.approx(4 * l0, rel=0.1)  # 4 copies, each firing with its original (± noise)
    torch.testing.assert_close(tiled.W_dec.norm(dim=1), torch.ones(128))
    torch.testing.assert_close(base.b_enc, sae.b_enc)  # the export folds the scale in; this takes it out
    # smaller: the first features, firing exactly as they do in the whole SAE
    part = SparseAutoencoder(16, 8)
    part.load_state_dict(bench_table.trained_init(export, 8, scale=2.0))
    torch.testing.assert_close(part.encode(x), base.encode(x)[:, :8])
    with pytest.raises(SystemExit, match="neither a multiple nor a divisor"):
        bench_table.trained_init(export, 48, scale=2.0)


def test_markdown_quotes_the_ratios_against_the_dense_loop():
    step = [{"d_sae": 4096, "init": "fresh", "lightning_fp32": 5000.0, "lightning_bf16": 6000.0,
             "hand_rule_fp32": 5200.0, "hand_dense_fp32": 4000.0, "peak_rss_mb": 900.0},
            {"d_sae": 4096, "init": "trained", "init_l0": 18.3, "lightning_fp32": 30000.0, "lightning_bf16": 40000.0,
             "hand_rule_fp32": 35000.0, "peak_rss_mb": 950.0}]
    stage = {"demo stage": {"metrics": {"training_tokens": 6963200}, "train_s": 300.0, "tokens_per_s": 23210.7,
                            "peak_rss_mb": 1500.0, "rss_samples": [(1, 1000.0), (2, 1400.0), (3, 1450.0),
                                                                   (4, 1450.0)]}}
    stage["quarter stage, d_sae 32,768"] = {"metrics": {"training_tokens": 1740800, "d_sae": 32768}, "train_s": 800.0,
                                            "tokens_per_s": 2176.0, "peak_rss_mb": 5000.0, "rss_samples": []}
    step.append({"d_sae": 32768, "init": "fresh", "lightning_fp32": 300.0, "lightning_bf16": 600.0,
                 "hand_rule_fp32": 310.0, "hand_dense_fp32": 320.0, "peak_rss_mb": 4000.0})
    bounds = {"rows": [{"d_sae": 4096, "dtype": "fp32", "gflops": 125, "dense_bound": 10000.0,
                        "sparse_bound": 60000.0}]}
    compile_ = [{"d_sae": 4096, "dense_eager_s": 0.8, "dense_compiled_s": 0.6, "dense_compile_s": 20.0,
                 "sparse_eager_s": 0.2, "sparse_compiled_s": 0.25, "sparse_compile_s": 10.0},
                {"d_sae": 512, "dense_error": "BackendCompilerFailed: no compiler"}]
    saelens = {"version": "6.0", "rows": [{"d_sae": 4096, "tokens_per_s": 5000.0}]}
    md = bench_table.markdown({"machine": "m", "date": "d", "torch": "t", "threads": 2, "d_in": 512,
                               "batch": 4096, "step": step, "stage": stage, "bounds": bounds, "compile": compile_,
                               "saelens": saelens})
    # fresh: of the dense bound; trained: of the sparse bound; no bound measured at 32,768: a dash
    assert "| 4,096 | fresh | 5,000 | 6,000 | 5,200 | 4,000 | 1.5× | 0.50 (dense) | 900 |" in md
    assert "| 4,096 | trained (18) | 30,000 | 40,000 | 35,000 | 4,000 | 10.0× | 0.50 (sparse) | 950 |" in md
    assert "| 32,768 | fresh | 300 | 600 | 310 | 320 | 1.9× | — | 4,000 |" in md
    # each stage against the dense loop at its own size
    assert "| demo stage | 6,963,200 | 300 | 23,211 | 5.8× | 1,500 | 1,400 / 1,450 / 1,450 |" in md
    assert "| quarter stage, d_sae 32,768 | 1,740,800 | 800 | 2,176 | 6.8× | 5,000 | 5,000 / 5,000 / 5,000 |" in md
    # compile: the first call (20 s) less one compiled step (0.6 s), repaid at 0.2 s a step: 97 steps
    assert "| 4,096 | dense | 800 | 600 | 1.33 | 20 | 97 |" in md
    assert "| 4,096 | sparse | 200 | 250 | 0.80 | 10 | never |" in md
    assert "| 512 | dense | — | failed: BackendCompilerFailed: no compiler | — | — | — |" in md
    assert "| 4,096 | 5,000 | 5,000 | 1.0× | 30,000 | 6.0× | 40,000 | 8.0× |" in md
    skipped = bench_table.markdown({"machine": "m", "date": "d", "torch": "t", "threads": 2, "d_in": 512,
                                    "batch": 4096, "saelens": {"skipped": "no env"}})
    assert "SAELens's own step: not measured, no env." in skipped


def test_a_child_reports_its_own_peak_not_its_parents(tmp_path):
    """Linux carries a forking parent's ru_maxrss into the child across exec; VmHWM starts afresh."""
    ballast = bytearray(600 * 2**20)  # this process: > 600 MB resident
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    script = tmp_path / "small.py"
    script.write_text("x = 1\n")
    out = tmp_path / "peak.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_table.py"), "--run-script", str(out), str(script)],
                   check=True)
    assert 0 < json.loads(out.read_text())["peak_rss_mb"] < 300
    del ballast
