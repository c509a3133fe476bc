"""Benchmarks: measured speed of convlab's ops and blocks next to torch's, and where they sit on a roofline.

A suite is one function registered in :data:`SUITES` under a name (``@register_suite("pointwise")``);
it takes a :class:`BenchContext` and returns a report whose ``results`` are one dict per measured
case and whose ``tables`` become the Markdown summary. :func:`run_benchmarks` runs one suite or all
of them, measures the machine once per run (matrix-multiply peak per dtype, copy bandwidth) and
writes ``<out>/<suite>.json`` and ``<out>/<suite>.md`` (a ``size="tiny"`` smoke test aimed at the
committed ``benchmarks/`` writes under ``outputs/benchmarks_tiny/`` instead).

Conventions, stated once:

* **MACs** are multiply-adds (one multiply-add counts once, as :func:`experiments.cost.measure_cost`
  counts them); **FLOPs = 2 x MACs**. A forward + backward pass counts ``3 x`` the forward FLOPs:
  the input gradient and the weight gradient are each one product of the forward's size.
* **Time** is wall-clock per call, ``time.perf_counter`` on CPU and CUDA events on a GPU, after
  ``warmup`` untimed calls; contenders of one case run round-robin (each round calls every one
  once) so that load from other processes falls on all of them alike, in a freshly shuffled order
  each round (seeded) so that no contender always runs right after the same other one: a call
  pays for the caches and memory its predecessor left behind, and in a fixed order the same work
  measured up to 1.7x apart with its neighbours (bf16 NCHW 32->64 @56 batched GEMM: 1.03 ms
  beside torch's convolution, 0.62 ms as another contender; 0.69 and 0.67 ms each in a loop of its
  own). We report the **median**, the minimum and the interquartile range (IQR) of the per-call
  times.
* **Achieved GFLOP/s** = FLOPs / median time; **% of peak** = achieved / the median GFLOP/s of a
  large square matrix product in the same dtype, measured in the same run: the faster of
  ``torch.matmul`` and, on CPU, oneDNN's product (see :func:`measure_matmul_peak`).
* **Bytes moved** (the roofline's x-axis denominator): every aten op reads each of its tensor
  arguments once and writes each of its outputs once, nothing stays in cache between ops; views
  move nothing. A conv reads its input and weight and writes its output, a BatchNorm reads its
  input and its four per-channel vectors and writes its output, an in-place ReLU reads and writes
  its tensor, a residual add reads two tensors and writes one. Bytes = elements x dtype size.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from models import BLOCKS, pointwise_conv2d

from .allocator import MALLOC_MODES, set_malloc
from .cost import measure_cost
from .records import env_info, now, resolve_device, sync, write_json

__all__ = [
    "DTYPES",
    "SIZES",
    "SUITES",
    "BenchContext",
    "BenchOptions",
    "bytes_moved",
    "markdown_report",
    "measure_bandwidth",
    "measure_matmul_peak",
    "options_from_config",
    "output_dir",
    "register_suite",
    "run_benchmarks",
    "summarize_times",
    "time_interleaved",
]

log = logging.getLogger("convlab")

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = ("full", "tiny")
ROOT = Path(__file__).resolve().parent.parent
# The committed results the README cites; a size=tiny run (meaningless numbers) never writes into them.
COMMITTED_DIR = ROOT / "benchmarks"
TINY_DIR = ROOT / "outputs" / "benchmarks_tiny"  # where such a run goes instead (outputs/ is git-ignored)
# fwd + bwd = forward + input gradient + weight gradient, each a product of the forward's size.
FLOPS_PER_MAC = {"fwd": 2, "fwd+bwd": 6}


def _is_int(value: Any, low: int) -> bool:
    """An int (not a bool) >= ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class BenchOptions:
    """How to run the benchmarks; the fields of ``conf/benchmark.yaml`` less ``suite``, ``format`` and ``out``.

    ``size="tiny"`` is a smoke test: the smallest shapes, at most 3 timed calls, one warm-up, no
    ``min_time_s``; its numbers mean nothing.
    """

    device: str = "auto"
    threads: int | None = None
    repeats: int = 30
    warmup: int = 5
    min_time_s: float = 0.2
    block: int = 1
    graph_calls: int = 20
    size: str = "full"
    passes: int = 3
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    malloc: str = "steady"
    train: dict[str, Any] = field(default_factory=dict)  # the train suite's options (conf/benchmark.yaml: train)

    def __post_init__(self) -> None:
        resolve_device(self.device)  # auto, cpu, cuda or cuda:N, and there on this machine
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose from: {', '.join(SIZES)}")
        if self.malloc not in MALLOC_MODES:
            raise ValueError(f"unknown malloc {self.malloc!r}; choose from: {', '.join(MALLOC_MODES)}")
        if not self.dtypes:
            raise ValueError(f"dtypes={list(self.dtypes)} is empty; choose from: {', '.join(DTYPES)}")
        for name in self.dtypes:
            if name not in DTYPES:
                raise ValueError(f"unknown dtype {name!r}; choose from: {', '.join(DTYPES)}")
        if len(set(self.dtypes)) != len(self.dtypes):  # each would be timed and counted twice
            raise ValueError(f"dtypes={list(self.dtypes)} names a dtype twice; give each once, e.g. [fp32,bf16]")
        if self.threads is not None and not _is_int(self.threads, 1):
            raise ValueError(f"threads={self.threads!r} must be null or an int >= 1")
        if not _is_int(self.repeats, 1):
            raise ValueError(f"repeats={self.repeats!r} must be an int >= 1 (timed calls per contender)")
        if not _is_int(self.warmup, 0):
            raise ValueError(f"warmup={self.warmup!r} must be an int >= 0 (untimed calls per contender)")
        if isinstance(self.min_time_s, bool) or not isinstance(self.min_time_s, (int, float)) or not 0 <= self.min_time_s < math.inf:
            raise ValueError(f"min_time_s={self.min_time_s!r} must be a finite number >= 0 (seconds of timed calls per contender)")
        if not _is_int(self.passes, 1):
            raise ValueError(f"passes={self.passes!r} must be an int >= 1 (pointwise suite: timing passes over all its cases)")
        if not _is_int(self.block, 1):
            raise ValueError(f"block={self.block!r} must be an int >= 1 (timed calls per contender's turn)")
        if not _is_int(self.graph_calls, 0):
            raise ValueError(f"graph_calls={self.graph_calls!r} must be an int >= 0 (calls per CUDA graph; 0: eager calls)")
        from .bench_train import check_train_options  # here, not at the top: bench_train builds on this module

        check_train_options(self.train)

    def timing(self) -> dict[str, Any]:
        """Keyword arguments of :func:`time_interleaved` for this size."""
        if self.size == "tiny":
            return {
                "repeats": min(self.repeats, 3),
                "warmup": min(self.warmup, 1),
                "min_time_s": 0.0,
                "block": 1,
                "graph_calls": min(self.graph_calls, 2),
            }
        return {
            "repeats": self.repeats,
            "warmup": self.warmup,
            "min_time_s": self.min_time_s,
            "block": self.block,
            "graph_calls": self.graph_calls,
        }


