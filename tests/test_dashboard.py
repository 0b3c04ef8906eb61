"""The feature browser: the stage end to end on the tiny fixtures, the page in a real headless Chromium, the
on-the-fly top-k against a brute-force answer, and W&B tables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from monosemantic.analysis.collect import CollectSettings, UnitAccumulator
from monosemantic.analysis.topk import GroupTopK
from monosemantic.stages import dashboard


@pytest.fixture(scope="module")
def browser(sae_export, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dash")
    cfg = compose_cfg("dashboard", [f"ckpt_path={sae_export}", "n_tokens=20000", "collect.n_sample=16",
                                    "n_control=32", "progress=false"], out)
    return out, dashboard.run(cfg)


def test_dashboard_writes_a_browser_and_its_numbers(browser, sae_export):
    out, result = browser
    index = Path(result["index"])
    assert index.is_file() and index.parent == out / "browser"
    assert result["n_tokens"] == sum(result["tokens_by_split"].values()) and result["n_tokens"] <= 20000
    assert list(result["tokens_by_split"])[0] == "val"  # held-out text first
    written = json.loads((out / "dashboard.json").read_text())
    assert written["proxy_summary"]["features"]["n_units"] == 96
    assert written["proxy_summary"]["neurons"]["n_units"] == 64
    chunks = sorted(p.name for p in (out / "browser" / "data").iterdir())
    assert chunks == ["features-0000.js", "neurons-0000.js"]
    text = (out / "browser" / "data" / "features-0000.js").read_text()
    assert text.startswith('MSLoaded("features",0,[')
    pages = json.loads(text[len('MSLoaded("features",0,'):-2])
    assert len(pages) == 96 and all({"top", "logit_pos", "logit_neg", "quantiles"} <= set(p) for p in pages)


def test_feature_equal_to_a_neuron_has_that_neurons_examples(browser):
    """Features 0..63 are the neurons shifted by a small bias: their strongest examples are the neuron's."""
    out, _ = browser
    feats = json.loads((out / "browser" / "data" / "features-0000.js").read_text()[len('MSLoaded("features",0,'):-2])
    neurons = json.loads((out / "browser" / "data" / "neurons-0000.js").read_text()[len('MSLoaded("neurons",0,'):-2])
    compared = 0
    for j in range(0, 64, 7):
        if not neurons[j]["top"] or neurons[j]["top"][0][0] < 0.1:
            continue
        compared += 1
        f_top, n_top = feats[j]["top"][0], neurons[j]["top"][0]
        assert f_top[1] == n_top[1]  # same context tokens
        assert f_top[0] == pytest.approx(n_top[0] - 0.05, abs=2e-3)
        # its logit effect is the neuron's: the same promoted tokens
        assert [t for t, _ in feats[j]["logit_pos"]] == [t for t, _ in neurons[j]["logit_pos"]]
    assert compared >= 3


def test_group_topk_matches_a_full_sort():
    g = torch.Generator().manual_seed(3)
    state = GroupTopK(5, 4, {"tag": ((), torch.int64, -1)})
    groups, scores = [], []
    for _ in range(6):
        grp = torch.randint(0, 5, (50,), generator=g)
        sc = torch.rand(50, generator=g)
        tag = torch.arange(len(scores) * 50, len(scores) * 50 + 50)
        state.update(grp, sc, lambda m, tag=tag: {"tag": tag[m]})
        groups.append(grp)
        scores.append(sc)
    grp, sc = torch.cat(groups), torch.cat(scores)
    # a group that received fewer than k entries keeps -inf scores and the fill payload in its spare slots
    few = GroupTopK(3, 4, {"tag": ((), torch.int64, -1)})
    few.update(torch.tensor([1, 1, 2]), torch.tensor([0.5, 0.7, 0.1]), lambda m: {"tag": torch.tensor([10, 11, 12])[m]})
    assert few.filled.sum(1).tolist() == [0, 2, 1]
    assert few.payload["tag"][1].tolist() == [11, 10, -1, -1] and few.payload["tag"][0].tolist() == [-1] * 4
    for k in range(5):
        want = sc[grp == k].sort(descending=True)
        assert torch.equal(state.score[k], want.values[:4])
        assert torch.equal(state.payload["tag"][k], (grp == k).nonzero().flatten()[want.indices[:4]])


