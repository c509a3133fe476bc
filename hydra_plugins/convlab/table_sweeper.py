"""A Hydra sweeper whose jobs are the rows of a table: ``table.rows[*].overrides`` x seeds.

The basic sweeper takes a cartesian product of values, but a paper table is a list of settings
(MobileNets Table 5: a 0.75-wide model and a shallow one, not every width x depth). With
``hydra/sweeper=table`` (set by the ``conf/experiment`` overlays), ``scripts/run.py -m
experiment=NAME`` launches one job per row and seed, through whatever launcher is configured
(local, joblib, SLURM). Sweeps on the command line (``optim.lr=0.1,0.2``) multiply the rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class TableSweeper(BasicSweeper):
    """One job per (command-line combination, table row, seed); rows come from ``table.rows``."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None, seeds: int = 1) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise HydraException(f"hydra.sweeper.seeds={seeds!r} must be a whole number >= 1")
        self.seeds = seeds

    def job_overrides(self, arguments: list[str]) -> list[list[str]]:
        """The override list of every job, rows outermost so a table fills row by row."""
        assert self.config is not None and self.hydra_context is not None
        rows = OmegaConf.select(self.config, "table.rows")
        if not rows:
            raise HydraException("hydra/sweeper=table needs a config with table.rows (use experiment=NAME)")
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides([*self._parse_config(), *arguments])
        # seed=K is where the seeds start: K, K+1, ... (it was taken as the only seed, silently
        # dropping seeds=N). A seed sweep (seed=0,1,2) names the seeds itself and replaces them.
        swept_seed = any(o.get_key_element() == "seed" and o.is_sweep_override() for o in parsed)
        base = next((int(o.value()) for o in parsed if o.get_key_element() == "seed" and not o.is_sweep_override()), self.config.seed)
        parsed = [o for o in parsed if o.get_key_element() != "seed" or o.is_sweep_override()]
        combos = self.split_arguments(parsed, None)[0]
        seeds = [[]] if swept_seed else [[f"seed={base + i}"] for i in range(self.seeds)]
        return [[*combo, *row.overrides, f"row={row.id}", *seed] for row in rows for combo in combos for seed in seeds]

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        jobs = self.job_overrides(arguments)
        from experiments.tables import row_set_warnings  # here, not at the top: Hydra imports every plugin at start-up

        for warning in row_set_warnings(self.config.table, list(arguments)):
            log.warning(warning)
        self.overrides = list(self.split_overrides_to_chunks(jobs, self.max_batch_size))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info("table %s: %d jobs", self.config.table.name, len(jobs))
        returns, first = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=first)
            for result in results:
                _ = result.return_value  # re-raises what a job raised (convlab jobs record failures instead)
            first += len(batch)
            returns.append(results)
        return returns
