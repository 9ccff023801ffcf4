"""Sweeps of qs4d runs and the greedy bit-allocation search, on a Dask cluster.

The package knows nothing of the ``qs4d`` subcommands: the command line
(``qs4d_np.cli.sweep``) hands it a subcommand's argparse parser to validate a
spec against and the function a worker runs for one trial. ``dask.distributed``
is an optional dependency (``pip install qs4d_np[sweep]``), imported only when an
engine is started (``engine.py``).

* ``spec.py``: the sweep spec file and its trials (cartesian product of the axes, zipped axes)
* ``argv.py``: a trial's settings as a subcommand's argv, checked by its own parser
* ``naming.py``: trial names from a stable hash of the settings
* ``manifest.py``: ``DIR/sweep.json``, what is planned and finished (atomic JSON)
* ``engine.py``: the Dask client: a local cluster (127.0.0.1, threads per worker pinned) or a scheduler
* ``worker.py``: the set-up of the local workers (Ctrl-C is left to the sweep)
* ``runner.py``: trials on the engine: retries after lost workers, progress, Ctrl-C
* ``results.py``: ``results.csv`` / ``results.json`` and the accuracy-vs-bits figure
* ``search.py``: greedy bit allocation under an ACE / size / ADC budget
"""
