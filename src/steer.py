"""Generate with SAE features pinned or ablated, beside the unsteered continuation (same seed)."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from monosemantic.stages import steer  # noqa: E402
from monosemantic.utils.hydra_utils import apply_extras, run_main, task_wrapper  # noqa: E402


@task_wrapper
def steer_run(cfg: DictConfig) -> dict:
    apply_extras(cfg)
    return steer.run(cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="steer")
def main(cfg: DictConfig) -> None:
    steer_run(cfg)


if __name__ == "__main__":
    run_main(main, "steer", Path(__file__).resolve().parents[1] / "configs")