@dataclass
class BenchContext:
    """What a suite gets: the options, the resolved device, the machine's measured limits and the output dir."""

    options: BenchOptions
    device: torch.device
    env: dict[str, Any]
    peak: dict[str, dict[str, Any]]  # dtype name -> matmul peak (gflops, ...)
    bandwidth: dict[str, Any]  # copy bandwidth (gb_per_s, ...)
    out: Path
    files: list[str] = field(default_factory=list)  # extra files a suite wrote (plots)

    def time(self, fns: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
        """:func:`time_interleaved` with this run's device and timing options."""
        return time_interleaved(fns, device=self.device, **self.options.timing())

    def record(self, dtype: str) -> dict[str, Any]:
        """The fields every result carries: what produced it."""
        keys = ("device", "device_name", "threads", "torch")
        return {**{k: self.env[k] for k in keys}, "dtype": dtype}


def output_dir(out: str | Path, size: str) -> Path:
    """Where a run writes: ``out``, except that a ``size=tiny`` run aimed at the committed results
    (``benchmarks/`` or a folder in it, e.g. the default ``out: benchmarks``) goes to the same place
    under :data:`TINY_DIR` instead, so its smoke-test numbers never replace the ones the README cites."""
    path = Path(out)
    if size != "tiny":
        return path
    committed = COMMITTED_DIR.resolve()
    resolved = path.resolve()
    if resolved != committed and committed not in resolved.parents:
        return path
    redirected = TINY_DIR.resolve() / resolved.relative_to(committed)
    log.info(
        "size=tiny: writing to %s, not over the committed results in %s (out=DIR outside benchmarks/ picks another dir)", redirected, path
    )
    return redirected


SuiteFn = Callable[[BenchContext], dict[str, Any]]
SUITES: dict[str, SuiteFn] = {}


def register_suite(name: str) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator: register a suite function under ``name``; a duplicate name raises."""

    def add(fn: SuiteFn) -> SuiteFn:
        if name in SUITES:
            raise ValueError(f"benchmark suite {name!r} is already registered")
        SUITES[name] = fn
        return fn

    return add


# ---------------------------------------------------------------------------------------------
# Timing and the machine's limits


# On a GPU torch runs fp32 convolutions as TF32 (a 10-bit mantissa) by default and fp32 matrix
# products in full fp32: a pointwise_conv2d (a matrix product) against nn.Conv2d would compare two
# precisions. The suites that compare kernels run both in IEEE fp32; the train suite keeps torch's
# defaults on both sides (what a user's training gets).
IEEE_FP32_SUITES = ("pointwise", "blocks")


@contextlib.contextmanager
def fp32_math(device: torch.device, ieee: bool) -> Iterator[str]:
    """IEEE fp32 for cuDNN convolutions and CUDA matmuls inside (``ieee`` on a GPU); yields what fp32 means."""
    if device.type != "cuda":
        yield "ieee (cpu)"
        return
    if not ieee:
        yield f"torch defaults (convolutions {torch.backends.cudnn.conv.fp32_precision}, matmuls {torch.backends.cuda.matmul.fp32_precision})"
        return
    before = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield "ieee (TF32 off for convolutions and matmuls)"
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that calls ``fn`` once and returns its wall time in seconds."""
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], object]) -> float:
            # The stream of ``device``, not of the current device: on cuda:1 while cuda:0 is current,
            # events on cuda:0's stream would time none of the work.
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # ms -> s

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cpu_time


