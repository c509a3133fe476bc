"""The local dashboard: one shareable index.html, PNG figures and paper tables from results.json files.

python scripts/report.py runs=outputs
python scripts/report.py runs=[multirun/2026-11-24_12-00-00,outputs] out=report-blocks format=json
python scripts/report.py source=wandb project=convlab entity=my-team
"""

import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root replaces scripts/ on the path, as in profile.py

from omegaconf import DictConfig, OmegaConf

from experiments.cli import entry
from experiments.report import build_report, format_summary


@entry("report")
def main(cfg: DictConfig) -> None:
    if cfg.format not in ("text", "json"):
        raise ValueError(f"format={cfg.format!r} is not valid; choose from: text, json")
    if cfg.out is None:  # str(None) would be a dir named "None"
        raise ValueError("out=null is not a dir; pass out=DIR (default: report)")
    # runs=DIR or runs=[DIR1,DIR2]; a dir named by a number or true/false (runs=0) is still a dir
    runs = (
        [str(r) for r in OmegaConf.to_container(cfg.runs)] if OmegaConf.is_list(cfg.runs) else None if cfg.runs is None else str(cfg.runs)
    )
    summary = build_report(runs, out=str(cfg.out), source=cfg.source, project=cfg.project, entity=cfg.entity)
    print(json.dumps(summary) if cfg.format == "json" else format_summary(summary), flush=True)


if __name__ == "__main__":
    main()
