"""Train one model on one dataset and record accuracy next to cost (results.json, wandb).

python scripts/run.py model=separable                      # CIFAR-10, the default recipe
python scripts/run.py model=separable data=fashion_mnist trainer=quick
python scripts/run.py -m model=standard,separable,inverted_residual
torchrun --nproc_per_node=2 scripts/run.py model=separable hydra.run.dir=outputs/ddp
"""

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The repo root replaces scripts/ on the path: scripts/profile.py must not shadow the stdlib's profile module.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.cli import count_failed_job, entry, fail, is_multirun
from experiments.config import model_from_config
from experiments.records import read_json
from experiments.train import Divergence, check_config, check_resume, resolve_device, train

log = logging.getLogger("convlab")


def _summary(record: dict, run_dir: Path) -> str:
    """The run's one-line summary; ``run_dir`` is where its results.json is now (a reused record keeps the
    run_dir it was trained in, which a clone or a moved folder no longer has)."""
    final, cost, target = record["final"], record["cost"], record.get("target")
    latency = cost.get("latency_ms", {}).get("1")
    if target:
        goal = f"{100 * target['acc']:g}%"
        timed = (
            f"{goal} reached at epoch {target['epoch']} after {target['train_seconds']:.1f} s"
            if target["reached"]
            else f"{goal} not reached"
        )
    length = f"{final['epochs']} epochs"
    if final.get("steps") is not None and final["steps"] < final["epochs"] * final.get("steps_per_epoch", 0):
        length += f" ({final['steps']} steps, {final['images_seen']} images: trainer.max_steps)"
    return (
        f"{record['name']} (seed {record['seed']}): test acc {100 * final['test_acc']:.2f}% after {length}"
        + (f" ({timed})" if target else "")
        + " | "
        f"{cost['params'] / 1e6:.2f} M params | {cost['macs'] / 1e6:.1f} M MACs"
        + (f" | {latency:.2f} ms/image ({cost['latency_device']})" if latency is not None else "")
        + f" | {run_dir / 'results.json'}"
    )


def _check(cfg: DictConfig) -> None:
    """Before Hydra makes a run dir: the run checks, the model built on the meta device (no memory, no data), resume=PATH's checkpoint."""
    import torch

    check_config(cfg, resolve_device(cfg.device))
    with torch.device("meta"):
        model_from_config(cfg)
    check_resume(cfg)


@entry(
    "config", check=_check, interrupted="a training run records this in its results.json; the same command with {dir_override} resumes it"
)
def main(cfg: DictConfig) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        logging.getLogger().setLevel(logging.WARNING)
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        record = train(cfg, hydra_dir)
    except (ValueError, Divergence) as ex:
        if is_multirun():  # the sweep goes on, and the process exits non-zero at its end
            log.error("error: %s", " ".join(str(ex).split()))
            if not _failure_recorded(hydra_dir):  # else SweepSummary counts it from results.json
                count_failed_job()
            return
        code = 2 if isinstance(ex, ValueError) else 1
        if rank:  # under torchrun rank 0 says it, once
            sys.exit(code)
        fail(str(ex), code=code)
    finally:
        _cleanup_rank_dir(rank, hydra_dir)
    if rank == 0:
        print(json.dumps(record) if cfg.format == "json" else _summary(record, hydra_dir), flush=True)


def _failure_recorded(run_dir: Path) -> bool:
    """Whether the run dir's results.json records a failure (a job can fail before writing one,
    e.g. on a device the machine lacks, or beside a completed run with another config)."""
    record = read_json(run_dir / "results.json")
    return isinstance(record, dict) and record.get("status") != "completed"


def _cleanup_rank_dir(rank: int, hydra_dir: Path) -> None:
    """Under torchrun ranks > 0 remove the temporary dir their Hydra wrote into (see the bottom of this file)."""
    import torch.distributed as dist

    if rank:
        logging.shutdown()
        shutil.rmtree(hydra_dir, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0:
        # Ranks > 0 train into rank 0's run dir (train() broadcasts it); their own Hydra output goes to a
        # temporary dir of their own. Sharing rank 0's dir and removing it when it held no results.json
        # raced rank 0's failure record: the run dir, or its .hydra and log, could vanish.
        sys.argv = [a for a in sys.argv if not a.lstrip("+").startswith("hydra.run.dir=")]
        sys.argv.append(f"hydra.run.dir={tempfile.mkdtemp(prefix='convlab-rank')}")
    main()