def summarize_times(seconds: Iterable[float]) -> dict[str, float]:
    """Median, minimum, quartiles and IQR (milliseconds) of per-call times given in seconds."""
    ms = sorted(s * 1e3 for s in seconds)
    if not ms:
        raise ValueError("summarize_times: no times to summarize")
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "repeats": len(ms)}


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 30,
    warmup: int = 5,
    min_time_s: float = 0.0,
    max_repeats: int | None = None,
    block: int = 1,
    graph_calls: int = 0,
) -> dict[str, dict[str, float]]:
    """Time several contenders round-robin and summarize each (see :func:`summarize_times`).

    Each round calls every contender once, so a burst of load from another process hits all of
    them, in an order shuffled afresh each round by a seeded generator (the same sequence every
    run), so that none always follows the same other contender. With ``block > 1`` a contender's
    turn is one untimed lead-in call and then ``block`` timed calls in a row, so every timed call
    but the lead-in follows a call of itself: the steady state of that op, as a loop of it would
    measure, with load from other processes still spread over all contenders. Rounds go on until
    each contender has ``repeats`` timed calls and has run for ``min_time_s`` in total, or has
    ``max_repeats`` timed calls (default ``10 * repeats``). The garbage collector is off while
    timing, as ``timeit`` does.

    Args:
        fns: name -> zero-argument callable doing one unit of work.
        device: where the work runs; on CUDA each call is timed with CUDA events.
        repeats: the least number of timed calls per contender.
        warmup: untimed calls per contender first.
        min_time_s: the least total timed seconds per contender.
        max_repeats: the most timed calls per contender.
        block: timed calls per contender's turn, after one untimed lead-in call when above 1.
        graph_calls: on CUDA, when > 0: each contender is captured ``graph_calls`` times into one
            CUDA graph (after the warm-up) and a timed call replays it; its time / ``graph_calls``
            is the device time of one call without Python, dispatch or launch overhead. A
            contender that cannot be captured falls back to eager calls (``timing`` says which).

    Returns:
        name -> ``{median_ms, min_ms, q1_ms, q3_ms, iqr_ms, repeats, page_faults_per_call, timing}``.
    """
    device = torch.device(device)
    timer = _timer(device)
    max_repeats = max(repeats, max_repeats or 10 * repeats)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    per_call = dict.fromkeys(fns, 1)
    modes = dict.fromkeys(fns, "eager")
    if graph_calls > 0 and device.type == "cuda":
        fns = dict(fns)
        for name, fn in fns.items():
            replay = cuda_graph(fn, device, graph_calls)
            if replay is not None:
                fns[name], per_call[name], modes[name] = replay, graph_calls, f"cuda graph of {graph_calls} calls"
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    spent = dict.fromkeys(fns, 0.0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        calls, order, shuffle = 0, list(fns), random.Random(0).shuffle
        while calls < max_repeats:
            shuffle(order)
            for name in order:
                fn = fns[name]
                if block > 1:
                    fn()  # lead-in: the timed calls below follow a call of the same op
                for _ in range(block):
                    before = _minor_faults()
                    elapsed = timer(fn)
                    spent[name] += elapsed  # a replay's whole time counts toward min_time_s
                    times[name].append(elapsed / per_call[name])
                    faults[name] += _minor_faults() - before
            calls += block
            if calls >= repeats and min(spent.values()) >= min_time_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    # Page faults per call (this process, all threads): non-zero means the call paid for fresh memory.
    return {name: {**summarize_times(t), "page_faults_per_call": faults[name] / len(t), "timing": modes[name]} for name, t in times.items()}


def cuda_graph(fn: Callable[[], object], device: torch.device, calls: int) -> Callable[[], object] | None:
    """``fn`` called ``calls`` times, captured into one CUDA graph; the result replays it (None if capture fails).

    Two calls on a side stream first, as torch's graph docs ask (lazy initialisation, cuDNN's
    algorithm search and autograd's stream set-up stay out of the capture).
    """
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        except RuntimeError as ex:  # an op that syncs or reads back: time it eagerly
            log.warning("cannot capture %s in a CUDA graph (%s); timing it eagerly", getattr(fn, "__name__", fn), str(ex).splitlines()[0])
            torch.cuda.synchronize(device)
            return None
    return graph.replay


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def gflops(flops: float, ms: float) -> float:
    """GFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms / 1e3) / 1e9


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, *, repeats: int = 10, warmup: int = 2) -> dict[str, Any]:
    """The machine's practical matrix-multiply peak: the fastest matrix product torch has there, on ``(n, n) @ (n, n)``.

    On CPU torch has two: ``torch.matmul`` (MKL's ``sgemm`` for fp32) and oneDNN's (its inner-product
    primitive, ``torch.ops.mkldnn._linear_pointwise``, which :func:`models.pointwise_conv2d` uses). They
    can differ a lot: on a 2-core AMD Zen 5, fp32, MKL ran at 200 GFLOP/s and oneDNN at 467 (MKL takes
    a slower code path on AMD CPUs). A peak from the slower one made oneDNN's convolutions read up to
    "121% of peak", so both are timed, round-robin, and the faster median is the peak. On CUDA: ``torch.matmul``
    (cuBLAS) alone.

    FLOPs = ``2 n^3`` (n^3 multiply-adds). ``gflops`` is from the peak backend's median call,
    ``best_gflops`` from its fastest; ``backend`` names it and ``backends`` holds every one's figures.
    """
    from models.functional import _onednn_linear_dtypes  # which dtypes this torch has oneDNN's product for

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)  # (n, n)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)  # (n, n)
    out = torch.empty(n, n, device=device, dtype=dtype)
    fns: dict[str, Callable[[], object]] = {"torch.matmul": lambda: torch.matmul(a, b, out=out)}
    if device.type == "cpu" and dtype in _onednn_linear_dtypes():
        # a @ b^T: b read as an (out, in) weight; the same n^3 multiply-adds.
        fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    timed = time_interleaved(fns, device=device, repeats=repeats, warmup=warmup)
    flops = 2 * n**3
    backends = {
        name: {**stats, "gflops": gflops(flops, stats["median_ms"]), "best_gflops": gflops(flops, stats["min_ms"])}
        for name, stats in timed.items()
    }
    backend = max(backends, key=lambda name: backends[name]["gflops"])
    return {"n": n, "flops": flops, **backends[backend], "backend": backend, "backends": backends}


def measure_bandwidth(device: torch.device, mbytes: int = 256, *, repeats: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Memory bandwidth from copying a large fp32 tensor: (bytes read + bytes written) / median time.

    A copy of ``B`` bytes counts ``2 B`` moved, as STREAM's "copy" counts it; the source and
    destination are far larger than any cache for the default 256 MB.
    """
    numel = mbytes * 2**20 // 4
    src = torch.ones(numel, device=device)  # touched, so no page faults inside the timing
    dst = torch.zeros(numel, device=device)
    stats = time_interleaved({"copy": lambda: dst.copy_(src)}, device=device, repeats=repeats, warmup=warmup)["copy"]
    moved = 2 * numel * 4
    return {
        "bytes": moved,
        **stats,
        "gb_per_s": moved / (stats["median_ms"] / 1e3) / 1e9,
        "best_gb_per_s": moved / (stats["min_ms"] / 1e3) / 1e9,
    }


def _cpu_flags() -> list[str]:
    """The CPU features that decide matmul speed (AVX-512, its bf16 dot products, AMX), as /proc/cpuinfo names them."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Bytes moved


class _ByteCounter(TorchDispatchMode):
    """Counts, per aten op, the bytes of its tensor arguments (read) and of its outputs (written)."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view moves no data
            return out
        read = sum(t.numel() * t.element_size() for t in _tensors((args, kwargs)))
        written = sum(t.numel() * t.element_size() for t in _tensors(out))
        self.read += read
        self.written += written
        if read + written:  # allocations (empty) move nothing
            name = str(func.overloadpacket.__name__)
            self.ops[name] = self.ops.get(name, 0) + read + written
        return out


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in a nest of tuples/lists/dicts, each storage once (``x * x`` reads ``x`` once)."""
    found, seen, stack = [], set(), [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            key = (item.untyped_storage().data_ptr(), item.storage_offset(), item.shape, item.stride())
            if key not in seen:
                seen.add(key)
                found.append(item)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def bytes_moved(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Bytes a forward pass moves under the model in this module's docstring (each op reads its inputs, writes its outputs once).

    Runs ``model(x)`` once in eval mode without autograd, restoring the mode afterwards.

    Returns:
        ``{"bytes", "read", "written", "by_op": {aten op: bytes}}``.
    """
    was_training = model.training
    model.eval()
    counter = _ByteCounter()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return {"bytes": counter.read + counter.written, "read": counter.read, "written": counter.written, "by_op": counter.ops}


# ---------------------------------------------------------------------------------------------
# Suite: pointwise


def _batch8(group: str, layers: list[tuple[int, int, int]]) -> list[tuple[str, str, int, int, int, int]]:
    """``(group, label, N, C_in, C_out, H=W)`` rows at batch 8 for ``(C_in, C_out, H=W)`` layers."""
    return [(group, f"{c_in}->{c_out} @{hw}", 8, c_in, c_out, hw) for c_in, c_out, hw in layers]


# (C_in, C_out, H=W). MobileNet v1 at 224: every distinct 1x1 layer. MobileNet v2 at 224: at each resolution one
# expansion and one projection (of its 19 distinct 1x1 layers), whose narrow and uneven widths (16, 24, 96, 144
# channels) the v1 layers, all multiples of 64, do not have.
MOBILENET_V1_1X1 = [(32, 64, 112), (64, 128, 56), (128, 128, 56), (128, 256, 28), (256, 256, 28), (256, 512, 14),
                    (512, 512, 14), (512, 1024, 7), (1024, 1024, 7)]  # fmt: skip
MOBILENET_V2_1X1 = [(16, 96, 112), (32, 16, 112), (24, 144, 56), (96, 24, 56), (32, 192, 28), (144, 32, 28),
                    (96, 576, 14), (384, 96, 14), (160, 960, 7), (960, 320, 7)]  # fmt: skip

# (group, label, N, C_in, C_out, H=W): the guide's shapes and the MobileNets' layers at batch 8.
POINTWISE_SHAPES: dict[str, list[tuple[str, str, int, int, int, int]]] = {
    "full": [
        *_batch8("small output", [(32, 64, 56)]),
        *_batch8("large output", [(32, 256, 56), (32, 512, 56)]),
        *_batch8("mobilenet_v1", MOBILENET_V1_1X1),
        *_batch8("mobilenet_v2", MOBILENET_V2_1X1),
    ],
    "tiny": [("small output", "8->16 @6", 2, 8, 16, 6), ("large output", "16->48 @4", 2, 16, 48, 4)],
}
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
LARGE_GROUPS = ("large output",)


def _pointwise_fns(conv: nn.Conv2d, x: torch.Tensor, backward: bool) -> dict[str, Callable[[], object]]:
    """The three 1x1 formulations on the same weights, as zero-argument calls (forward, or forward + backward)."""
    weight, bias = conv.weight, conv.bias  # (K, C, 1, 1), (K,)
    k, c = weight.shape[:2]

    def ours() -> torch.Tensor:
        return pointwise_conv2d(x, weight, bias)

    def torch_conv() -> torch.Tensor:
        return conv(x)

    def linear() -> torch.Tensor:
        # (N, C, H, W) -> (N, H, W, C) @ W^T -> (N, H, W, K) -> (N, K, H, W) view; a copy first when x is NCHW.
        return F.linear(x.permute(0, 2, 3, 1), weight.view(k, c), bias).permute(0, 3, 1, 2)

    fns = {"ours": ours, "torch": torch_conv, "linear": linear}
    if not backward:
        return {name: torch.no_grad()(fn) for name, fn in fns.items()}
    leaves = (x, weight, bias)

    def with_backward(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        grad_out = torch.randn_like(fn().detach())  # the layout of this contender's own output

        def step() -> object:
            return torch.autograd.grad(fn(), leaves, grad_out)

        return step

    return {name: with_backward(fn) for name, fn in fns.items()}


def _pointwise_pass(ctx: BenchContext) -> list[tuple[str, str, dict[str, Any], dict[str, dict[str, float]]]]:
    """One timing pass over every case of the pointwise suite: ``(dtype, pass, the layer and format, timings)`` per
    case, in a fixed order."""
    device, cases = ctx.device, []
    for group, label, n, c_in, c_out, hw in POINTWISE_SHAPES[ctx.options.size]:
        for dtype_name in ctx.options.dtypes:
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)  # the same weights and inputs in every pass
            conv = nn.Conv2d(c_in, c_out, 1).to(device, dtype)
            for fmt, memory_format in MEMORY_FORMATS.items():
                x = torch.randn(n, c_in, hw, hw, device=device, dtype=dtype).contiguous(memory_format=memory_format)
                with torch.no_grad():
                    max_diff = (pointwise_conv2d(x, conv.weight, conv.bias).float() - conv(x).float()).abs().max().item()
                for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
                    xin = x.detach().requires_grad_(backward)
                    timings = ctx.time(_pointwise_fns(conv, xin, backward))
                    case = dict(
                        group=group, layer=label, n=n, c_in=c_in, c_out=c_out, h=hw, w=hw, memory_format=fmt, max_abs_diff_vs_torch=max_diff
                    )
                    cases.append((dtype_name, pass_name, case, timings))
    return cases


def merge_passes(passes: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One contender -> summary dict from the same case's timings in several passes (see :func:`time_interleaved`).

    ``median_ms`` is the median of the passes' medians (so one pass spent in a burst of load from
    another process cannot move it alone), ``min_ms`` the least of their minimums, the quartiles the
    medians of theirs (and the IQR between those), ``repeats`` and page faults over all calls;
    ``pass_median_ms`` keeps each pass's median and ``pass_spread`` their range relative to ``median_ms``.
    """
    merged = {}
    for name in passes[0]:
        runs = [p[name] for p in passes]
        medians = [r["median_ms"] for r in runs]
        median = statistics.median(medians)
        calls = sum(r["repeats"] for r in runs)
        q1, q3 = (statistics.median(r[k] for r in runs) for k in ("q1_ms", "q3_ms"))
        merged[name] = {
            "median_ms": median,
            "min_ms": min(r["min_ms"] for r in runs),
            "q1_ms": q1,
            "q3_ms": q3,
            "iqr_ms": q3 - q1,
            "repeats": calls,
            "page_faults_per_call": sum(r["page_faults_per_call"] * r["repeats"] for r in runs) / calls,
            "timing": runs[0]["timing"],
            "pass_median_ms": medians,
            "pass_spread": (max(medians) - min(medians)) / median,
        }
    return merged


@register_suite("pointwise")
def pointwise_suite(ctx: BenchContext) -> dict[str, Any]:
    """convlab's ``pointwise_conv2d`` vs ``nn.Conv2d(kernel_size=1)`` vs ``F.linear`` over channels.

    Every shape in :data:`POINTWISE_SHAPES`, each dtype, NCHW and channels_last input (all three
    contenders get the same tensor), forward (no grad) and forward + backward (gradients of input,
    weight and bias). With ``passes`` > 1 every case is timed once per pass,
    the passes one after another over the whole suite, and each contender's times are merged
    across passes (:func:`merge_passes`): a case's passes lie minutes apart, so a spell of load from
    another process, or a change of the host's state, reaches one pass of it, not all.
    """
    passes = ctx.options.passes
    runs = []
    for index in range(passes):
        log.info("pointwise: pass %d of %d", index + 1, passes)
        runs.append(_pointwise_pass(ctx))
    rows = []
    for per_pass in zip(*runs):
        dtype_name, pass_name, case, _ = per_pass[0]
        timings = merge_passes([t for *_, t in per_pass])
        row = _rate_row(ctx, dtype_name, case["n"] * case["c_in"] * case["c_out"] * case["h"] * case["w"], pass_name, timings)
        row.update(case, passes=passes)
        row["speed_ratio_ours_vs_torch"] = timings["torch"]["median_ms"] / timings["ours"]["median_ms"]
        row["speed_ratio_linear_vs_torch"] = timings["torch"]["median_ms"] / timings["linear"]["median_ms"]
        row["speed_ratio_ours_vs_torch_min"] = timings["torch"]["min_ms"] / timings["ours"]["min_ms"]
        row["pass_speed_ratios_ours_vs_torch"] = [
            t / o for t, o in zip(timings["torch"]["pass_median_ms"], timings["ours"]["pass_median_ms"], strict=True)
        ]
        rows.append(row)
        t = row["timings"]
        log.info(
            "pointwise %-13s %-14s %s %-13s %-7s ours %.3f ms  torch %.3f ms  linear %.3f ms  ours/torch speed %.2fx  ours %.0f%% of peak",
            case["group"], case["layer"], dtype_name, case["memory_format"], pass_name, t["ours"]["median_ms"], t["torch"]["median_ms"],
            t["linear"]["median_ms"], row["speed_ratio_ours_vs_torch"], t["ours"]["pct_peak"],
        )  # fmt: skip
    summary = _pointwise_summary(rows)
    return {"results": rows, "summary": summary, "tables": [_summary_table(summary), *_pointwise_tables(rows)], "notes": POINTWISE_NOTES}


def _rate_row(ctx: BenchContext, dtype: str, macs: int, pass_name: str, timings: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One result: MACs, FLOPs, and per contender its times, GFLOP/s and % of the dtype's matmul peak."""
    flops = FLOPS_PER_MAC[pass_name] * macs
    peak = ctx.peak[dtype]["gflops"]
    for stats in timings.values():
        stats["gflops"] = gflops(flops, stats["median_ms"])
        stats["pct_peak"] = 100 * stats["gflops"] / peak
        stats["rel_iqr"] = stats["iqr_ms"] / stats["median_ms"]
    return {**ctx.record(dtype), "pass": pass_name, "macs": macs, "flops": flops, "peak_gflops": peak, "timings": timings}


def _is_large(row: dict[str, Any]) -> bool:
    """The shapes the %-of-peak goal is about: the large-output group and MobileNet v1's 512- and 1024-channel layers."""
    return row["group"] in LARGE_GROUPS or (row["group"] == "mobilenet_v1" and row["c_in"] >= 512)


def _pointwise_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (dtype, memory format, pass): the ours/torch speed ratios (worst, median, by min times) and ours' % of peak on the large shapes."""
    summary: dict[str, Any] = {}
    for key in dict.fromkeys(f"{r['dtype']} {r['memory_format']} {r['pass']}" for r in rows):
        chosen = [r for r in rows if f"{r['dtype']} {r['memory_format']} {r['pass']}" == key]
        ratios = [r["speed_ratio_ours_vs_torch"] for r in chosen]
        worst = min(chosen, key=lambda r: r["speed_ratio_ours_vs_torch"])
        per_pass = zip(*(r.get("pass_speed_ratios_ours_vs_torch", [r["speed_ratio_ours_vs_torch"]]) for r in chosen), strict=True)
        summary[key] = {
            "shapes": len(chosen),
            "shapes_at_least_0.95x": sum(r >= 0.95 for r in ratios),
            "shapes_at_least_0.95x_per_pass": [sum(r >= 0.95 for r in ratios_in_pass) for ratios_in_pass in per_pass],
            "min_speed_ratio_ours_vs_torch": worst["speed_ratio_ours_vs_torch"],
            "min_at": worst["layer"],
            "median_speed_ratio_ours_vs_torch": statistics.median(ratios),
            "min_speed_ratio_ours_vs_torch_by_min_times": min(r["speed_ratio_ours_vs_torch_min"] for r in chosen),
            "ours_pct_peak_large": {r["layer"]: round(r["timings"]["ours"]["pct_peak"], 1) for r in chosen if _is_large(r)},
        }
    return summary


def _per_pass_counts(counts: list[int]) -> str:
    """`` (passes 6, 7, 8)`` after a count merged from several passes; nothing for one."""
    return f" (passes {', '.join(map(str, counts))})" if len(counts) > 1 else ""


def _summary_table(summary: dict[str, Any]) -> dict[str, Any]:
    columns = [
        "dtype, format, pass",
        "shapes >= 0.95x",
        "worst ours/torch (at)",
        "median ours/torch",
        "worst by min times",
        "ours % peak, large shapes",
    ]
    rows = [
        [
            key,
            f"{e['shapes_at_least_0.95x']}/{e['shapes']}" + _per_pass_counts(e["shapes_at_least_0.95x_per_pass"]),
            f"{e['min_speed_ratio_ours_vs_torch']:.2f}x ({e['min_at']})",
            f"{e['median_speed_ratio_ours_vs_torch']:.2f}x",
            f"{e['min_speed_ratio_ours_vs_torch_by_min_times']:.2f}x",
            ", ".join(f"{layer}: {pct:.0f}%" for layer, pct in e["ours_pct_peak_large"].items()),
        ]
        for key, e in summary.items()
    ]
    return {"title": "Summary: speed of ours relative to torch (torch median time / ours median time)", "columns": columns, "rows": rows}


def _pointwise_tables(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    columns = [
        "group", "layer (C_in->C_out @H=W)", "format", "MACs (M)", "torch ms", "ours ms", "linear ms",
        "speed ours/torch", "per pass", "speed linear/torch", "ours GFLOP/s", "torch GFLOP/s", "ours % peak", "torch % peak",
        "rel. IQR ours/torch",
    ]  # fmt: skip
    tables = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for pass_name in FLOPS_PER_MAC:
            chosen = [r for r in rows if r["dtype"] == dtype and r["pass"] == pass_name]
            if not chosen:
                continue
            body = []
            for r in chosen:
                t = r["timings"]
                body.append([
                    r["group"], r["layer"], r["memory_format"], f"{r['macs'] / 1e6:.1f}",
                    f"{t['torch']['median_ms']:.3f}", f"{t['ours']['median_ms']:.3f}", f"{t['linear']['median_ms']:.3f}",
                    f"{r['speed_ratio_ours_vs_torch']:.2f}x", " / ".join(f"{v:.2f}" for v in r.get("pass_speed_ratios_ours_vs_torch", [])),
                    f"{r['speed_ratio_linear_vs_torch']:.2f}x",
                    f"{t['ours']['gflops']:.1f}", f"{t['torch']['gflops']:.1f}", f"{t['ours']['pct_peak']:.0f}%", f"{t['torch']['pct_peak']:.0f}%",
                    f"{t['ours']['rel_iqr']:.0%} / {t['torch']['rel_iqr']:.0%}",
                ])  # fmt: skip
            peak = chosen[0]["peak_gflops"]
            batch = ", ".join(str(n) for n in sorted({r["n"] for r in chosen}))
            title = f"{dtype}, {pass_name} (N={batch}; GFLOP/s = {FLOPS_PER_MAC[pass_name]} x MACs / median time; peak {peak:.1f} GFLOP/s)"
            tables.append({"title": title, "columns": columns, "rows": body})
    return tables


POINTWISE_NOTES = [
    "ours: models.pointwise_conv2d (a matrix product over channels); torch: nn.Conv2d(kernel_size=1) (oneDNN on CPU, cuDNN on GPU); "
    "linear: F.linear on the (N, H, W, C) view of the input, the 'per-pixel linear layer' (a transposing copy first when the input is NCHW).",
    "All three get the same input tensor in the stated memory format and the same weights. Times are medians of round-robin calls; "
    "with several passes (the run's passes option) each case was timed once per pass, the passes one after another over the whole "
    "suite, and a contender's time is the median of its passes' medians. 'per pass': the ours/torch speed ratio in each pass; "
    "'shapes >= 0.95x (passes a, b, c)': the count in each pass.",
    "speed ours/torch = torch median time / ours median time: above 1 means ours is faster.",
    "FLOPs = 2 x MACs for a forward pass and 6 x MACs for forward + backward (input gradient + weight gradient); "
    "% peak = achieved GFLOP/s / this run's median square-matmul GFLOP/s in the same dtype x 100.",
    "Large shapes: the 'large output' group and the MobileNet v1 layers with C_in >= 512. 'worst by min times' uses each contender's "
    "fastest call instead of its median, a view less sensitive to other processes' load.",
    "The peak is the faster of torch.matmul's square product (MKL for fp32 on CPU, cuBLAS on GPU) and, on CPU, oneDNN's "
    "(its inner product, which pointwise_conv2d's channels_last path runs on); the Machine limits line gives both.",
]


# ---------------------------------------------------------------------------------------------
# Suite: blocks


# (stage, N, C_in, C_out, H=W)
BLOCK_SHAPES: dict[str, list[tuple[str, int, int, int, int]]] = {
    "full": [("cifar", 32, 64, 64, 32), ("cifar", 32, 128, 128, 16), ("imagenet", 8, 128, 128, 56)],
    "tiny": [("tiny", 2, 8, 8, 6)],
}


def _block_fns(models: dict[str, nn.Module], x: torch.Tensor, backward: bool) -> dict[str, Callable[[], object]]:
    """Per block one zero-argument call: eval forward without grad, or train-mode forward + backward."""
    fns: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        if not backward:
            model.eval()

            @torch.no_grad()
            def forward(model: nn.Module = model) -> object:
                return model(x)

            fns[name] = forward
            continue
        model.train()
        xin = x.detach().requires_grad_()  # a block inside a network passes a gradient to its input
        params = [xin, *model.parameters()]
        grad_out = torch.randn_like(model(xin).detach())

        def step(model: nn.Module = model, xin: torch.Tensor = xin, params: list = params, grad_out: torch.Tensor = grad_out) -> object:
            return torch.autograd.grad(model(xin), params, grad_out)

        fns[name] = step
    return fns


@register_suite("blocks")
def blocks_suite(ctx: BenchContext) -> dict[str, Any]:
    """Every block in ``models.BLOCKS`` at CIFAR and ImageNet stage shapes: a roofline table and plot.

    Per block and shape: MACs (fvcore), bytes moved and arithmetic intensity of the forward pass,
    eval-mode forward time and train-mode forward + backward time, GFLOP/s and % of peak, and
    the roofline's attainable GFLOP/s ``min(peak, intensity x bandwidth)``. The blocks of one
    shape are timed round-robin.
    """
    device, rows = ctx.device, []
    bandwidth = ctx.bandwidth["gb_per_s"]
    for stage, n, c_in, c_out, hw in BLOCK_SHAPES[ctx.options.size]:
        torch.manual_seed(0)
        models = {name: block(c_in, c_out, 1) for name, block in BLOCKS.items()}
        costs = {name: measure_cost(model, (n, c_in, hw, hw)) for name, model in models.items()}
        for dtype_name in ctx.options.dtypes:
            dtype = DTYPES[dtype_name]
            models = {name: model.to(device, dtype) for name, model in models.items()}
            x = torch.randn(n, c_in, hw, hw, device=device, dtype=dtype)
            moved = {name: bytes_moved(model, x) for name, model in models.items()}
            timed = {pass_name: ctx.time(_block_fns(models, x, pass_name == "fwd+bwd")) for pass_name in FLOPS_PER_MAC}
            peak = ctx.peak[dtype_name]["gflops"]
            for name in models:
                macs = costs[name]["macs"]
                flops = 2 * macs
                intensity = flops / moved[name]["bytes"]
                attainable = min(peak, intensity * bandwidth)
                row: dict[str, Any] = {
                    **ctx.record(dtype_name),
                    "block": name, "stage": stage, "n": n, "c_in": c_in, "c_out": c_out, "h": hw, "w": hw,
                    "params": costs[name]["params"], "macs": macs, "flops": flops,
                    "bytes": moved[name]["bytes"], "bytes_read": moved[name]["read"], "bytes_written": moved[name]["written"],
                    "bytes_by_op": moved[name]["by_op"], "intensity": intensity,
                    "peak_gflops": peak, "bandwidth_gb_per_s": bandwidth, "attainable_gflops": attainable,
                }  # fmt: skip
                for pass_name, timings in timed.items():
                    stats = dict(timings[name])
                    pass_flops = FLOPS_PER_MAC[pass_name] * macs
                    stats["flops"] = pass_flops
                    stats["gflops"] = gflops(pass_flops, stats["median_ms"])
                    stats["pct_peak"] = 100 * stats["gflops"] / peak
                    stats["rel_iqr"] = stats["iqr_ms"] / stats["median_ms"]
                    row[pass_name] = stats
                row["pct_attainable_fwd"] = 100 * row["fwd"]["gflops"] / attainable
                rows.append(row)
                log.info(
                    "blocks %-8s %3d->%-3d @%-3d %s %-17s MACs %7.1fM  intensity %6.1f FLOP/B  fwd %8.3f ms %6.1f GFLOP/s (%4.1f%% peak)",
                    stage, c_in, c_out, hw, dtype_name, name, macs / 1e6, intensity, row["fwd"]["median_ms"], row["fwd"]["gflops"], row["fwd"]["pct_peak"],
                )  # fmt: skip
    plot = ctx.out / "blocks_roofline.png"
    _roofline_plot(rows, ctx.peak, bandwidth, plot)
    ctx.files.append(str(plot))
    return {"results": rows, "tables": _blocks_tables(rows), "notes": BLOCKS_NOTES, "plot": str(plot)}


def _blocks_tables(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    columns = [
        "block", "stage (N, C_in->C_out @H=W)", "MACs (M)", "MB moved", "FLOP/byte", "roof GFLOP/s",
        "fwd ms", "fwd GFLOP/s", "fwd % peak", "fwd % roof", "fwd+bwd ms", "fwd+bwd GFLOP/s", "fwd+bwd % peak", "rel. IQR fwd",
    ]  # fmt: skip
    tables = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        chosen = [r for r in rows if r["dtype"] == dtype]
        body = [
            [
                r["block"],
                f"{r['stage']} ({r['n']}, {r['c_in']}->{r['c_out']} @{r['h']})",
                f"{r['macs'] / 1e6:.1f}",
                f"{r['bytes'] / 1e6:.1f}",
                f"{r['intensity']:.1f}",
                f"{r['attainable_gflops']:.0f}",
                f"{r['fwd']['median_ms']:.3f}",
                f"{r['fwd']['gflops']:.1f}",
                f"{r['fwd']['pct_peak']:.1f}%",
                f"{r['pct_attainable_fwd']:.0f}%",
                f"{r['fwd+bwd']['median_ms']:.3f}",
                f"{r['fwd+bwd']['gflops']:.1f}",
                f"{r['fwd+bwd']['pct_peak']:.1f}%",
                f"{r['fwd']['rel_iqr']:.0%}",
            ]
            for r in chosen
        ]
        title = (
            f"{dtype}: peak {chosen[0]['peak_gflops']:.1f} GFLOP/s (square matmul), bandwidth {chosen[0]['bandwidth_gb_per_s']:.1f} GB/s (copy), "
            f"ridge at {chosen[0]['peak_gflops'] / chosen[0]['bandwidth_gb_per_s']:.1f} FLOP/byte"
        )
        tables.append({"title": title, "columns": columns, "rows": body})
    return tables


BLOCKS_NOTES = [
    "Blocks as built by models.BLOCKS[name](C_in, C_out, 1) with their defaults (3x3 kernels, BatchNorm, no SE; "
    "inverted_residual expands 6x, bottleneck reduces 4x); NCHW; torch's convolutions.",
    "MACs: experiments.cost.measure_cost (conv + linear multiply-adds, fvcore). FLOPs = 2 x MACs; fwd+bwd counts 6 x MACs. "
    "Elementwise work (BatchNorm, activations, adds) is not counted as FLOPs.",
    "Bytes moved (forward): every aten op reads each tensor argument once and writes each output once (weights and BatchNorm "
    "statistics included, views free, no cache reuse between ops); elements x dtype size. Intensity = FLOPs / bytes.",
    "Roof = min(peak, intensity x bandwidth), both measured in this run; % roof = achieved fwd GFLOP/s / roof. The peak is the "
    "faster of torch.matmul's square product (MKL for fp32 on CPU) and, on CPU, oneDNN's (the Machine limits line gives both).",
    "The bytes model assumes nothing stays in cache between ops, an upper bound on DRAM traffic: activations of a few MB to "
    "tens of MB partly stay in a server CPU's last-level cache, so memory-bound blocks can reach or pass the DRAM roof.",
    "fwd: eval mode under torch.no_grad(); fwd+bwd: train mode, gradients of the input and every parameter.",
]


def _roofline_plot(rows: list[dict[str, Any]], peak: dict[str, dict[str, Any]], bandwidth: float, path: Path) -> None:
    """Achieved forward GFLOP/s against arithmetic intensity (log-log), under the measured peak and bandwidth roofs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 5), squeeze=False)
    colors = dict(zip(BLOCKS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = dict(zip(dict.fromkeys(f"{r['stage']} {r['c_in']}@{r['h']}" for r in rows), "osD^v"))
    for ax, dtype in zip(axes[0], dtypes):
        chosen = [r for r in rows if r["dtype"] == dtype]
        top = peak[dtype]["gflops"]
        intensities = [r["intensity"] for r in chosen]
        lo, hi = min(intensities) / 3, max(max(intensities) * 3, 3 * top / bandwidth)
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(
            xs,
            [min(top, bandwidth * v) for v in xs],
            color="black",
            lw=1.5,
            label=f"roof: {bandwidth:.1f} GB/s x intensity, {top:.0f} GFLOP/s",
        )
        ax.axhline(top, color="black", ls=":", lw=1)
        for r in chosen:
            shape = f"{r['stage']} {r['c_in']}@{r['h']}"
            ax.scatter(r["intensity"], r["fwd"]["gflops"], color=colors.get(r["block"], "gray"), marker=markers[shape], s=45, zorder=3)
        for name, color in colors.items():
            ax.scatter([], [], color=color, label=name)
        for shape, marker in markers.items():
            ax.scatter([], [], color="gray", marker=marker, label=shape)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte moved, forward)")
        ax.set_ylabel("achieved GFLOP/s (2 x MACs / median forward time)")
        where = chosen[0]["device_name"] + ("" if chosen[0]["device"].startswith("cuda") else f", {chosen[0]['threads']} threads")
        ax.set_title(f"{dtype}: blocks on the roofline ({where})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Running and writing


def measure_machine(device: torch.device, options: BenchOptions) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """This run's matmul peak per dtype in ``options.dtypes`` and its copy bandwidth."""
    tiny, gpu = options.size == "tiny", device.type == "cuda"
    reps = {"repeats": 2, "warmup": 1} if tiny else {}
    # A GPU needs bigger problems to reach its peak: a 2048 bf16 product is ~20 us on an H100, launch-bound;
    # and a copy far larger than its L2 (50 MB on an H100).
    n, mbytes = (256, 4) if tiny else (8192, 1024) if gpu else (2048, 256)
    peak = {name: measure_matmul_peak(device, DTYPES[name], n, **reps) for name in options.dtypes}
    bandwidth = measure_bandwidth(device, mbytes, **(reps or {"repeats": 20, "warmup": 2}))
    for name, p in peak.items():
        log.info("peak %s: %.1f GFLOP/s (median of %d square %d products, %s)", name, p["gflops"], p["repeats"], p["n"], _peak_source(p))
    log.info(
        "bandwidth: %.1f GB/s (copy of %d MB; best %.1f)", bandwidth["gb_per_s"], bandwidth["bytes"] // 2**21, bandwidth["best_gb_per_s"]
    )
    return peak, bandwidth


def _noise(report: dict[str, Any]) -> dict[str, Any]:
    """How noisy the timings were: relative IQR (IQR / median) over every timed call set of the report."""
    rel = []
    for row in report["results"]:
        for value in row.values():
            if isinstance(value, dict) and "rel_iqr" in value:
                rel.append(value["rel_iqr"])
            elif isinstance(value, dict):
                rel.extend(v["rel_iqr"] for v in value.values() if isinstance(v, dict) and "rel_iqr" in v)
    if not rel:
        return {}
    rel.sort()
    return {
        "timed_sets": len(rel),
        "median_rel_iqr": statistics.median(rel),
        "p90_rel_iqr": rel[int(0.9 * (len(rel) - 1))],
        "max_rel_iqr": rel[-1],
    }


def run_benchmarks(suite: str, options: BenchOptions, out: str | Path = "benchmarks") -> dict[str, Any]:
    """Run one registered suite (or ``"all"``), write ``<out>/<suite>.json`` and ``<out>/<suite>.md`` per suite.

    Args:
        suite: a name in :data:`SUITES`, or ``"all"`` for every registered suite in order.
        options: devices, threads, timing and sizes.
        out: the output directory (created); a ``size="tiny"`` run aimed at the committed
            ``benchmarks/`` goes to :data:`TINY_DIR` instead (see :func:`output_dir`).

    Returns:
        ``{"suite", "files", "reports": {name: report}}``; each report has ``suite``, ``env``,
        ``options``, ``peak``, ``bandwidth``, ``noise``, ``results``, ``tables``, ``notes``.

    Raises:
        ValueError: on an unknown suite (the message lists the choices) or bad options.
    """
    if suite != "all" and suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from: {', '.join([*SUITES, 'all'])}")
    names = list(SUITES) if suite == "all" else [suite]
    device = resolve_device(options.device)
    out = output_dir(out, options.size)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    malloc = set_malloc(options.malloc) if device.type == "cpu" else "n/a"
    try:
        env = {
            **env_info(device),
            "cpu_flags": _cpu_flags(),
            "cpu_count": os.cpu_count(),
            "malloc": malloc,
            "native": _native_status(device),
        }
        log.info("benchmark %s on %s (%s), %d threads, torch %s", suite, device, env["device_name"], env["threads"], env["torch"])
        peak, bandwidth = measure_machine(device, options)
        reports, files = {}, []
        for name in names:
            ctx = BenchContext(options=options, device=device, env=env, peak=peak, bandwidth=bandwidth, out=out)
            started, load_before, start = now(), _load(), time.perf_counter()
            with fp32_math(device, name in IEEE_FP32_SUITES) as fp32:
                body = SUITES[name](ctx)
            report = {
                "suite": name, "started": started, "seconds": round(time.perf_counter() - start, 1), "env": env, "fp32_math": fp32,
                "load_avg_1_5_15min": {"before": load_before, "after": _load()}, "options": asdict(options),
                "peak": peak, "bandwidth": bandwidth, **body,
            }  # fmt: skip
            report["peak_after"] = {
                d: measure_matmul_peak(device, DTYPES[d], p["n"], repeats=p["repeats"])["gflops"] for d, p in peak.items()
            }
            report["noise"] = _noise(report)
            json_path, md_path = out / f"{name}.json", out / f"{name}.md"
            write_json(json_path, report)
            md_path.write_text(markdown_report(report))
            files += [str(json_path), str(md_path), *ctx.files]
            reports[name] = report
            log.info("wrote %s (%.0f s)", ", ".join([str(json_path), str(md_path), *ctx.files]), report["seconds"])
    finally:
        torch.set_num_threads(threads_before)
        if malloc.startswith("steady"):
            set_malloc("default")
    return {"suite": suite, "files": files, "reports": reports}


def _markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


PEAK_DRIFT_TOLERANCE = 0.10  # a matmul peak that moved more than this during a run makes '% peak' unreliable


def peak_drift(report: dict[str, Any], tolerance: float = PEAK_DRIFT_TOLERANCE) -> dict[str, float]:
    """Per dtype, the percent change of the matmul peak from the start of the run to its end, where
    it exceeds ``tolerance``: a sign that other work shared the machine during the run."""
    moved = {}
    for dtype, after in report.get("peak_after", {}).items():
        before = report["peak"][dtype]["gflops"]
        if before > 0 and abs(after / before - 1) > tolerance:
            moved[dtype] = 100 * (after / before - 1)
    return moved


def timing_method(suite: str, device: str, options: dict[str, Any]) -> str:
    """How a report's calls were timed, in words (``options`` as the report records them)."""
    if suite == "train":
        return "wall clock around whole eager training steps (data loading included), after a device sync"
    passes = options.get("passes", 1) if suite == "pointwise" else 1
    over = f"; {passes} passes over the whole suite, each case's time the median of its passes' medians" if passes > 1 else ""
    if not device.startswith("cuda"):
        return "host clock (time.perf_counter) around each call" + over
    calls = options.get("graph_calls", 0)
    if calls:
        return (
            f"CUDA events around replays of a CUDA graph of {calls} calls of a contender, divided by {calls}: device time "
            "without Python, dispatch or launch overhead (a contender that could not be captured is timed eagerly; its "
            "results.json timings say 'eager')" + over
        )
    return "CUDA events around each eager call (Python, dispatch and launch overhead included)" + over


def _peak_source(peak: dict[str, Any]) -> str:
    """Which product gave a matmul peak, its best call, and the other products' medians (older reports timed torch.matmul alone)."""
    backend = peak.get("backend", "torch.matmul")
    others = "".join(f"; {name} {b['gflops']:.1f}" for name, b in peak.get("backends", {}).items() if name != backend)
    return f"{backend}, median; best {peak['best_gflops']:.1f}{others}"


def _native_status(device: torch.device) -> str:
    """Whether pointwise_conv2d's native product (models/native.py) loaded for this run: it decides its CPU paths,
    so a run on another device neither builds it nor reports it."""
    if device.type != "cpu":
        return "n/a (CPU only)"
    from models import native

    native.matmul_out()  # builds it now if it is not built yet, outside any timing
    return native.status()


def markdown_report(report: dict[str, Any]) -> str:
    """A suite's report as Markdown: what produced it, the machine's limits, the tables, how noisy it was."""
    env, noise, load = report["env"], report.get("noise", {}), report["load_avg_1_5_15min"]
    lines = [
        f"# Benchmark: {report['suite']}",
        "",
        f"{env['device_name']} ({env['device']}, {env['threads']} threads, {env['cpu_count']} logical CPUs, flags: {', '.join(env['cpu_flags']) or '-'}), "
        f"torch {env['torch']}, git {env['git_commit']}, malloc {env['malloc']}, native product {env.get('native', 'not recorded')}, "
        f"fp32 math {report.get('fp32_math', 'not recorded')}, started {report['started']}, {report['seconds']} s.",
        "",
        f"Timing: {timing_method(report['suite'], env['device'], report['options'])}.",
        "",
        "Machine limits measured in this run: "
        + ", ".join(f"{d} matmul peak {p['gflops']:.1f} GFLOP/s ({p['n']}^3, {_peak_source(p)})" for d, p in report["peak"].items())
        + f"; copy bandwidth {report['bandwidth']['gb_per_s']:.1f} GB/s (median; best {report['bandwidth']['best_gb_per_s']:.1f}).",
        "",
    ]
    if noise:
        after = ", ".join(f"{d} {v:.1f}" for d, v in report.get("peak_after", {}).items())
        lines += [
            f"Noise: load average (1, 5, 15 min) {load['before']} before, {load['after']} after; matmul peak re-measured after the suite: "
            f"{after} GFLOP/s; relative IQR (IQR / median) of the "
            f"{noise['timed_sets']} timed sets: median {noise['median_rel_iqr']:.0%}, 90th percentile {noise['p90_rel_iqr']:.0%}, "
            f"max {noise['max_rel_iqr']:.0%}. Ratios within about that band of 1.0 are ties.",
            "",
        ]
    moved = peak_drift(report)
    if moved:
        lines += [
            f"**Warning: the matmul peak moved by more than {PEAK_DRIFT_TOLERANCE:.0%} between the start and the end of this run ("
            + ", ".join(f"{d} {pct:+.0f}%" for d, pct in moved.items())
            + "): other work shared the machine, so '% peak' (computed from the peak at the start) is not reliable here.**",
            "",
        ]
    for table in report.get("tables", []):
        lines += [f"## {table['title']}", "", *_markdown_table(table["columns"], table["rows"]), ""]
    if report.get("plot"):
        lines += [f"![roofline]({Path(report['plot']).name})", ""]
    lines += ["## Definitions", "", *(f"- {note}" for note in report.get("notes", [])), ""]
    return "\n".join(lines)


def _config_number(cfg: Any, key: str, kind: type, default: Any = None, low: float = 0, null: bool = False) -> Any:
    """``cfg[key]`` as an int or a finite float ``>= low``, else a ``ValueError`` naming the key and its value.

    No fraction is rounded away: ``threads=1.5``, ``repeats=2.9`` and ``threads=true`` are refused
    (``int()`` would make them 1, 2 and 1); a whole float (``2.0``) or a numeric string (``'3'``)
    passes as the number it names.
    """
    value = cfg.get(key, default)
    want = ("null or " if null else "") + (f"an int >= {low:g}" if kind is int else f"a number >= {low:g} (finite, not nan or inf)")
    number: Any = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number) or (kind is int and not number.is_integer()) or number < low:
        raise ValueError(f"{key}={value!r} must be {want}")
    if kind is int:
        return value if isinstance(value, int) else int(number)
    return number


def options_from_config(cfg: Any) -> BenchOptions:
    """:class:`BenchOptions` from the benchmark config's keys (the script's DictConfig)."""
    dtypes, train = cfg.dtypes, cfg.get("train") or {}
    if not (isinstance(dtypes, str) or OmegaConf.is_list(dtypes) or isinstance(dtypes, (list, tuple))):
        raise ValueError(f"dtypes={dtypes!r} is not valid; give a list of {', '.join(DTYPES)}, e.g. [fp32,bf16]")
    if not (OmegaConf.is_dict(train) or isinstance(train, dict)):
        raise ValueError(f"train={train!r} is not valid; give the train suite's keys, e.g. train.model=separable train.steps=60")
    return BenchOptions(
        device=str(cfg.device),
        threads=None if cfg.threads is None else _config_number(cfg, "threads", int, low=1, null=True),
        repeats=_config_number(cfg, "repeats", int, low=1),
        warmup=_config_number(cfg, "warmup", int),
        min_time_s=_config_number(cfg, "min_time_s", float),
        block=_config_number(cfg, "block", int, 1, low=1),
        passes=_config_number(cfg, "passes", int, 3, low=1),
        graph_calls=_config_number(cfg, "graph_calls", int, 20),
        size=str(cfg.size),
        malloc=str(cfg.get("malloc", "steady")),
        train=dict(train),
        dtypes=tuple(str(d) for d in (dtypes if not isinstance(dtypes, str) else [dtypes])),
    )


from . import bench_train  # noqa: E402, F401  (registers the train suite, which builds on this module)
