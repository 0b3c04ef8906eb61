"""Matching features across SAEs (feature splitting, universality): the streaming correlation against a direct
computation, and the stage end to end on SAEs whose answer is known by construction: a larger SAE made of
copies and near-copies of a smaller one's features, and a second transformer that is the first with its MLP
neurons permuted (the same function in another basis)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_cfg
from test_dashboard import browser_bin, headless  # noqa: F401  (the fixture, and how to call chromium)

from monosemantic.analysis.matching import CrossCorrelation, best_matches, children, decoder_cosine
from monosemantic.errors import ConfigError, InputError
from monosemantic.export import export_sae, load_sae
from monosemantic.stages import compare


def _pearson(a, b):
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    denom = a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :]
    return torch.where(denom > 0, (a.T @ b) / denom.clamp_min(1e-300), 0.0)


@pytest.mark.parametrize("density_a,density_b", [(0.02, 0.03), (0.02, 0.5), (0.5, 0.02), (0.5, 0.6)])
def test_cross_correlation_equals_pearson_over_all_batches(density_a, density_b):
    g = torch.Generator().manual_seed(0)

    def units(n, u, p):
        return torch.rand(n, u, generator=g) * (torch.rand(n, u, generator=g) < p)

    a, b = units(3000, 40, density_a), units(3000, 30, density_b)
    b[:, 0] = a[:, 3] * 2 + 0.1 * (a[:, 3] > 0)  # one strongly related pair
    a[:, 5] = 0  # a silent unit: correlation 0, not NaN
    cc = CrossCorrelation(40, 30)
    for lo in range(0, 3000, 700):  # batches of unequal size
        cc.update(a[lo:lo + 700], b[lo:lo + 700])
    got = cc.result()
    torch.testing.assert_close(got.double(), _pearson(a, b), atol=1e-5, rtol=0)
    assert got[3, 0] > 0.95 and (got[5] == 0).all()
    with pytest.raises(ValueError, match="same N tokens"):
        cc.update(a[:10], b[:11])


def test_children_count_each_larger_feature_once_toward_its_nearest():
    small = torch.eye(4)
    large = torch.stack([torch.tensor([1.0, 0.1, 0, 0]), torch.tensor([1.0, -0.1, 0, 0]),  # two from feature 0
                         torch.tensor([0, 0, 1.0, 0]),                                      # one from feature 2
                         torch.tensor([0.5, 0.5, 0.5, 0.5])])                               # near none (0.5)
    cos = decoder_cosine(small, large)
    assert children(cos, 0.7).tolist() == [2, 0, 1, 0]
    values, idx = best_matches(cos, 2)
    assert idx[2, 0] == 2 and values[2, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different spaces"):
        decoder_cosine(small, torch.ones(3, 5))


@pytest.fixture(scope="module")
def split_series(sae_export, tmp_path_factory):
    """The fixture SAE (96 features: 64 neurons + 32 random directions) and a 160-feature SAE made from it:
    features 0..31 twice (a copy and one rotated to cosine ~0.95), 32..95 once (copies), in shuffled order."""
    small, cfg = load_sae(sae_export)
    g = torch.Generator().manual_seed(1)
    rows, enc, bias, parent = [], [], [], []
    for f in range(96):
        d = small.W_dec[f]
        copies = [(d, small.W_enc[:, f])]  # fires exactly as feature f does
        if f < 32:
            noise = torch.randn(64, generator=g)
            noise -= (noise @ d) / d.norm() ** 2 * d
            twisted = d + 0.33 * noise / noise.norm() * d.norm()
            twisted = twisted / twisted.norm() * d.norm()
            copies.append((twisted, twisted))  # reads and writes its own direction, at cosine ~0.95 to d
        for row, col in copies:
            rows.append(row)
            enc.append(col)
            bias.append(small.b_enc[f])
            parent.append(f)
    perm = torch.randperm(len(rows), generator=g)
    from monosemantic.models.components.sae import SparseAutoencoder
    large = SparseAutoencoder(64, len(rows))
    with torch.no_grad():
        large.W_dec.copy_(torch.stack(rows)[perm])
        large.W_enc.copy_(torch.stack(enc, dim=1)[:, perm])
        large.b_enc.copy_(torch.stack(bias)[perm])
        large.b_dec.copy_(small.b_dec)
    out = tmp_path_factory.mktemp("large") / "run" / "export"
    export_sae(large, out, 1.0, "blocks.0.mlp.hook_post", 32, cfg["metadata"])
    return sae_export, out, torch.tensor(parent)[perm]


def test_splitting_finds_the_copies_and_the_splits(split_series, tmp_path):
    small, large, parent_G = split_series
    cfg = compose_cfg("compare", [f"saes=[{small},{large}]", "n_tokens=20000", "progress=false", "min_fires=5"],
                      tmp_path)
    result = compare.run(cfg)
    written = json.loads((tmp_path / "compare.json").read_text())
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    page = (tmp_path / "compare.html").read_text()
    assert "by decoder cosine" in page and page.count("<tr>") == 1 + len(written["pairs"][0]["features"])
    pair = written["pairs"][0]
    assert pair["same_transformer"] and result["pairs"][0]["children"]["mean"] == pair["children"]["mean"]
    assert len(pair["features"]) >= 30  # the features that fired ≥ 5 times on the tiny text
    for row in pair["features"]:
        f = row["feature"]
        kids = (parent_G == f).nonzero().flatten().tolist()
        assert row["children"] == len(kids)  # the copy and the near-copy both count (cosine ≥ 0.7)
        # nearest by decoder: its exact copy at cosine 1; by activation: a feature that fires identically
        assert row["by_cosine"][0][0] in kids and row["by_cosine"][0][1] == pytest.approx(1.0, abs=1e-5)
        assert row["by_correlation"][0][1] == pytest.approx(1.0, abs=1e-4)
        assert parent_G[row["by_correlation"][0][0]] == f
        assert row["label"] and row["by_cosine"][0][2] == row["label"]  # the copy reads as the same tokens
    alive = [r["feature"] for r in pair["features"]]
    assert pair["children"]["share_split"] == pytest.approx(sum(f < 32 for f in alive) / len(alive))
    assert pair["feature_best_cosine"]["median"] == pytest.approx(1.0, abs=1e-5)


def test_feature_ids_open_each_saes_browser(split_series, tmp_path):
    """With ``browsers=`` every id on the page links to that feature's page in its own SAE's browser (the
    browser's ``#features/<id>`` route), by a path relative to the page; a folder with no browser is named."""
    small, large, _ = split_series
    for name in ("dash_small", "dash_large"):
        (tmp_path / name / "browser").mkdir(parents=True)
        (tmp_path / name / "browser" / "index.html").write_text("<!doctype html>")
    out, browsers = tmp_path / "out", f"browsers=[{tmp_path / 'dash_small'},{tmp_path / 'dash_large'}]"
    compare.run(compose_cfg("compare", [f"saes=[{small},{large}]", "n_tokens=20000", "progress=false",
                                        "min_fires=5", browsers, f"output={out}"], tmp_path))
    page = (out / "compare.html").read_text()
    row = json.loads((out / "compare.json").read_text())["pairs"][0]["features"][0]
    assert f"<a href='../dash_small/browser/index.html#features/{row['feature']}'>#{row['feature']}</a>" in page
    g = row["by_cosine"][0][0]
    assert f"<a href='../dash_large/browser/index.html#features/{g}'>#{g}</a>" in page
    with pytest.raises(InputError, match=r"browsers: .*nowhere holds no feature browser"):
        compare.run(compose_cfg("compare", [f"saes=[{small},{large}]", f"browsers=[{tmp_path / 'nowhere'},null]"],
                                tmp_path))


@pytest.mark.slow
def test_comparison_page_renders_in_chromium(split_series, browser_bin, tmp_path):  # noqa: F811
    small, large, _ = split_series
    compare.run(compose_cfg("compare", [f"saes=[{small},{large}]", "n_tokens=20000", "progress=false",
                                        "min_fires=5"], tmp_path))
    n_rows = len(json.loads((tmp_path / "compare.json").read_text())["pairs"][0]["features"])
    dom = headless(browser_bin, (tmp_path / "compare.html").resolve().as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<tr>") == n_rows + 1 and "compare.png" in dom.stdout
    shot = tmp_path / "shot.png"
    r = headless(browser_bin, (tmp_path / "compare.html").resolve().as_uri(), f"--screenshot={shot}",
                 "--window-size=1200,900")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from matplotlib.image import imread
    img = imread(shot)[..., :3]
    assert img.std() > 0.05  # the figure and the table drew something


def test_universality_across_a_permuted_transformer(sae_export, transformer_export, tmp_path):
    """Transformer B is A with its MLP neurons permuted and SAE B is A's SAE in B's basis: every feature
    and every neuron has a partner that fires identically (correlation 1), though no neuron index matches."""
    from monosemantic.models.transformer_module import export_transformer, load_transformer
    net, net_cfg = load_transformer(transformer_export)
    d_mlp = net.cfg.d_mlp
    perm = torch.randperm(d_mlp, generator=torch.Generator().manual_seed(3))
    mlp = net.blocks[0].mlp
    with torch.no_grad():
        mlp.fc_in.weight.copy_(mlp.fc_in.weight[perm])
        mlp.fc_in.bias.copy_(mlp.fc_in.bias[perm])
        mlp.fc_out.weight.copy_(mlp.fc_out.weight[:, perm])
    b_dir = export_transformer(net, tmp_path / "models" / "b", transformer_export / "tokenizer.json",
                               {k: net_cfg[k] for k in ("token_store", "n_ctx")})
    sae, cfg = load_sae(sae_export)
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[perm])
        sae.W_dec.copy_(sae.W_dec[:, perm])
        sae.b_dec.copy_(sae.b_dec[perm])
    sae_b = export_sae(sae, tmp_path / "b_sae" / "export", 1.0, "blocks.0.mlp.hook_post", 32, cfg["metadata"])
    out = tmp_path / "out"
    cfg = compose_cfg("compare", [f"saes=[{sae_export},{sae_b}]", f"transformers=[{transformer_export},{b_dir}]",
                                  "n_tokens=20000", "progress=false", "min_fires=5"], out)
    compare.run(cfg)
    pair = json.loads((out / "compare.json").read_text())["pairs"][0]
    assert not pair["same_transformer"] and "by_cosine" not in pair["features"][0]
    assert pair["feature_best_correlation"]["median"] == pytest.approx(1.0, abs=1e-4)
    assert pair["neuron_best_correlation"]["median"] == pytest.approx(1.0, abs=1e-4)
    assert all(r["by_correlation"][0][0] == r["feature"] for r in pair["features"])  # features keep their index


def test_bad_requests_are_named(sae_export, tmp_path):
    with pytest.raises(ConfigError, match="at least two"):
        compare.run(compose_cfg("compare", [f"saes=[{sae_export}]"], tmp_path))
    with pytest.raises(ConfigError, match="transformers names 3 entries for 2 SAEs"):
        compare.run(compose_cfg("compare", [f"saes=[{sae_export},{sae_export}]", "transformers=[a,b,c]"], tmp_path))
    with pytest.raises(ConfigError, match="pairs='ring'"):
        compare.pairs_of("ring", 3)
    assert compare.pairs_of("all", 3) == [(0, 1), (0, 2), (1, 2)] and compare.pairs_of("first", 3) == [(0, 1), (0, 2)]


def test_shuffled_control_keeps_each_matrix_s_weights_but_not_their_places(transformer_export, tmp_path):
    from monosemantic.models.transformer_module import export_shuffled, load_transformer
    net, _ = load_transformer(transformer_export)
    out = export_shuffled(transformer_export, tmp_path / "shuffled", seed=0)
    ctrl, cfg = load_transformer(out)
    assert cfg["control"] == {"shuffled_from": str(transformer_export), "seed": 0} and "val_loss" not in cfg
    assert (out / "tokenizer.json").read_bytes() == (transformer_export / "tokenizer.json").read_bytes()
    moved = 0
    for (name, p), q in zip(net.named_parameters(), ctrl.parameters()):
        assert torch.equal(p.flatten().sort().values, q.flatten().sort().values), name  # same multiset
        moved += int((p != q).sum())
    assert moved > 0.9 * sum(p.numel() for p in net.parameters() if p.unique().numel() > 1)
    tokens = torch.randint(0, net.cfg.vocab_size, (2, 8))
    assert not torch.allclose(net(tokens), ctrl(tokens))
    assert export_shuffled(transformer_export, tmp_path / "again", seed=0) and torch.equal(
        load_transformer(tmp_path / "again")[0].blocks[0].mlp.fc_in.weight, ctrl.blocks[0].mlp.fc_in.weight)
