"""Worker processes that run a sweep's batches on a CPU, one per core.

Two programs running at once in one process share XLA's pool of CPU threads, and the
parallel tasks of their kernels then hop between the two threads: on 2 cores the digits
grid of ``benchmarks/sweep_speed.py`` ran in one of two modes drawn at random per
process, ~3.7 ms per cell and round, or 5.5-7 ms with 30x more context switches and a
third of a core idle (no XLA flag removed the slow one). A process pinned to one core has
a pool of one thread, so nothing hops: two such workers ran it at 3.5-3.6 ms every time.

A worker is a fresh Python running ``serve(core)``: pinned to its core before JAX
starts, it reads tasks ``(plan, b, chunk_periods)`` pickled on its stdin, runs each
(``runner.run_batch_task``: the records go to the store) and answers ``(b, error)``. It
never imports the caller's main module (a script without a ``__main__`` guard may sweep),
and on Linux it ends with the process that started it.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import sys
import traceback


def serve(core: int) -> None:
    """A worker's loop: pin to ``core``, then run tasks from stdin until it closes."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, not into the replies
    from fedjax_byz.sweep.runner import run_batch_task

    while True:
        try:
            plan, b, chunk_periods = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            run_batch_task(plan, b, chunk_periods)
            error = None
        except Exception:
            error = traceback.format_exc()
        pickle.dump((b, error), replies)
        replies.flush()


class Worker:
    """A worker process on ``core``; ``run`` sends it one task and waits for the answer."""

    def __init__(self, core: int):
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from {__name__} import serve; serve({core})"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def run(self, task: bytes) -> None:
        """Runs a pickled ``(plan, b, chunk_periods)``; a failure is raised here."""
        self.process.stdin.write(task)
        self.process.stdin.flush()
        try:
            b, error = pickle.load(self.process.stdout)
        except EOFError:
            raise RuntimeError(
                f"a sweep worker process ended (exit status {self.process.wait()})"
            ) from None
        if error is not None:
            raise RuntimeError(f"batch {b + 1} failed in a sweep worker process:\n{error}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
