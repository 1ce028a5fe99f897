"""Native CPU kernels, called from jitted code through XLA's FFI.

XLA's CPU backend multiplies a block of a few dozen rows by its transpose at 35-50
GFLOP/s on one core, whatever the formulation (one dot, column blocks, batched dots, the
XNNPACK, oneDNN and YNN flags: all measured here), so every rule and attack built on
the Gram matrix ``G Gᵀ`` (Krum, Multi-Krum, Bulyan, RFA, NNM, CAF, Min-Max, Mimic, ...)
ran at about numpy's single-threaded ``G @ G.T``. ``kernels.cc`` sums the product by
register tiles on all the cores this process may use, only on and above the diagonal,
accumulating in float64 across cache blocks: about 2.5x faster than XLA here at
(25, 500k) and (50, 1M), and closer to the exact product. Its row pass (``‖g_i − c‖²``
for every row) reads the matrix on every core too: 26 GB/s here against 14 GB/s on one
core, which is where XLA runs a reduction over the columns. Both can project the rows on
a vector as they read them. The moments kernel (coordinate-wise masked mean and
variance) splits the columns over the cores and sums 64 columns at a time in registers,
reading each strip of rows twice while it is in L1: 25 x 500k in 1.0 ms in a C++
harness here (1.7 ms when each sum was loaded and stored for every row), 2-3 ms called
from JAX, against 5.0 ms for XLA's blocked pass. The moment-products kernel gives the search attacks
(Min-Max, Min-Sum, STRIKE) the moments and their products in one read of the matrix.
Under ``vmap`` (a sweep's batch of cells) each kernel is one call on the whole batch
``[..., n, d]``, looping over its matrices in place: XLA's sequential fallback sliced a
copy of every matrix out of the batch, and ran several times slower inside the guard's
conditional (4 x [25, 200k], vmapped: cclip 19 -> 8 ms, Krum 22 -> 10, bucketing+Krum
72 -> 48). The sorting kernels (``sorted_sum``, ``closest_mean``) run Batcher's network
over the rows on kLanes columns at a time, the values in registers within groups of 16
rows and in a buffer in L1 across them, with the window's size a number at run time;
they take over from XLA's network where its fused loop gets large
(``ops.sorts_natively``): Meamed at 100 x 100k 13.4 -> 6.0 ms, RB-TM 6.9 -> 5.3,
Bulyan 36 -> 16, and at n = 128 Meamed 975 -> 7.9. They also sum the rows of small
``[n, n]`` matrices by rank (``ops.sorted_row_sums``: Krum's scores, NNM's neighbours,
SignGuard's medians), 0.3 -> 0.04 ms at n = 100 and 143 -> 3.9 ms at n = 1000 against
counting ranks.

The kernel is compiled on first use with the system's C++ compiler (``$CXX``, else
``c++``), for this CPU (``-march=native``), against the FFI headers jaxlib ships, into
``$FEDJAX_BYZ_CACHE/native`` (default ``~/.cache/fedjax_byz/native``), under a name that hashes the
source, jaxlib's version, the compiler and the CPU, so a home shared by different
machines keeps one build per CPU. Where no compiler works, or with
``FEDJAX_BYZ_NATIVE=0``, ``available`` is false and callers keep XLA's own product (the
reason is logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
_TARGET = "fedjax_byz_gram"
_ROWS_TARGET = "fedjax_byz_row_sq_dists"
_MOMENTS_TARGET = "fedjax_byz_moments"
_PRODUCTS_TARGET = "fedjax_byz_moment_products"
_SORTED_SUM_TARGET = "fedjax_byz_sorted_sum"
_CLOSEST_TARGET = "fedjax_byz_closest_mean"
_HANDLERS = {  # FFI target: the handler's symbol in kernels.cc
    _TARGET: "FedjaxByzGram",
    _ROWS_TARGET: "FedjaxByzRowSqDists",
    _MOMENTS_TARGET: "FedjaxByzMoments",
    _PRODUCTS_TARGET: "FedjaxByzMomentProducts",
    _SORTED_SUM_TARGET: "FedjaxByzSortedSum",
    _CLOSEST_TARGET: "FedjaxByzClosestMean",
}
FACTORS = ("one", "mean", "std", "offset")  # the direction's F, as the kernel numbers it
_log = logging.getLogger(__name__)


def available(dtype) -> bool:
    """Whether the native kernels run for a matrix of ``dtype`` on the default backend."""
    return jax.default_backend() == "cpu" and dtype == jnp.float32 and _registered()


def gram(
    G: jax.Array,
    center: jax.Array | None = None,
    weights: jax.Array | None = None,
    project: jax.Array | None = None,
    *,
    threads: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(G − 1cᵀ)(G − 1cᵀ)ᵀ`` by ``kernels.cc`` on ``threads`` cores, centred on ``c =
    center [d]``, or on the weighted mean ``c = Σ_i w_i g_i`` of ``weights [n]`` (computed
    in the kernel, block by block), or not at all; the rows' squared norms ``‖g_i‖²``
    (uncentred) and, given ``project = v [d]``, the projections ``⟨g_i − c, v⟩`` (zeros
    without), from the same pass. ``f32[n, d] -> (f32[n, n], f32[n], f32[n])``. Raises
    where the kernels are not ``available``. The results do not depend on ``threads``."""
    n = G.shape[0]
    rows = jax.ShapeDtypeStruct((n,), G.dtype)
    call = _ffi_call(_TARGET, (jax.ShapeDtypeStruct((n, n), G.dtype), rows, rows))
    return call(G, _or_empty(center), _or_empty(weights), _or_empty(project), threads=int(threads))


