"""How the C library keeps the memory that JAX's CPU buffers free between calls."""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2**31 - 1


def reuse_host_memory() -> bool:
    """Makes glibc's malloc keep the large blocks that JAX's CPU buffers free and hand
    them out again, so that calling a jitted function from a Python loop (``fb.attack``
    or ``fb.aggregate`` once per round) stops faulting in fresh pages at every call.

    Every call of a jitted function on XLA's CPU backend allocates its output and its
    large temporaries. glibc maps each block above its mmap threshold (at most 32 MiB,
    and above 64 MiB for any thread but the main one, which is where XLA allocates)
    afresh and unmaps it when freed, so the kernel faults the pages in and zeroes them,
    4 KiB at a time, at every call: ``fb.attack("zero", ...)``, which only writes its
    output, took 140.8 ms at n = 50, d = 1M on a 2-core AMD EPYC (Zen 3) with 48,829 page
    faults a call, and 24.5 ms with none after this call
    (``benchmarks/results/attack_speed.md``).

    Sets three ``mallopt`` parameters: no mapped blocks (``M_MMAP_MAX = 0``: every block
    comes from the heap), one arena (``M_ARENA_MAX = 1``: XLA's threads share the main
    heap, whose size has no cap), and no trimming of the heap's top below 2 GiB
    (``M_TRIM_THRESHOLD``). Memory freed is then kept by the process, not returned to the
    system. A freed block is handed out again once it fits: XLA asks for aligned blocks,
    whose small leftovers glibc keeps aside for a while, so the first calls may still
    take fresh pages (``fb.attack("lie", ...)`` at 25 x 500k: from the third call on, for
    100 MiB more resident memory; a function whose only buffer is its 64 MiB output:
    after a dozen calls, holding a dozen such blocks). It acts on the whole process and
    cannot be undone; call it once at start, before JAX's first operation (a thread that
    has allocated already keeps its own arena). A compiled simulation allocates its
    buffers once per chunk of rounds and gains little.

    Returns whether it took effect: ``False`` where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    settings = [(_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, _INT_MAX)]
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
