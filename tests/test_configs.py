"""Every config in every group composes and instantiates; instantiation fails loudly without _target_."""

from pathlib import Path

import hydra
import pytest
import torch
from conftest import CONFIGS, compose_cfg
from omegaconf import OmegaConf, open_dict

from monosemantic.errors import ConfigError
from monosemantic.utils.hydra_utils import instantiate_callbacks, instantiate_loggers


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_groups_exist():
    for group, needed in {
        "trainer": {"default", "cpu", "gpu", "ddp", "ddp_sim", "fsdp"},
        "logger": {"wandb", "csv", "tensorboard", "many"},
        "callbacks": {"default", "neuron_resampling", "checkpointing", "progress"},
        "experiment": {"transformer_1l", "sae_512", "sae_4096", "sae_16384", "sae_32768", "sae_65536", "sae_131072"},
        "scale": {"demo", "paper"}, "data": {"tokens", "activations"}, "model": {"transformer_1l", "sae"},
    }.items():
        assert needed <= set(options(group)), group


VARIANTS = {"sae_topk": "topk", "sae_batchtopk": "batchtopk", "sae_jumprelu": "jumprelu", "sae_april": "standard",
            "sae_target": "standard", "sae_ghost": "standard", "sae_matryoshka": "matryoshka_batchtopk"}


