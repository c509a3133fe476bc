"""Files a run leaves behind: results.json and checkpoints, written atomically; what produced them.

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target, so a crash or a full disk leaves the previous file intact. Checkpoints keep the
newest ``keep`` files; a truncated or corrupt one is reported in one line and the previous good
one is used. Checkpoints hold only tensors and plain containers and load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_KEYS",
    "atomic_write",
    "env_info",
    "incomplete",
    "list_checkpoints",
    "load_checkpoint",
    "now",
    "read_json",
    "resolve_device",
    "save_checkpoint",
    "sync",
    "write_json",
]

log = logging.getLogger("convlab")
CHECKPOINT = re.compile(r"checkpoint-epoch(\d+)\.pt$")
REPO = Path(__file__).resolve().parent.parent


def sync(device: torch.device) -> None:
    """Wait until a GPU has run the work queued on it (a no-op on the CPU): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename; on any error the old file stays.

    The file gets the mode ``open()`` would give it (0666 less the umask), not mkstemp's private 0600:
    results in a shared output dir are read by the team's ``report.py``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None: strict JSON has no token for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, record: dict[str, Any]) -> None:
    """``record`` as strict JSON (a non-finite number, such as a diverged loss, is written as null)."""
    atomic_write(path, (json.dumps(_finite(record), indent=2, default=str, allow_nan=False) + "\n").encode())


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON, bytes that are not UTF-8; RecursionError: absurd nesting
        return None
    return value if isinstance(value, dict) else None


def incomplete(record: dict[str, Any]) -> str | None:
    """What a ``completed`` record lacks that its readers use (config, final accuracy, cost), or None."""
    for key in ("config", "final", "cost"):
        if not isinstance(record.get(key), dict):
            return f"{key}={record.get(key)!r} is not a mapping"
    if record["final"].get("test_acc") is None:
        return "final.test_acc is missing"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in ``run_dir``, newest epoch first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-epoch*.pt") if (m := CHECKPOINT.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(run_dir: Path, state: dict[str, Any], epoch: int, keep: int = 2) -> Path:
    """Save ``state`` as ``checkpoint-epoch{epoch:04d}.pt`` atomically, then keep only the newest ``keep``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(run_dir) / f"checkpoint-epoch{epoch:04d}.pt"
    atomic_write(path, buffer.getvalue())
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(source: Path, required: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path] | None:
    """The newest loadable checkpoint in a run dir (or the file ``source``), with its path; None if there is none.

    A checkpoint that fails to load (truncated, corrupt), is not a dict, or lacks a ``required`` key
    (train() asks for :data:`CHECKPOINT_KEYS`) is reported in one line and skipped.
    """
    source = Path(source)
    candidates = [source] if source.is_file() else list_checkpoints(source)
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as ex:  # truncated zip, bad pickle, ...: all mean "unusable"
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, _gist(ex))
            continue
        if not isinstance(state, dict):
            log.warning("checkpoint %s is not a convlab checkpoint (a %s, not a dict); trying the previous one", path, type(state).__name__)
            continue
        missing = [key for key in required if key not in state]
        if not missing:
            return state, path
        log.warning("checkpoint %s is not a convlab checkpoint (no %s); trying the previous one", path, ", ".join(missing))
    return None


# What train() writes into a checkpoint and reads back to resume.
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "history", "config", "rng_cpu")


def _gist(ex: BaseException) -> str:
    """An exception as one short line: its type and first sentence, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(ex).split()))
    first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0] if text else ""
    return f"{type(ex).__name__}: {first[:120]}" if first else type(ex).__name__


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo gives them.

    A virtual machine may name only the brand: two hosts here both called "AMD EPYC" ran bf16 matrix
    products 2x apart (412 and 862 GFLOP/s on 2 threads), so the numbers tell such hosts apart.
    """
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():  # the first processor's block ends at a blank line
                break
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = ", ".join(f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model")) if key in fields)
            return fields["model name"] + (f" ({numbers})" if numbers else "")
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:N``; a device that is not there is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not valid; choose from: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available here; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device={name!r} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not supported; choose from: auto, cpu, cuda, cuda:N")
    return device


def env_info(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """What produced a result: versions, device, threads, processes, git commit, host."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "git_commit": _git_commit(),
        "hostname": socket.gethostname(),
    }
