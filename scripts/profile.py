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

# The count runs the model on a real input batch: at most this many pixels per batch (one 4096 x 4096 image).
MAX_IMAGE_SIZE = 4096
MAX_BATCH_PIXELS = MAX_IMAGE_SIZE**2


def _check(cfg: DictConfig) -> None:
    """batch_size and data.image_size the count can run on; before the model is built or an input allocated."""
    batch, size = cfg.batch_size, cfg.data.image_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size={batch!r} must be a whole number >= 1 (the papers count per image: batch_size=1)")
    if isinstance(size, bool) or not isinstance(size, int):
        return  # the model's own check names it
    if size > MAX_IMAGE_SIZE:
        raise ValueError(
            f"data.image_size={size} is too large to profile (the count runs the model on a real input); valid: 1 <= data.image_size <= {MAX_IMAGE_SIZE}"
        )
    if size >= 1 and batch * size * size > MAX_BATCH_PIXELS:
        most = MAX_BATCH_PIXELS // (size * size)
        raise ValueError(
            f"batch_size={batch} is too large to profile at data.image_size={size} (the count runs the model on a real batch); "
            f"valid: 1 <= batch_size <= {most} at this size (MACs scale linearly with batch_size)"
        )


@entry("profile", check=_check)
def main(cfg: DictConfig) -> None:
    if cfg.format not in ("text", "json"):
        raise ValueError(f"format={cfg.format!r} is not valid; choose from: text, json")
    _check(cfg)  # again: the preflight skips it in -m sweeps
    report = cost_report(cfg, batch_size=cfg.batch_size)
    print(json.dumps(report) if cfg.format == "json" else format_cost(report), flush=True)


if __name__ == "__main__":
    main()
