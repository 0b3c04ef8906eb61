"""Plot the sparsity–fidelity frontier of a sweep: ``python src/frontier.py runs=[logs/multiruns/<stamp>]``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from monosemantic import frontier  # noqa: E402
from monosemantic.utils.hydra_utils import apply_extras, run_main, task_wrapper  # noqa: E402


@task_wrapper
def frontier_run(cfg: DictConfig) -> dict:
    apply_extras(cfg)
    return frontier.run(cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="frontier")
def main(cfg: DictConfig) -> None:
    frontier_run(cfg)


if __name__ == "__main__":
    run_main(main, "frontier", Path(__file__).resolve().parents[1] / "configs")
