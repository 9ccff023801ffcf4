"""The Dask client a sweep submits its trials to.

Without a scheduler address: a ``LocalCluster`` of ``workers`` worker processes on
this machine, listening on 127.0.0.1 only (scheduler, workers and the dashboard,
port 8787 or a free one; its pages need ``bokeh``). Each worker runs one trial at a time (one Dask
thread) and each trial computes on ``threads`` threads: ``NUMBA_NUM_THREADS`` and
the BLAS / OpenMP thread counts are set in the worker's environment before it
starts, so ``workers x threads`` should not exceed the cores (the default: one
thread per trial, one worker per core). The local scheduler does not retry a
trial whose worker died (``allowed-failures`` 0): the runner does, ``--retries``
times, and counts the attempts.

With ``scheduler``: a client of that existing cluster (``dask scheduler`` /
``dask worker``, dask-jobqueue, ...). Its workers' threads are theirs; the trial
itself caps Numba and BLAS at ``threads`` (see ``qs4d_np.cli.trial``). An address
that does not answer fails within ``connect_timeout`` seconds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import warnings
from typing import Any, Iterator

from qs4d_np.sweep.errors import SweepError

LOCALHOST = "127.0.0.1"
# Environment variables holding a library's thread count; one value for all of them.
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
WORKER_SETUP = "qs4d_np.sweep.worker"  # preload of the local workers (they leave Ctrl-C to the sweep)
INSTALL_HINT = "qs4d sweep needs dask.distributed: pip install 'qs4d_np[sweep]' (or 'dask[distributed]')"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Where trials run: ``scheduler`` address, else a local cluster of ``workers`` processes
    (None: one per ``threads`` cores); ``threads`` per trial."""

    scheduler: str | None = None
    workers: int | None = None
    threads: int = 1
    connect_timeout: float = 10.0

    def local_workers(self) -> int:
        return self.workers if self.workers is not None else max(1, (os.cpu_count() or 1) // self.threads)


def thread_environment(threads: int) -> dict[str, str]:
    """The environment variables that make Numba and the BLAS use ``threads`` threads."""
    return {name: str(threads) for name in THREAD_VARIABLES}


def _distributed() -> Any:
    if importlib.util.find_spec("distributed") is None:
        raise SweepError(INSTALL_HINT)
    import distributed
    return distributed


@contextlib.contextmanager
def connect(config: EngineConfig) -> Iterator[Any]:
    """A ``distributed.Client`` of the engine ``config`` describes; the local cluster is shut down
    (its workers stopped) on exit, also after an error or Ctrl-C."""
    distributed = _distributed()
    import dask

    if config.scheduler is not None:
        try:
            client = distributed.Client(config.scheduler, timeout=f"{config.connect_timeout}s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise SweepError(f"cannot reach the Dask scheduler at {config.scheduler} within "
                             f"{config.connect_timeout:g} s ({exc}); start one with `dask scheduler` and "
                             "workers with `dask worker ADDRESS`, or leave out --scheduler for a local "
                             "cluster") from None
        with client:
            yield client
        return
    env = thread_environment(config.threads)
    settings = {"distributed.scheduler.allowed-failures": 0,
                # the nanny sets these before a worker starts; its defaults pin them to 1
                "distributed.nanny.pre-spawn-environ": {
                    **dask.config.get("distributed.nanny.pre-spawn-environ", {}), **env}}
    with dask.config.set(settings), warnings.catch_warnings():
        # "Port 8787 is already in use" (another cluster has it): the dashboard takes a free port
        warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
        cluster = distributed.LocalCluster(n_workers=config.local_workers(), threads_per_worker=1,
                                           processes=True, host=LOCALHOST, dashboard_address=f"{LOCALHOST}:8787",
                                           env=env, silence_logs=logging.ERROR, preload=[WORKER_SETUP])
    with cluster, distributed.Client(cluster) as client:
        yield client


def dashboard_link(client: Any) -> str | None:
    """The dashboard's address (with a note when ``bokeh``, which draws its pages, is missing here),
    or None when the cluster has none."""
    try:
        info = client.scheduler_info()
    except (OSError, TimeoutError):
        return None
    if "dashboard" not in info.get("services", {}):
        return None
    if importlib.util.find_spec("bokeh") is None:
        return f"{client.dashboard_link} (its pages need bokeh: pip install bokeh)"
    return client.dashboard_link
