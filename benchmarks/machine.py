"""What the benchmark scripts say about the machine and the packages they ran with.

The development machines change from one session to the next (AMD EPYC, Intel Xeon), so
every results file names its CPU model; ratios compare only within one file.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import jax


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name) with its widest vector instructions
    and its L2 and L3 sizes (one model name can cover CPUs of different generations),
    else the platform's processor."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return ", ".join([info["model name"], *filter(None, [vector]), *cache_sizes()])


def cache_sizes() -> list[str]:
    """The first core's L2 and L3 caches as ``"L2 512K"``, from sysfs (empty if absent)."""
    sizes = []
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            level, size = (Path(index, name).read_text().strip() for name in ("level", "size"))
        except OSError:
            continue
        if level in ("2", "3"):
            sizes.append(f"L{level} {size}")
    return sizes


def version(pkg: str) -> str:
    """The installed version of ``pkg``, or "not installed"."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def huge_pages() -> str:
    """The C library and the kernel's transparent-huge-page mode, as a phrase."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            mode = fh.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        mode = "unknown"
    return f"{' '.join(platform.libc_ver())}, transparent huge pages `{mode}`"


# How the results files explain the page faults of fresh buffers (one sentence).
FRESH_BLOCKS = (
    "glibc maps such blocks afresh (above its mmap threshold, at most 32 MiB, and above "
    "64 MiB on any thread but the main one, which is where XLA allocates): the kernel "
    f"faults their pages in and zeroes them at every call, 4 KiB at a time ({huge_pages()} "
    "here)."
)


def child_result(script: str, *args: str) -> dict:
    """The JSON object that ``script --child *args`` prints last, in a fresh Python
    process: the benchmarks' child runs call ``fb.reuse_host_memory()`` before JAX starts,
    which only a fresh process allows."""
    cmd = [sys.executable, script, "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def by_size(table: dict) -> dict:
    """A child's table keyed by ``"NxD"`` strings, keyed by ``(n, d)`` again."""
    return {tuple(map(int, key.split("x"))): value for key, value in table.items()}


def page_faults(fn) -> int:
    """Minor page faults of one call of ``fn()``, after a warm-up call."""
    jax.block_until_ready(fn())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(fn())
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
