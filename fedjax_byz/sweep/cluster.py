"""Sweeps on a Ray cluster: every pending batch of the plan is one Ray task.

The driver plans the sweep as ``sweep`` does (``plan.json``), then submits one task per
unfinished batch. A task builds its batch on the worker's own devices (a GPU when the
cluster has them, else one CPU slot), runs it with a checkpoint after every chunk, and
adds its records to the shared results store (``ResultStore`` re-reads the file under a
lock, so workers never drop each other's records). Nothing is returned through Ray but
completion, so:

- a killed worker loses at most its batch's current chunk: Ray retries the task
  (``max_retries``), which resumes from the batch's checkpoint;
- a killed driver loses no finished cell: running the sweep again skips every batch in
  the store and resumes the others from their checkpoints.

The sweep's folder must be on a file system every worker sees (a local folder for a
single-machine cluster, shared storage otherwise), and every worker needs
``fedjax_byz`` installed (``pip install 'fedjax_byz[ray]'``) and the data at the same
path. Workers share the persistent compilation cache when it lives on shared storage
(``$FEDJAX_BYZ_CACHE``).
"""

from __future__ import annotations

import time

from fedjax_byz.registry import ConfigError
from fedjax_byz.sweep.runner import Plan, run_batch_task

MAX_RETRIES = 3


def connect(address: str) -> None:
    """Joins the Ray cluster at ``address`` (``local``: start one on this machine), unless
    this process is connected already."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            "ray: the Ray extra is not installed; pip install 'fedjax_byz[ray]'."
        ) from e
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)


def run_on_ray(plan: Plan, address: str, *, chunk_periods: int = 10, log=print) -> None:
    """Runs ``plan``'s pending batches as Ray tasks and waits for all of them."""
    import ray

    connect(address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    task = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus, max_retries=MAX_RETRIES)(
        run_batch_task
    )
    pending = plan.pending()
    res = ray.cluster_resources()
    log(
        f"ray: {len(pending)} batch(es) on a cluster of {res.get('CPU', 0):g} CPU(s) and "
        f"{res.get('GPU', 0):g} GPU(s), one {'GPU' if gpus else 'CPU'} per task."
    )
    t0 = time.perf_counter()
    waiting = [task.remote(plan, b, chunk_periods) for b in pending]
    while waiting:
        ready, waiting = ray.wait(waiting)
        for ref in ready:
            b = ray.get(ref)
            log(
                f"ray: batch {b + 1}/{len(plan.batches)} done "
                f"({time.perf_counter() - t0:.1f}s, {len(waiting)} running or queued)"
            )
