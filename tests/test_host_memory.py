"""fb.reuse_host_memory: freed blocks of JAX's CPU buffers are handed out again.

glibc reads its malloc settings for the whole process, so the calls run in subprocesses.
"""

import json
import platform
import subprocess
import sys

import pytest

import fedjax_byz as fb
from fedjax_byz import host_memory

# Page faults of each call of a jitted function with a 64 MiB output (above glibc's
# mmap threshold), after reuse_host_memory() or not (argv[1]).
SCRIPT = """
import json, resource, sys
import fedjax_byz as fb
took = fb.reuse_host_memory() if sys.argv[1] == "reuse" else None
import jax, jax.numpy as jnp
double = jax.jit(lambda x: 2 * x)
x = jnp.ones((16, 1 << 20), jnp.float32)
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(double(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("RESULT" + json.dumps({"took": took, "faults": faults}))
"""
PAGES = (16 << 20) * 4 // 4096  # the output's 4 KiB pages


def _faults(mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_reused_blocks_are_not_faulted_in_again():
    out = _faults("reuse")
    assert out["took"] is True
    # The first call faults its blocks in; later calls get them back from the heap, once
    # glibc has merged the small leftovers of aligned blocks (a dozen calls at most here).
    assert min(out["faults"][1:]) < PAGES // 20, out["faults"]


def test_it_declines_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(host_memory.ctypes, "CDLL", None)  # must not be reached
    assert fb.reuse_host_memory() is False
