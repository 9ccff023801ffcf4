"""Set-up of the local cluster's worker processes (a Dask preload: ``dask_setup`` runs in each one).

Ctrl-C in a terminal sends SIGINT to the whole process group, the local workers
included. The sweep's own process handles it (cancels the trials and shuts the
cluster down); a worker that raised KeyboardInterrupt as well would only print
tracebacks while it is being stopped, so the workers ignore SIGINT. A restarted
worker (after one was lost) runs this again.
"""
from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
