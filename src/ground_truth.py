"""Write a ground-truth shard set (known sparse features): ``python src/ground_truth.py l0=8 n_features=1024``.

Then ``python src/train.py experiment=sae_4096 data.shards=<the printed folder>``: metrics.json reports how many
of the planted features the SAE recovered (README "Beyond the paper")."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from monosemantic.stages import ground_truth  # noqa: E402
from monosemantic.utils.hydra_utils import apply_extras, run_main, task_wrapper  # noqa: E402


@task_wrapper
def ground_truth_run(cfg: DictConfig) -> dict:
    apply_extras(cfg)
    return ground_truth.run(cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="ground_truth")
def main(cfg: DictConfig) -> None:
    ground_truth_run(cfg)


if __name__ == "__main__":
    run_main(main, "ground_truth", Path(__file__).resolve().parents[1] / "configs")
