"""What the benchmark scripts say about the machine and the packages they ran with.

The development machines change from one session to the next (AMD EPYC, Intel Xeon), so
every results file names its CPU model; ratios compare only within one file.
"""

from __future__ import annotations

import importlib.metadata
import platform


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name), else the platform's processor."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(pkg: str) -> str:
    """The installed version of ``pkg``, or "not installed"."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
