"""The sweep spec file and the trials it describes.

A spec is a JSON object::

    {"command": "train",
     "base": {"dataset": "smnist", "d_model_m": 64, "epochs": 3},
     "axes": {"all_quant": [16, 64, 256], "seed": [0, 1, 2]},
     "zip": ["a", "b"]}

``base`` holds the settings every trial shares, ``axes`` the values that vary.
The trials are the cartesian product of the axes, except that the axes named in
``zip`` (optional; a list of names, or a list of such lists for several groups)
vary together: their lists have one length and their i-th values form one point.
Keys are the subcommand's long flags with ``-`` written ``_``; whether the
subcommand accepts them is checked by ``argv.py``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from qs4d_np.sweep.errors import SweepError

SPEC_KEYS = ("command", "base", "axes", "zip")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed spec: ``command``, ``base`` settings, ``axes`` (name -> values) and ``zip`` groups."""

    command: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    zip: tuple[tuple[str, ...], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what the manifest stores to recognise the sweep on a rerun)."""
        return {"command": self.command, "base": self.base, "axes": self.axes, "zip": [list(g) for g in self.zip]}

    def trials(self) -> list[dict[str, Any]]:
        """The settings of every trial (base + one point of the axes), in a fixed order: axes in the
        order of the spec, the last one varying fastest; a zip group counts as one axis at the place
        of its first member."""
        return [{**self.base, **point} for point in self._points()]

    def axis_values(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The axis entries of one trial's settings."""
        return {name: settings[name] for name in self.axes}

    def _points(self) -> Iterator[dict[str, Any]]:
        zipped = {name: group for group in self.zip for name in group}
        factors: list[list[dict[str, Any]]] = []
        seen: set[tuple[str, ...]] = set()
        for name, values in self.axes.items():
            group = zipped.get(name, (name,))
            if group in seen:
                continue
            seen.add(group)
            factors.append([dict(zip(group, row)) for row in zip(*(self.axes[n] for n in group))])
        for combo in itertools.product(*factors):
            point: dict[str, Any] = {}
            for part in combo:
                point.update(part)
            yield point


def parse_spec(data: Any, commands: Sequence[str], source: str = "spec") -> SweepSpec:
    """Check the structure of a spec (a JSON value) and return it; errors name ``source`` and the key."""
    if not isinstance(data, dict):
        raise SweepError(f"{source}: expected a JSON object with keys {', '.join(SPEC_KEYS)}, "
                         f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; a spec has "
                         f"{', '.join(SPEC_KEYS)}")
    command = data.get("command")
    if command not in commands:
        raise SweepError(f"{source}: 'command' must be one of {', '.join(commands)}, got {command!r}")
    base = data.get("base", {})
    axes = data.get("axes", {})
    for key, value in (("base", base), ("axes", axes)):
        if not isinstance(value, dict):
            raise SweepError(f"{source}: {key!r} must be an object of flag -> value, got {type(value).__name__}")
    for name, values in axes.items():
        if not isinstance(values, list):
            raise SweepError(f"{source}: axis {name!r} must be a list of values, got {values!r}")
        if not values:
            raise SweepError(f"{source}: axis {name!r} is empty (a sweep over no values has no trials)")
    both = sorted(set(base) & set(axes))
    if both:
        raise SweepError(f"{source}: key(s) {', '.join(map(repr, both))} in both 'base' and 'axes'")
    groups = _zip_groups(data.get("zip", []), axes, source)
    zipped = {name for group in groups for name in group}
    for group in [(name,) for name in axes if name not in zipped] + list(groups):
        rows = list(zip(*(axes[name] for name in group)))
        repeated = [row for i, row in enumerate(rows) if row in rows[:i]]
        if repeated:  # the same trial twice
            shown = [r[0] if len(group) == 1 else dict(zip(group, r)) for r in repeated]
            raise SweepError(f"{source}: axis {' + '.join(map(repr, group))} repeats the value(s) {shown}")
    return SweepSpec(command, dict(base), {k: list(v) for k, v in axes.items()}, groups)


def _zip_groups(raw: Any, axes: dict[str, list[Any]], source: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(raw, list):
        raise SweepError(f"{source}: 'zip' must be a list of axis names (or of lists of them), got {raw!r}")
    groups = [raw] if raw and all(isinstance(n, str) for n in raw) else raw
    out: list[tuple[str, ...]] = []
    used: set[str] = set()
    for group in groups:
        if not (isinstance(group, list) and len(group) >= 2 and all(isinstance(n, str) for n in group)):
            raise SweepError(f"{source}: each 'zip' group must list at least two axis names, got {group!r}")
        for name in group:
            if name not in axes:
                raise SweepError(f"{source}: 'zip' names {name!r}, which is not an axis "
                                 f"(axes: {', '.join(axes) or 'none'})")
            if name in used:
                raise SweepError(f"{source}: axis {name!r} is in more than one 'zip' group")
            used.add(name)
        lengths = {name: len(axes[name]) for name in group}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"{source}: zipped axes must have one length, got "
                             + ", ".join(f"{n}: {k}" for n, k in lengths.items()))
        out.append(tuple(group))
    return tuple(out)


def load_spec(path: str | Path, commands: Sequence[str]) -> SweepSpec:
    """Read and check a spec file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"spec {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(f"spec {path} is not valid JSON: {exc}") from None
    return parse_spec(data, commands, f"spec {path}")
