"""Run trials on a Dask client: skip finished ones, retry those whose worker died, record every end.

A trial is a name and a JSON payload; ``run_trial(payload) -> result`` (a JSON
dict) runs on a worker and must be importable there (a module-level function).
Tasks carry only JSON: the data stay in the trials' run directories, which every
worker sees at the same path.

A trial whose worker dies (the task ends in ``KilledWorker``) is submitted again,
up to ``retries`` more times; ``run_trial`` then continues from what the run
directory holds (the trainer's last checkpoint). A trial that raises is recorded
as failed with its message and not retried: a qs4d error is a property of the
settings. Ctrl-C cancels the running trials and raises ``SweepInterrupted``;
every file written so far is whole (all writes are atomic), so rerunning the
command continues.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from tqdm.auto import tqdm

from qs4d_np.sweep.manifest import Manifest


@dataclasses.dataclass(frozen=True)
class Trial:
    """One trial: its ``name`` (a key of the manifest) and the JSON ``payload`` its worker gets."""

    name: str
    payload: dict[str, Any]


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the running trials were cancelled, the manifest is up to date."""

    def __init__(self, finished: int, total: int):
        super().__init__(f"{finished} of {total} trials finished")
        self.finished, self.total = finished, total


def run_trials(client: Any, run_trial: Callable[[dict[str, Any]], dict[str, Any]], trials: list[Trial],
               manifest: Manifest, *, retries: int = 2, progress: bool = True, desc: str = "trials",
               log: Callable[[str], None] = tqdm.write) -> dict[str, dict[str, Any]]:
    """Run the trials not yet done in ``manifest``; returns name -> result of every done trial
    of ``trials``. Failed trials are in the manifest with their error."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    todo = [t for t in trials if not manifest.done(t.name)]
    bar = tqdm(total=len(trials), initial=len(trials) - len(todo), desc=desc, unit="trial", disable=not progress)
    lost: dict[str, int] = {}  # worker deaths per trial, this run

    def submit(trial: Trial) -> Any:
        manifest.started(trial.name)
        attempt = manifest.trials[trial.name]["attempts"]
        payload = {**trial.payload, "attempt": attempt}
        return client.submit(run_trial, payload, key=f"{trial.name}-a{attempt}", pure=False)

    futures = {}
    try:
        for trial in todo:
            futures[submit(trial)] = trial
        pending = as_completed(list(futures))
        for future in pending:
            trial = futures.pop(future)
            if future.status == "finished":
                manifest.record(trial.name, "done", result=future.result())
                bar.update(1)
            else:
                error = future.exception()
                if isinstance(error, KilledWorker) and lost.get(trial.name, 0) < retries:
                    lost[trial.name] = lost.get(trial.name, 0) + 1
                    log(f"trial {trial.name}: its worker died; retry {lost[trial.name]} of {retries}")
                    retry = submit(trial)
                    futures[retry] = trial
                    pending.add(retry)
                else:
                    reason = (f"its worker died {lost.get(trial.name, 0) + 1} time(s)"
                              if isinstance(error, KilledWorker) else f"{type(error).__name__}: {error}")
                    manifest.record(trial.name, "failed", error=reason)
                    log(f"trial {trial.name} failed: {reason}")
                    bar.update(1)
            future.release()
    except KeyboardInterrupt:
        client.cancel(list(futures))
        finished = sum(manifest.done(t.name) for t in trials)
        raise SweepInterrupted(finished, len(trials)) from None
    finally:
        bar.close()
    return {t.name: manifest.result(t.name) for t in trials if manifest.done(t.name)}
