"""``DIR/sweep.json``: what a sweep (or search) directory was made for and which trials are finished.

::

    {"kind": "sweep" | "search",
     "identity": {...},                 # the spec (sweep) or the search settings: must match on a rerun
     "trials": {NAME: {"settings": {...}, "status": "pending" | "done" | "failed",
                       "attempts": int, "result": {...} | null, "error": str | null}}}

Only the process driving the sweep writes it, after every trial that ends, and
always atomically (``qs4d_np.io``): a killed sweep leaves the previous version
whole. A trial's files live in its run directory ``DIR/trials/NAME``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qs4d_np.io import atomic_write_json, load_json
from qs4d_np.sweep.errors import SweepError

MANIFEST = "sweep.json"
TRIALS = "trials"
STATUSES = ("pending", "done", "failed")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.path: leaf}; a non-dict is one leaf."""
    if not isinstance(value, dict):
        return {prefix or "(value)": value}
    out: dict[str, Any] = {}
    for key, sub in value.items():
        out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def identity_differences(recorded: Any, given: Any) -> list[str]:
    """One line per dotted key whose value differs between the recorded and the given identity."""
    old, new = _flatten(recorded), _flatten(given)
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            lines.append(f"{key}: {old[key]!r} recorded, absent now")
        elif key not in old:
            lines.append(f"{key}: absent in the recorded one, {new[key]!r} now")
        elif old[key] != new[key]:
            lines.append(f"{key}: {old[key]!r} recorded, {new[key]!r} now")
    return lines


class Manifest:
    """The trials of one sweep directory and their state; ``open`` it, ``add`` trials, ``record`` ends."""

    def __init__(self, folder: Path, kind: str, identity: dict[str, Any], trials: dict[str, dict[str, Any]]):
        self.folder = folder
        self.kind = kind
        self.identity = identity
        self.trials = trials

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    def run_dir(self, name: str) -> Path:
        return self.folder / TRIALS / name

    @classmethod
    def open(cls, folder: str | Path, kind: str, identity: dict[str, Any]) -> "Manifest":
        """The manifest of ``folder`` (created when the folder holds none).

        A folder made for another identity is refused with the differences named; a non-empty
        folder without a manifest is refused too (it is not a sweep directory; nothing is written).
        """
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise SweepError(f"{folder} exists and is not a {kind} directory (no {MANIFEST}): "
                                 "choose a new --out (nothing was written)")
            manifest = cls(folder, kind, identity, {})
            manifest.save()
            return manifest
        data = load_json(path)
        if not isinstance(data, dict) or not {"kind", "identity", "trials"} <= set(data):
            raise SweepError(f"{path} is not a qs4d sweep manifest")
        if data["kind"] != kind:
            raise SweepError(f"{folder} holds a {data['kind']}, not a {kind}: choose another --out")
        diffs = identity_differences(data["identity"], identity)
        if diffs:
            raise SweepError(f"{folder} was made for another {kind} (nothing was run or written); "
                             "rerun with the recorded settings or choose another --out. Differences:\n  "
                             + "\n  ".join(diffs))
        return cls(folder, kind, data["identity"], dict(data["trials"]))

    def save(self) -> None:
        atomic_write_json(self.path, {"kind": self.kind, "identity": self.identity, "trials": self.trials})

    def add(self, name: str, settings: dict[str, Any]) -> None:
        """Plan a trial (kept as it is when the manifest already has it). Call ``save`` after."""
        if name not in self.trials:
            self.trials[name] = {"settings": settings, "status": "pending", "attempts": 0,
                                 "result": None, "error": None}

    def done(self, name: str) -> bool:
        return self.trials[name]["status"] == "done"

    def result(self, name: str) -> dict[str, Any] | None:
        return self.trials[name]["result"]

    def started(self, name: str) -> None:
        """One more attempt of ``name`` is submitted."""
        self.trials[name]["attempts"] += 1
        self.save()

    def record(self, name: str, status: str, *, result: dict[str, Any] | None = None,
               error: str | None = None) -> None:
        """The end of a trial: ``done`` with its result or ``failed`` with the error; saved at once."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.trials[name].update(status=status, result=result, error=error)
        self.save()