def test_accumulator_top_examples_and_contexts_are_exact():
    """The kept top activations, their locations and the unit's activation around them equal a brute force."""
    g = torch.Generator().manual_seed(0)
    T, V = 8, 11
    s = CollectSettings(n_top=3, n_sample=5, per_bin=1, ctx_before=2, ctx_after=1)
    acc = UnitAccumulator("u", 4, V, s, correlations=True)
    all_acts, all_tok = [], []
    for b in range(5):
        acts = torch.relu(torch.randn(4 * T, 4, generator=g))
        tok = torch.randint(0, V, (4 * T,), generator=g)
        acc.update(acts, tok, b * 4 * T + torch.arange(4 * T), T)
        all_acts.append(acts)
        all_tok.append(tok)
    acts, tok = torch.cat(all_acts), torch.cat(all_tok)
    r = acc.result()
    assert torch.equal(r.n_fires, (acts > 0).sum(0))
    assert torch.allclose(r.token_mass, torch.zeros(4, V).index_add_(1, tok, acts.T))
    assert r.hist.sum(1).tolist() == r.n_fires.tolist()
    for u in range(4):
        vals, locs = acts[:, u].topk(3)
        assert torch.equal(r.top_act[u], vals) and torch.equal(r.top_loc[u], locs)
        for slot, loc in enumerate(locs.tolist()):
            for j, off in enumerate(range(-2, 2)):
                p = loc % T + off
                want = acts[loc + off, u] if 0 <= p < T else 0.0
                assert float(r.top_ctx[u, slot, j]) == pytest.approx(float(want), abs=2e-3)
        # the sample is 5 distinct firings of this unit
        sample = r.sample_loc[u]
        assert len(set(sample.tolist())) == 5 and bool((acts[sample, u] > 0).all())
    # the per-bin examples are firings of that unit in that log10 bin
    from monosemantic.analysis.collect import activation_bin

    for u in range(4):
        for b in range(r.bin_loc.shape[1]):
            for slot, loc in enumerate(r.bin_loc[u, b].tolist()):
                if loc >= 0:
                    assert float(r.bin_act[u, b, slot]) == float(acts[loc, u])
                    assert int(activation_bin(acts[loc, u])) == b
    with pytest.raises(ValueError, match="collect.n_top"):
        UnitAccumulator("u", 4, V, CollectSettings(n_top=0))
    corr = r.correlation()
    assert torch.allclose(corr, torch.corrcoef(acts.T.double()).float(), atol=1e-5)


# ---- the page in a real browser (Debian's chromium) ----

def chromium() -> str | None:
    """Debian's chromium, installed by this test's setup when missing (root and apt-get needed)."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                       shell=True, capture_output=True, timeout=900)
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser_bin() -> str:
    path = chromium()
    if path is None:
        print("SKIPPED: Debian's chromium is not installed and cannot be installed here (needs root and apt-get)")
        pytest.skip("chromium cannot be installed here (needs root and apt-get)")
    return path


def headless(binary: str, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=8000", *args, url], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_browser_renders_in_chromium(browser, browser_bin, tmp_path):
    out, result = browser
    index = Path(result["index"]).resolve()
    table = json.loads(re.search(r"window\.MS=(.*?);</script>", index.read_text(), re.S).group(1))["tables"]
    live = {i for i, n in enumerate(table["features"]["n_fires"]) if n > 0}
    assert live, "the tiny SAE should have live features"

    dom = headless(browser_bin, index.as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    listed = {int(i) for i in re.findall(r'<tr data-unit="features" data-id="(\d+)"', dom.stdout)}
    assert listed == live  # every live feature, and dead ones hidden by default

    f = max(live, key=lambda i: table["features"]["n_fires"][i])
    page = headless(browser_bin, index.as_uri() + f"#features/{f}", "--dump-dom")
    assert f"Feature {f}" in page.stdout
    shaded = re.findall(r'class="tok[^"]*" style="background: rgba\(255, 130, 0, ([0-9.]+)\)', page.stdout)
    assert shaded and max(float(a) for a in shaded) == pytest.approx(1.0, abs=0.01)  # its max is shaded fully
    assert 'class="logit-table"' in page.stdout or "class=logit-table" in page.stdout
    assert page.stdout.count("<div class=\"ctx\">") + page.stdout.count("<div class=ctx>") >= 2

    shot = tmp_path / "shot.png"
    r = headless(browser_bin, index.as_uri() + f"#features/{f}", f"--screenshot={shot}", "--window-size=1200,900")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    colours = np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert img.std() > 0.05 and len(colours) > 20  # not blank: text, shading, table lines


def test_dashboard_logs_tables_to_wandb(sae_export, tmp_path):
    cfg = compose_cfg("dashboard", [f"ckpt_path={sae_export}", "n_tokens=4000", "collect.n_sample=8",
                                    "n_control=8", "progress=false", "correlations=false", "logger=wandb"], tmp_path)
    dashboard.run(cfg)
    from monosemantic.utils.hydra_utils import finish_wandb

    finish_wandb()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].glob("files/media/table/dashboard/*.table.json"))
    assert {p.name.split("_")[0] for p in tables} == {"features", "neurons"}
    feats = json.loads(next(p for p in tables if p.name.startswith("features")).read_text())
    assert len(feats["data"]) == 96 and feats["columns"][:3] == ["id", "label", "density"]