def row_sq_dists(
    G: jax.Array,
    center: jax.Array | None = None,
    project: jax.Array | None = None,
    *,
    threads: int,
) -> tuple[jax.Array, jax.Array]:
    """``‖g_i − c‖²`` for every row (``‖g_i‖²`` without ``center``) and, given ``project =
    v [d]``, ``⟨g_i − c, v⟩`` (zeros without), one pass on ``threads`` cores. ``f32[n, d]
    -> (f32[n], f32[n])``. Raises where the kernels are not ``available``; the results do
    not depend on ``threads``."""
    rows = jax.ShapeDtypeStruct(G.shape[:1], G.dtype)
    call = _ffi_call(_ROWS_TARGET, (rows, rows))
    return call(G, _or_empty(center), _or_empty(project), threads=int(threads))


def moments(
    G: jax.Array, a: jax.Array, b: jax.Array, *, threads: int
) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise ``μ = aᵀG`` and ``v = bᵀ(G − 1μᵀ)²`` for row weights ``a, b [n]``
    (a mean and a variance), each block of columns read twice while in cache, on
    ``threads`` cores. ``f32[n, d] -> (f32[d], f32[d])``. Raises where the kernels are not
    ``available``; the results do not depend on ``threads``."""
    column = jax.ShapeDtypeStruct(G.shape[1:], G.dtype)
    return _ffi_call(_MOMENTS_TARGET, (column, column))(G, a, b, threads=int(threads))


def moment_products(
    G: jax.Array,
    a: jax.Array,
    b: jax.Array,
    reference: jax.Array | None = None,
    *,
    factor: str,
    sign: bool,
    scale: float,
    gram: bool,
    threads: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``moments`` and the products of the search attacks in one read of ``G``: ``μ = aᵀG``,
    ``σ = √(bᵀ(G − 1μᵀ)²)``, the direction ``u = scale · F ⊙ sign(μ − r)`` (F = 1, μ, σ or
    μ − r by ``factor``; the sign only with ``sign``; ``r = reference`` or zero), and for ``x_i =
    g_i − μ`` the projections ``⟨x_i, u⟩`` with ``X Xᵀ`` (``gram``; only between the rows
    with ``a_i ≠ 0``, zero elsewhere) or ``‖x_i‖²``, each block of columns read while in
    cache. ``f32[n, d] -> (f32[d], f32[d], f32[n, n] |
    f32[n], f32[n])``. Raises where the kernels are not ``available``; the results do not
    depend on ``threads``."""
    n, d = G.shape
    column = jax.ShapeDtypeStruct((d,), G.dtype)
    second = jax.ShapeDtypeStruct((n, n) if gram else (n,), G.dtype)
    rows = jax.ShapeDtypeStruct((n,), G.dtype)
    call = _ffi_call(_PRODUCTS_TARGET, (column, column, second, rows))
    attrs = dict(gram=bool(gram), factor=FACTORS.index(factor), sign=bool(sign))
    attrs.update(scale=np.float32(scale), threads=int(threads))
    return call(G, a, b, _or_empty(reference), **attrs)


