"""Cache the frozen transformer's MLP activations as webdataset shards (builds the transformer if missing)."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from monosemantic.stages import cache as cache_stage  # noqa: E402
from monosemantic.utils.hydra_utils import apply_extras, run_main, task_wrapper  # noqa: E402


@task_wrapper
def cache(cfg: DictConfig) -> dict:
    apply_extras(cfg)
    return cache_stage.run(cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="cache_activations")
def main(cfg: DictConfig) -> None:
    cache(cfg)


if __name__ == "__main__":
    run_main(main, "cache_activations", Path(__file__).resolve().parents[1] / "configs")
