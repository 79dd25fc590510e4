"""Running shard jobs on Dask: a local cluster of worker processes, or an existing scheduler.

Each shard is one task; a worker loads the teacher once and keeps it for the shards it is given
(`pipeline.teacher.worker.get_model`). Tasks are retried by Dask if a worker dies, and a shard
only exists once committed, so a lost worker costs at most its current shard.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pipeline.errors import KdError

if TYPE_CHECKING:
    from pipeline.teacher.worker import ShardJob

log = logging.getLogger(__name__)


def run_on_dask(jobs: list["ShardJob"], fn: Callable[["ShardJob"], Any], workers: int,
                scheduler: str, threads: int = 0) -> Iterator[Any]:
    """Run `fn(job)` for every job; yields results as they complete. User errors surface as `KdError`.

    `threads`: BLAS/OpenMP threads of each local worker process. Dask's nanny would start them with
    OMP_NUM_THREADS=1 (its `pre-spawn-environ`), leaving cores idle when workers < cores.
    """
    from distributed import Client, LocalCluster, as_completed

    if not jobs:
        return
    # distributed configures its own loggers at INFO ("Nanny ... closed", "Closing scheduler"): a
    # failing run must end with the one error line, not a screen of shutdown chatter.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.WARNING))
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
            n = str(threads or 1)
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.CRITICAL,  # failures reach us via the future
                                   env={"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n})
            client = Client(cluster)
        with client:
            futures = [client.submit(fn, job, key=f"kdcache-shard-{job.shard['index']:05d}", pure=False)
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
