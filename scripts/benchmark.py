"""Measured speed of convlab's pointwise_conv2d and of every block next to torch, with a roofline.

python scripts/benchmark.py suite=pointwise
python scripts/benchmark.py suite=blocks dtypes=[fp32]
python scripts/benchmark.py suite=all format=json out=benchmarks
"""

import json
import sys
from pathlib import Path

# The repo root replaces scripts/ on the path, as in profile.py.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from omegaconf import DictConfig

from experiments.bench import SUITES, markdown_report, options_from_config, run_benchmarks
from experiments.cli import check_writable, entry


def _check(cfg: DictConfig) -> None:
    """Before minutes of timing, not after: the suite, every option, then the output dir."""
    if cfg.suite != "all" and cfg.suite not in SUITES:
        raise ValueError(f"unknown suite {cfg.suite!r}; choose from: {', '.join([*SUITES, 'all'])}")
    options_from_config(cfg)
    if cfg.out is None:  # str(None) would be a dir named "None"
        raise ValueError("out=null is not a dir; pass out=DIR (default: benchmarks)")
    check_writable(str(cfg.out), "out=...")


@entry("benchmark", check=_check, interrupted="suites that finished before it are written to out; the one in progress is not")
def main(cfg: DictConfig) -> None:
    if cfg.format not in ("text", "json"):
        raise ValueError(f"format={cfg.format!r} is not valid; choose from: text, json")
    outcome = run_benchmarks(str(cfg.suite), options_from_config(cfg), out=str(cfg.out))
    if cfg.format == "json":
        print(json.dumps(outcome), flush=True)
    else:
        print("\n\n".join(markdown_report(report) for report in outcome["reports"].values()), flush=True)


if __name__ == "__main__":
    main()
