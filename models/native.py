"""convlab's native ops, ``torch.ops.convlab.matmul_out`` and its AVX-512 kernels: built from ``models/csrc`` on first use, else absent.

pointwise_conv2d lowers a 1x1 convolution to matrix products. From Python, torch offers fp32 CPU
products only on its BLAS (MKL's ``sgemm``, at half oneDNN's speed on some CPUs, see
``benchmarks/README.md``) or on oneDNN's inner product into a fresh output. ``matmul_out`` calls
``at::native::mkldnn_matmul``, the oneDNN matrix product torch itself runs for bf16 ``mm``/``bmm``:
it reads 2-d or batched 3-d operands by their strides and writes ``out = beta * out + a @ b`` into
a given tensor, so an NCHW image's product lands in place and transposed operands cost no copy.
``linear_out`` is convlab's own fp32 and bf16 kernel for ``x @ w^T + bias`` on AVX-512 CPUs
(``csrc/avx512_linear.cpp``): it adds the bias in the registers, where oneDNN's matmul takes none.
``images_out`` runs the same register tiles on NCHW images, ``w @ x[n] + bias`` per image, fp32;
``rows_backward`` computes a channels_last layer's three gradients in one pass over ``dY``, fp32 and bf16, and
``images_backward`` an NCHW layer's, fp32.

All are compiled into one library, once per torch build and sources, with the C++ compiler found as ``$CXX``,
``c++`` or ``g++`` (about 20 s), into ``$CONVLAB_CACHE`` (default ``~/.cache/convlab``)
``/native/<key>/``. With no compiler, a failed build or ``CONVLAB_NATIVE=0``, :func:`matmul_out`,
:func:`linear_out`, :func:`images_out`, :func:`rows_backward` and :func:`images_backward` return None and pointwise_conv2d runs its
pure-Python lowering instead (one warning says why); on a CPU without AVX-512F only the AVX-512 kernels are
None (``linear_out`` for bf16 also without AVX512_BF16).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["SOURCES", "build", "images_backward", "images_out", "linear_out", "matmul_out", "rows_backward", "status"]

SOURCES = (Path(__file__).parent / "csrc" / "onednn_matmul.cpp", Path(__file__).parent / "csrc" / "avx512_linear.cpp")
_LIBRARY_NAME = "convlab_native.so"


def _compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX`` when set (a command line, such as ``ccache g++``), else ``c++`` or
    ``g++`` on the PATH; None when the program is not found."""
    if os.environ.get("CXX"):
        words = shlex.split(os.environ["CXX"])
        program = shutil.which(words[0]) if words else None
        return shlex.join([program, *words[1:]]) if program else None
    return shutil.which("c++") or shutil.which("g++")


