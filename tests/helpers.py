"""Test helpers: CIFAR files in the exact pickle format, and a reader for wandb's offline run files."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, per_batch: int = 40, test: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``cifar-10-batches-py`` as the real dataset stores it: python pickles with bytes keys,
    ``b"data"`` an (N, 3072) uint8 array of channel-major 32x32 planes and ``b"labels"`` a list."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = data
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return written


def read_wandb_records(path: Path) -> list:
    """Parse a ``run-<id>.wandb`` file: a header, then LevelDB-style log blocks of protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, records, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # full, first
            partial = payload
        else:  # middle, last
            partial += payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(partial)
            records.append(record)
    return records


def wandb_summary(records: list) -> dict:
    """The final value of every summary key in the records."""
    import json

    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def signal_when(command: list[str], ready: Callable[[], bool], sig: int, timeout: float = 240.0) -> tuple[int, str]:
    """Start ``command``, send it ``sig`` as soon as ``ready()`` (or it exits, or ``timeout``); its (exit status, stderr).

    The command runs in a process group of its own, and once it has exited whatever it left running (a child it should
    have stopped, still writing) is killed: its stderr is what was written up to then, not a pipe held open for minutes.
    """
    import contextlib
    import os
    import signal
    import subprocess
    import tempfile
    import time

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while not ready() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.02)
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):  # nothing left in the group
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stderr.seek(0)
        return proc.returncode, stderr.read().decode()


def kill_when(command: list[str], path: Path, timeout: float = 240.0) -> None:
    """Start ``command``, SIGKILL it as soon as ``path`` exists (as a crash or pre-emption would)."""
    import signal

    signal_when(command, path.exists, signal.SIGKILL, timeout)
