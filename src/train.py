"""Train a stage: the one-layer transformer (`experiment=transformer_1l`) or an SAE (`experiment=sae_4096`).

Thin on purpose: compose the config, run the stage, return the optimized metric for sweeps.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from monosemantic.stages import run_training  # noqa: E402
from monosemantic.utils.hydra_utils import apply_extras, metric_value, run_main, task_wrapper  # noqa: E402


@task_wrapper
def train(cfg: DictConfig) -> dict:
    apply_extras(cfg)
    return run_training(cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return metric_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    run_main(main, "train", Path(__file__).resolve().parents[1] / "configs")