@pytest.mark.parametrize("scale", options("scale"))
@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_and_scale_resolve(experiment, scale, tmp_path):
    cfg = compose_cfg("train", [f"experiment={experiment}", f"scale={scale}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["trainer"]["max_steps"] > 0
    if experiment == "sae_sweep":  # a grid over the model config, one SAE per point
        assert resolved["stage"] == "sae" and resolved["saes"]["grid"]["d_sae"] == [1024, 4096]
    elif experiment in VARIANTS:  # a delta on sae_4096: its architecture, named by it and the size
        assert resolved["model"]["d_sae"] == 4096 and resolved["stage"] == "sae"
        assert resolved["task_name"] == f"{experiment}_4096"
        assert resolved["model"]["architecture"] == VARIANTS[experiment]
        with open_dict(cfg):
            cfg.model.d_in = 512
        module = hydra.utils.instantiate(cfg.model)  # the variant's settings are ones its SAE accepts
        assert module.sae.architecture == VARIANTS[experiment] and module.sae.d_sae == 4096
        if experiment == "sae_target":  # λ found for L0 20, and the run started there
            assert module.hparams.target_l0 == 20 and module.hparams.b_enc_init_l0 == 20
    elif experiment.startswith("sae_"):
        assert resolved["model"]["d_sae"] == int(experiment.split("_")[1])
        assert resolved["stage"] == "sae" and resolved["task_name"] == experiment


@pytest.mark.parametrize("option", options("data"))
def test_data_configs_instantiate(option, tmp_path):
    extra = ["data.corpus.data_files=x.txt"] if option == "local_files" else []
    exp = "sae_4096" if option == "activations" else "transformer_1l"
    cfg = compose_cfg("train", [f"experiment={exp}", f"data={option}", *extra], tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    assert type(dm).__name__.endswith("DataModule")


@pytest.mark.parametrize("option", options("model"))
def test_model_configs_instantiate(option, tmp_path):
    exp = "transformer_1l" if option == "transformer_1l" else "sae_4096"
    cfg = compose_cfg("train", [f"experiment={exp}"], tmp_path)
    with open_dict(cfg):
        if option == "sae":
            cfg.model.d_in = 512
        else:
            cfg.model.net.vocab_size = 100
    module = hydra.utils.instantiate(cfg.model)
    opt = module.optimizer_factory(params=[torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_instantiate(option, tmp_path):
    cfg = compose_cfg("train", ["experiment=sae_4096", f"callbacks={option}"], tmp_path)
    cbs = instantiate_callbacks(cfg.callbacks)
    assert len(cbs) == len([v for v in (cfg.callbacks or {}).values() if v is not None])


@pytest.mark.parametrize("option", options("logger"))
def test_loggers_instantiate(option, tmp_path):
    cfg = compose_cfg("train", [f"logger={option}"], tmp_path)
    loggers = instantiate_loggers(cfg.logger)
    assert len(loggers) == len(cfg.logger)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainers_instantiate(option, tmp_path):
    cfg = compose_cfg("train", [f"trainer={option}"], tmp_path)
    expected = {"ddp": "DDPStrategy", "ddp_sim": "DDPStrategy", "fsdp": "FSDPStrategy"}.get(option)
    if expected:
        strategy = hydra.utils.instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ == expected
    if option in ("ddp", "ddp_sim"):
        assert cfg.trainer.strategy.broadcast_buffers is False  # see configs/trainer/ddp.yaml
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        # no GPU here: build the same trainer on the CPU (FSDP needs CUDA: its strategy object was checked above)
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.devices = 2 if option == "ddp" else 1
            if option == "fsdp":
                del cfg.trainer.strategy
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps
    if option in ("ddp", "ddp_sim"):
        assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("option", options("debug") + options("hparams_search"))
def test_debug_and_search_compose(option, tmp_path):
    group = "debug" if option in options("debug") else "hparams_search"
    cfg = compose_cfg("train", ["experiment=sae_4096", f"{group}={option}"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", ["cache_activations", "eval", "frontier"])
def test_other_entry_configs_compose(name, tmp_path):
    cfg = compose_cfg(name, ["ckpt_path=x"] if name == "eval" else [], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)


def test_entry_without_target_fails_loudly(tmp_path):
    cfg = compose_cfg("train", ["+callbacks.broken.foo=1"], tmp_path)
    with pytest.raises(ValueError, match="broken.*_target_"):
        instantiate_callbacks(cfg.callbacks)


def test_every_yaml_is_reached():
    """No orphan config files: every YAML under configs/ belongs to a group tested above or an entry point."""
    tested = {"data", "model", "callbacks", "logger", "trainer", "experiment", "scale", "debug", "hparams_search",
              "paths", "extras", "hydra", "local"}
    for p in CONFIGS.rglob("*.yaml"):
        rel = p.relative_to(CONFIGS)
        assert len(rel.parts) == 1 or rel.parts[0] in tested, rel
    assert Path(CONFIGS / "train.yaml").is_file()


def test_readme_stage_overrides_parse_as_written():
    """Every `transformer_overrides=…` / `cache_overrides=…` the README shows parses in Hydra as a shell passes
    it, and each element is itself a valid override."""
    import re
    import shlex

    from conftest import ROOT
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    fenced = [ln for block in blocks for ln in block.replace("\\\n", " ").splitlines()]  # joined at `\`
    commands = fenced + re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)  # code blocks' lines and inline code
    found = 0
    for command in commands:
        if not re.search(r"(transformer|cache)_overrides=", command):
            continue
        for token in shlex.split(command):
            if re.match(r"(transformer|cache)_overrides=", token):
                value = parser.parse_override(token).value()
                assert isinstance(value, list) and value, token
                parser.parse_overrides([str(v) for v in value])
                found += 1
    assert found >= 1


def test_a_sweeper_gets_the_end_of_run_value_when_there_is_one():
    from monosemantic.utils.hydra_utils import metric_value

    assert metric_value({"val/loss_recovered": 0.5, "final/loss_recovered": 0.9}, "val/loss_recovered") == 0.9
    # a job shorter than its validation interval logged no val/ value: the final evaluation's still counts
    assert metric_value({"final/loss_recovered": 0.8}, "val/loss_recovered") == 0.8
    assert metric_value({"val/loss": torch.tensor(2.0)}, "val/loss") == 2.0
    assert metric_value({"final/objective": 0.7}, "final/objective") == 0.7
    assert metric_value({"val/mse": 1.0}, "val/loss_recovered") is None


def test_the_bounded_objective_is_fidelity_inside_the_bound_and_pays_for_each_doubling_past_it():
    from monosemantic.stages.sae import bounded_objective

    spec = {"fidelity": "loss_recovered", "max_l0": 20}
    assert bounded_objective({"loss_recovered": 0.9, "l0": 15.0}, spec) == pytest.approx(0.9)
    assert bounded_objective({"loss_recovered": 0.95, "l0": 40.0}, spec) == pytest.approx(-0.05)
    assert bounded_objective({"loss_recovered": 0.9, "l0": 15.0}, None) is None
    with pytest.raises(ConfigError, match="objective.fidelity='loss_recovered'"):
        bounded_objective({"explained_variance": 0.9, "l0": 15.0}, spec)
