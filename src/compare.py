"""Match the features of several SAEs on the same tokens: feature splitting and universality (README)."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from monosemantic.stages import compare  # noqa: E402
from monosemantic.utils.hydra_utils import apply_extras, run_main, task_wrapper  # noqa: E402


@task_wrapper
def build(cfg: DictConfig) -> dict:
    apply_extras(cfg)
    return compare.run(cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="compare")
def main(cfg: DictConfig) -> None:
    build(cfg)


if __name__ == "__main__":
    run_main(main, "compare", Path(__file__).resolve().parents[1] / "configs")