def sorted_sum(
    G: jax.Array, w: jax.Array, valid=None, fill=None, *, mix=None, threads: int
) -> jax.Array:
    """``Σ_r w_r S_r`` per coordinate over the ranks with ``w_r ≠ 0``, ``S_0 <= ... <=
    S_{n−1}`` the column's values sorted by a sorting network on ``threads`` cores: the
    values of ``G``'s rows, or of the mixed rows ``M G`` for ``mix = M [n, p]`` (formed
    column by column, never written), rows where ``valid [n]`` is false replaced by
    ``fill [n]`` first. ``f32[p, d] -> f32[d]`` (``ops.sorted_sum``). Raises where the
    kernels are not ``available``; the result does not depend on ``threads``."""
    call = _ffi_call(_SORTED_SUM_TARGET, (jax.ShapeDtypeStruct(G.shape[1:], G.dtype),))
    rows = (_or_empty(mix), _or_empty(valid), _or_empty(fill))
    return call(G, *rows, w, threads=int(threads))[0]


def closest_mean(
    G: jax.Array, k: jax.Array, valid=None, fill=None, *, mix=None, starts: int, threads: int
) -> jax.Array:
    """Per coordinate, the mean of the ``k`` sorted values closest to the median, the
    window found by comparing ``starts`` exact sums (``aggregators.coordinate.closest_mean``),
    the rows mixed and replaced as in ``sorted_sum``; ``k`` is ``f32[1]``. ``f32[p, d] ->
    f32[d]``. Raises where the kernels are not ``available``; the result does not depend on
    ``threads``."""
    call = _ffi_call(_CLOSEST_TARGET, (jax.ShapeDtypeStruct(G.shape[1:], G.dtype),))
    rows = (_or_empty(mix), _or_empty(valid), _or_empty(fill))
    return call(G, *rows, k, starts=int(starts), threads=int(threads))[0]


def _or_empty(v: jax.Array | None) -> jax.Array:
    return jnp.zeros(0, jnp.float32) if v is None else v


def _ffi_call(target: str, shapes):
    if not _registered():
        raise RuntimeError("fedjax_byz.native: the kernels are unavailable here (available())")
    return jax.ffi.ffi_call(target, shapes, vmap_method="broadcast_all")


@functools.cache
def _registered() -> bool:
    if os.environ.get("FEDJAX_BYZ_NATIVE", "1") == "0":
        return False
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        _log.warning("fedjax_byz: native kernels unavailable, using XLA's operations: %s", detail)
        return False
    for target, symbol in _HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
    return True


def _build() -> pathlib.Path:
    """The kernel's shared library, compiled unless this source, jaxlib, compiler and CPU
    already have one in the cache."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (set CXX)")
    flags = ["-O3", "-march=native", "-fno-math-errno", "-std=c++20", "-shared", "-fPIC", "-w"]
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), jaxlib.__version__, compiler, " ".join(flags), _cpu()):
        key.update(part if isinstance(part, bytes) else part.encode())
    root = os.environ.get("FEDJAX_BYZ_CACHE", os.path.expanduser("~/.cache/fedjax_byz"))
    cache = pathlib.Path(root) / "native"
    path = cache / f"gram-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # then an atomic rename
        built = pathlib.Path(tmp) / path.name
        include = ["-isystem", jax.ffi.include_dir()]
        command = [compiler, *flags, *include, str(_SOURCE), "-o", str(built), "-lpthread"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(built, path)
    return path


def _cpu() -> str:
    """What ``-march=native`` compiles for: the CPU's model and instruction-set flags."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
