"""Count a model's parameters and multiply-adds on one input (fvcore); no data, no training.

python scripts/profile.py model=mobilenet_v1 data=imagenet model.width=0.75 data.image_size=192
python scripts/profile.py model=separable format=json
"""

import json
import sys
from pathlib import Path

# The repo root replaces scripts/ on the path: scripts/profile.py must not shadow the stdlib's profile module.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from omegaconf import DictConfig

from experiments.cli import entry
from experiments.cost import cost_report, format_cost


@entry("profile")
def main(cfg: DictConfig) -> None:
    if cfg.format not in ("text", "json"):
        raise ValueError(f"format={cfg.format!r} is not valid; choose from: text, json")
    report = cost_report(cfg, batch_size=cfg.batch_size)
    print(json.dumps(report) if cfg.format == "json" else format_cost(report), flush=True)


if __name__ == "__main__":
    main()