def _command(compiler: str, sources: tuple[Path, ...], target: Path) -> list[str]:
    """The compile-and-link line. ``-fopenmp``: ``at::parallel_for``, a header template, compiles to an OpenMP
    loop only with it (without it, serially); the library then loads the ``libgomp`` torch ships."""
    torch_dir = Path(torch.__file__).parent
    lib = torch_dir / "lib"
    return [
        *shlex.split(compiler), "-O2", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", *map(str, sources), "-o", str(target),
        f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _cache_dir() -> Path:
    return Path(os.environ.get("CONVLAB_CACHE") or Path.home() / ".cache" / "convlab") / "native"


def build(cache: Path | None = None, compiler: str | None = None) -> Path:
    """Compile :data:`SOURCES` against this torch, once per (sources, torch build, compiler); return the library.

    The key hashes all three, so a new torch or an edited source builds afresh. The library is
    written under a temporary name and renamed into place, so processes building at once (a
    Hydra sweep, DDP ranks) never load a half-written file.

    Raises:
        RuntimeError: no C++ compiler, or the build failed (the message has the compiler's first lines).
    """
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    cache = cache or _cache_dir()
    sources = [source.read_bytes() for source in SOURCES]
    key_parts = [*sources, torch.__version__.encode(), str(torch.version.git_version).encode(), compiler.encode()]
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    target = cache / key / _LIBRARY_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / _LIBRARY_NAME
        done = subprocess.run(_command(compiler, SOURCES, partial), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            name = Path(shlex.split(compiler)[0]).name
            raise RuntimeError(f"{name} failed (exit {done.returncode}): " + " | ".join(lines[:3]))
        os.replace(partial, target)
    return target


_STATUS = {"state": "not loaded"}


def _ops_registered() -> bool:
    """Whether this process has loaded a convlab library already. Its ops register once per process: loading a
    second one (built from edited sources after :func:`matmul_out`'s cache was cleared) would register them again,
    which aborts the process, so the first one stays."""
    try:
        torch.ops.convlab.matmul_out  # noqa: B018 (the lookup raises when no library registered the op)
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def matmul_out() -> Callable[..., None] | None:
    """``torch.ops.convlab.matmul_out(a, b, out, beta=0.0)`` when it builds and loads here, else None.

    ``a`` and ``b`` are 2-d, or batched 3-d (a batch of 1 broadcasts over the other's), on CPU in one
    floating dtype; the product ``a @ b`` is written into ``out`` (``beta=1`` adds it to what ``out``
    holds). Operands that are neither contiguous nor the transpose of a contiguous matrix (in 3-d,
    of each matrix in the batch; an ``expand``-ed weight is neither) are first copied by torch. The
    first call builds and loads the library; later calls are free.
    """
    if os.environ.get("CONVLAB_NATIVE", "1") == "0":
        _STATUS["state"] = "off (CONVLAB_NATIVE=0)"
        return None
    if not (sys.platform.startswith("linux") and torch.backends.mkldnn.is_available()):
        _STATUS["state"] = "unavailable (needs Linux and a torch built with oneDNN)"
        return None
    try:
        library = build()
        if not _ops_registered():
            torch.ops.load_library(str(library))
        op = torch.ops.convlab.matmul_out
    except (RuntimeError, OSError, AttributeError) as error:
        _STATUS["state"] = f"unavailable ({error})"
        warnings.warn(f"convlab: native matmul_out {_STATUS['state']}; pointwise_conv2d runs its Python lowering", stacklevel=2)
        return None
    _STATUS["state"] = "loaded"
    return op


# linear_out and images_out write outputs of at least this many bytes with non-temporal stores (see
# functional._forward_product).
STREAM_MIN_BYTES = 4 << 20


@functools.cache
def linear_out(dtype: torch.dtype = torch.float32) -> Callable[..., None] | None:
    """``torch.ops.convlab.linear_out(x, w, bias, out, stream_min_bytes)`` where the library loaded and the CPU has
    the AVX-512 instructions for ``dtype`` (fp32: AVX-512F; bf16: also AVX512_BF16), else None.

    Writes ``x @ w^T + bias`` into ``out``: CPU tensors of one dtype, fp32 or bf16, ``x`` ``(M, K)`` and ``out``
    ``(M, N)`` with unit column strides (any row stride), ``w`` ``(N, K)`` with any strides, ``bias`` ``(N,)``
    or None; in bf16 K must be even. Outputs of at least ``stream_min_bytes`` bytes
    (:data:`STREAM_MIN_BYTES` in convlab) bypass the cache.
    """
    if matmul_out() is None or not torch.ops.convlab.linear_supported(dtype):
        return None
    return torch.ops.convlab.linear_out


def images_out() -> Callable[..., None] | None:
    """``torch.ops.convlab.images_out(w, x, bias, out, stream_min_bytes)`` where :func:`linear_out` runs fp32 here
    (the library loaded, the CPU has AVX-512F), else None.

    Writes ``w @ x[n] + bias[:, None]`` into ``out[n]`` for every image: fp32 CPU tensors, ``x`` ``(N, C, P)``,
    ``out`` ``(N, K, P)`` and ``w`` ``(K, C)`` with unit last strides (any other strides), ``bias`` ``(K,)`` or
    None. Outputs of at least ``stream_min_bytes`` bytes bypass the cache.
    """
    return torch.ops.convlab.images_out if linear_out(torch.float32) is not None else None


def rows_backward(dtype: torch.dtype = torch.float32) -> Callable[..., None] | None:
    """``torch.ops.convlab.rows_backward(grad, x, dwt, db, w=None, dx=None)`` where :func:`linear_out` runs
    ``dtype`` here (fp32 or bf16), else None.

    In one pass over ``grad`` ``(M, K)``, with ``x`` ``(M, C)`` of its dtype: writes ``x^T @ grad`` into ``dwt``
    ``(C, K)`` (fp32, contiguous); when ``db`` ``(K,)`` (fp32) is given, the sum of ``grad``'s rows into it; when
    ``w`` ``(K, C)`` and ``dx`` ``(M, C)`` (both of ``grad``'s dtype) are given, ``grad @ w`` into ``dx``. CPU
    tensors with unit column strides; in bf16 with ``dx``, K must be even. bf16 multiplies pairs and sums in fp32.
    """
    return torch.ops.convlab.rows_backward if linear_out(dtype) is not None else None


def images_backward() -> Callable[..., None] | None:
    """``torch.ops.convlab.images_backward(grad, x, dw, db, wt=None, dx=None)`` where :func:`linear_out` runs fp32
    here (the library loaded, the CPU has AVX-512F), else None.

    In one pass over ``grad`` ``(N, K, P)``, with ``x`` ``(N, C, P)``: writes ``sum_n grad[n] @ x[n]^T`` into ``dw``
    ``(K, C)`` (contiguous); when ``db`` ``(K,)`` (contiguous) is given, the sums of ``grad``'s channel rows into it;
    when ``wt`` ``(C, K)`` and ``dx`` ``(N, C, P)`` are given, ``wt @ grad[n]`` into ``dx[n]``. fp32 CPU tensors
    with unit last strides (any other strides).
    """
    return torch.ops.convlab.images_backward if linear_out(torch.float32) is not None else None


def status() -> str:
    """Where the native ops stand in this process: ``loaded``, ``loaded, no AVX-512 kernel``, ``loaded, AVX-512
    kernel fp32 only``, ``off (...)``, ``unavailable (why)`` or ``not loaded``."""
    if _STATUS["state"] == "loaded" and linear_out() is None:
        return "loaded, no AVX-512 kernel"
    if _STATUS["state"] == "loaded" and linear_out(torch.bfloat16) is None:
        return "loaded, AVX-512 kernel fp32 only"
    return _STATUS["state"]
