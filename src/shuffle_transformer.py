"""The randomized control: a copy of a transformer export with every weight tensor's entries shuffled.

    python src/shuffle_transformer.py data/models/<transformer>            # -> <transformer>-shuffled-s0
    python src/train.py experiment=sae_4096 data=on_the_fly data.model_dir=data/models/<transformer>-shuffled-s0
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from monosemantic.models.transformer_module import export_shuffled  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="an exported transformer (config.json + model.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: <model_dir>-shuffled-s<seed> beside it")
    a = ap.parse_args()
    print(export_shuffled(a.model_dir, a.out, a.seed))


if __name__ == "__main__":
    main()
