"""Shared fixtures: a tiny real corpus (the Python stdlib's own source), its token store, a tiny trained
transformer export and a tiny activation cache — all built once per session under a temp dir."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# never touch the network or a W&B account from tests
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
# measured sparse-step crossovers (models/components/sparse_step.py): one file per test session, not ~/.cache
os.environ["MONOSEMANTIC_STEP_COSTS"] = os.path.join(tempfile.mkdtemp(prefix="step_costs-"), "step_costs.json")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)

# tests/interop need the field's libraries, installed only in the interop environment (make test-interop)
collect_ignore = [] if importlib.util.find_spec("sae_lens") else ["interop"]

TINY_CORPUS = {"kind": "python_stdlib", "max_bytes": 400_000}
TINY_TOKENIZER = {"kind": "bpe", "vocab_size": 512}
TINY_NET = {"n_ctx": 32, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64}


@pytest.fixture
def resident_bytes():
    """``resident_bytes(path)``: how many of a file's bytes are in the page cache (util-linux ``fincore``)."""

    def measure(path: str | Path) -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip())

    return measure


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def token_store(data_root) -> Path:
    from monosemantic.data.corpus import CorpusConfig
    from monosemantic.data.token_store import build_token_store
    from monosemantic.data.tokenizer import TokenizerConfig

    return build_token_store(CorpusConfig(**TINY_CORPUS), TokenizerConfig(**TINY_TOKENIZER), data_root,
                             val_fraction=0.1)


@pytest.fixture(scope="session")
def transformer_export(token_store, data_root) -> Path:
    """A tiny transformer, trained for a few steps on the tiny store, exported like the real one."""
    import torch

    from monosemantic.data.token_datamodule import TokenDataModule
    from monosemantic.models.components.transformer import Transformer
    from monosemantic.models.transformer_module import export_transformer

    torch.manual_seed(0)
    dm = TokenDataModule(str(data_root), n_ctx=TINY_NET["n_ctx"], batch_size=16, store_dir=str(token_store))
    dm.setup()
    net = Transformer(vocab_size=dm.vocab_size, **TINY_NET)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for i, batch in enumerate(dm.train_dataloader()):
        loss = torch.nn.functional.cross_entropy(net(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 30:
            break
    return export_transformer(net, data_root / "models" / "tiny", dm.tokenizer_path,
                              {"token_store": str(token_store), "n_ctx": TINY_NET["n_ctx"]})


@pytest.fixture(scope="session")
def tiny_shards(transformer_export, data_root) -> Path:
    from monosemantic.activation_cache import CacheSettings, write_activation_cache

    settings = CacheSettings(n_contexts=96, tokens_per_context=8, contexts_per_shard=16, batch_size=16)
    return write_activation_cache(transformer_export, data_root / "activations" / "tiny", settings, progress=False)


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path, data_dir: Path | None = None):
    """Compose a config as the entry point would, with the run dirs pointed at temp folders.

    GlobalHydra stays initialised afterwards (as inside a real run), so stages may compose others.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3")
    cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
        del cfg.hydra
    return cfg


@pytest.fixture(scope="session")
def sae_export(tiny_shards, tmp_path_factory) -> Path:
    """An SAE on the tiny transformer's 64 neurons whose encoder rows are the neurons themselves and some
    random directions: features with known firing patterns, exported like a training run's."""
    import torch

    from monosemantic.export import export_sae
    from monosemantic.models.components.sae import SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(64, 96)
    with torch.no_grad():
        sae.W_dec[:64] = torch.eye(64)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.fill_(-0.05)
        sae.b_dec.zero_()
    out = tmp_path_factory.mktemp("sae") / "run" / "export"
    return export_sae(sae, out, 1.0, "blocks.0.mlp.hook_post", 32, {"dataset_path": str(tiny_shards)})
