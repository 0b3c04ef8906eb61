"""Evaluate an SAE (Lightning checkpoint or export folder) on held-out data; write the metrics as JSON."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from monosemantic.stages import eval as eval_stage  # noqa: E402
from monosemantic.utils.hydra_utils import apply_extras, run_main, task_wrapper  # noqa: E402


@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    apply_extras(cfg)
    return eval_stage.run(cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    run_main(main, "eval", Path(__file__).resolve().parents[1] / "configs")
