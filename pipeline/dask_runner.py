"""Running shard jobs on Dask: a local cluster of worker processes, or an existing scheduler.

Each shard is one task; a worker loads the teacher once and keeps it for the shards it is given
(`pipeline.teacher_worker.get_model`). Tasks are retried by Dask if a worker dies, and a shard
only exists once committed, so a lost worker costs at most its current shard.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from pipeline.errors import KdError

log = logging.getLogger(__name__)


def run_on_dask(jobs: list[dict[str, Any]], fn: Callable[[dict[str, Any]], Any], workers: int,
                scheduler: str) -> Iterator[Any]:
    """Run `fn(job)` for every job; yields results as they complete. User errors surface as `KdError`."""
    from distributed import Client, LocalCluster, as_completed

    if not jobs:
        return
    cluster = None
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise KdError(f"cannot reach Dask scheduler {scheduler}: {e}") from None
        else:
            # One thread per process: torch parallelises inside the process, and separate processes
            # keep each worker's model and CUDA context apart.
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
        with client:
            futures = [client.submit(fn, job, key=f"kdcache-shard-{job['shard']['index']:05d}", pure=False)
                       for job in jobs]
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except KdError:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        if cluster is not None:
            cluster.close()
