"""SAELens-layout export: folding the normalisation leaves outputs unchanged (in raw units), the files
hold exactly what SAELens expects, and the loader is strict."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from monosemantic.export import export_sae, load_sae
from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.utils.io import write_json_atomic

D_IN, D_SAE, SCALE = 16, 64, 0.37


@pytest.fixture
def sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(D_IN, D_SAE)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3)
        sae.b_dec.normal_()
    return sae


def _export(sae: SparseAutoencoder, out_dir, **kwargs):
    return export_sae(sae, out_dir, norm_scale=SCALE, hook_name="blocks.0.mlp.hook_post", context_size=250,
                      extra_metadata={"l1_coefficient": 0.004}, **kwargs)


def test_folded_export_reproduces_trained_sae_on_raw_inputs(sae: SparseAutoencoder, tmp_path) -> None:
    out = _export(sae, tmp_path / "export", log10_density=torch.linspace(-10, 0, D_SAE))
    loaded, cfg = load_sae(out)
    x_raw_NM = torch.rand(32, D_IN) * 5
    with torch.no_grad():
        trained = sae(SCALE * x_raw_NM)
        exported = loaded(x_raw_NM)
    torch.testing.assert_close(exported.x_hat, trained.x_hat / SCALE, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported.feats, trained.feats / SCALE, atol=1e-5, rtol=1e-5)
    assert (trained.feats > 0).any()  # the comparison is not vacuous
    torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE


def test_files_follow_sae_lens_layout(sae: SparseAutoencoder, tmp_path) -> None:
    out = _export(sae, tmp_path / "export", log10_density=torch.full((D_SAE,), -3.0))
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors",
                                                     "sparsity.safetensors"]
    with safe_open(out / "sae_weights.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == ["W_dec", "W_enc", "b_dec", "b_enc"]
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    assert shapes == {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    sparsity = load_file(out / "sparsity.safetensors")
    assert list(sparsity) == ["sparsity"] and torch.all(sparsity["sparsity"] == -3.0)

    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == "6.0.0" and meta["hook_name"] == "blocks.0.mlp.hook_post"
    assert meta["context_size"] == 250 and meta["prepend_bos"] is False
    assert meta["model_name"] == "monosemantic-1l" and meta["l1_coefficient"] == 0.004
    assert meta["activation_norm_scale_folded"] == pytest.approx(SCALE)


def test_export_without_sparsity_and_overwrite(sae: SparseAutoencoder, tmp_path) -> None:
    out = _export(sae, tmp_path / "export", log10_density=torch.zeros(D_SAE))
    out = _export(sae, tmp_path / "export")  # replaces the previous export as a whole
    assert not (out / "sparsity.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folders left


def test_failed_export_leaves_nothing(sae: SparseAutoencoder, tmp_path) -> None:
    with pytest.raises(ValueError, match="norm_scale"):
        export_sae(sae, tmp_path / "export", norm_scale=0.0, hook_name="h", context_size=1)
    with pytest.raises(ValueError, match="log10_density"):
        _export(sae, tmp_path / "export", log10_density=torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_load_rejects_missing_tensor(sae: SparseAutoencoder, tmp_path) -> None:
    out = _export(sae, tmp_path / "export")
    weights = out / "sae_weights.safetensors"
    tensors = load_file(weights)
    del tensors["b_dec"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="sae_weights.safetensors") as exc:
        load_sae(out)
    assert "b_dec" in str(exc.value)


def test_load_rejects_wrong_shape_and_missing_files(sae: SparseAutoencoder, tmp_path) -> None:
    out = _export(sae, tmp_path / "export")
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["d_sae"] = D_SAE * 2
    write_json_atomic(out / "cfg.json", cfg)
    with pytest.raises(ValueError, match="W_enc.*shape"):
        load_sae(out)
    (out / "cfg.json").unlink()
    with pytest.raises(ValueError, match="cfg.json"):
        load_sae(out)


def test_write_json_atomic(tmp_path) -> None:
    path = tmp_path / "sub" / "m.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
