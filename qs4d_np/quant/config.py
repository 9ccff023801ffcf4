"""``QuantConfig``: how many quantization states each target gets, and with which options.

Targets (SPEC.md section 2, plus B and D for the recurrent mode of section 3):
A, B, C, D, dt, linear, act, state, coder. ``all`` is the homogeneous default;
a specific target overrides it (what the reference README promises; its code
ignores the override). Values:

* ``None``: not set; the target falls back to ``all`` (and is float when ``all`` is None);
* an int n >= 2: n quantization states;
* ``"float"``: explicitly unquantized even when ``all`` is set;
* per layer: a list (entry i for layer i) or a dict {layer index: value}; layers a
  dict does not name fall back to ``all``.

Options (grid, symmetric, per_channel, rounding, power_of_two, complex_mode,
scale_mode, ste) apply to every target; ``complex_mode=None`` (the default) means
"shared" for C (one scale for its real and imaginary parts, as the reference) and
"cartesian" (separate scales) for the other complex targets (A / Abar, Bbar); ``target_options`` overrides them per
target, e.g. {"act": {"scale_mode": "running"}, "state": {"power_of_two": True}}.

``abar_bound`` (default True): bound the quantized Abar to the unit disk. It only
concerns target A's quantizer of the discrete Abar (recurrent mode), which the S4D
layer builds with ``quantizer_for("A", ..., max_modulus=1.0)`` when
``options_for("A")["abar_bound"]`` is true (see ``QuantSpec.max_modulus``): plain
rounding of the real and imaginary parts can put |Abar_q| above 1, and the
recurrence then grows like |Abar_q|**L. The continuous A of convolution mode
(|A| up to ~100) never gets the bound; other targets ignore the option. A dict
saved before the option existed loads with ``abar_bound=False``, so a checkpoint
keeps computing what it computed when it was trained and exported.

Per channel on a per-channel scalar (``dt``, ``D``: one value per channel) would give every
value its own scale, i.e. store it losslessly next to a float scale: ``per_channel`` means
one scale per tensor for them. ``per_channel_scalars=True`` restores the per-value scales;
a dict saved before the option existed loads with it on, so an old checkpoint computes
what it computed (``bits_for`` then reports such a target as float: what is stored).

Each target's options are resolved and validated once, when the config is built, into a
frozen ``TargetOptions`` (``target(t)``); ``options_for(t)`` is its dict view.

``fixed_range`` (target_options only, with ``scale_mode="fixed"``): the range r > 0
(symmetric; a float, or one per scale: per channel, and for complex Cartesian targets
per part, real parts first) or [lo, hi] (asymmetric, per tensor) of that target,
e.g. {"state": {"scale_mode": "fixed", "fixed_range": 4.0}}.
``spec_for`` / ``quantizer_for`` turn (target, layer) into a ``QuantSpec`` or a
``Quantizer`` (None for float). ``to_dict`` / ``from_dict`` round-trip through JSON.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from qs4d_np.core.checks import check_bool, check_choice, check_float, check_int
from qs4d_np.quant.fake import COMPLEX_MODES, STE_MODES, QuantSpec
from qs4d_np.quant.grids import GRIDS, ROUNDING, check_levels
from qs4d_np.quant.quantizer import QUANTIZER_SCALE_MODES, Quantizer

TARGETS = ("A", "B", "C", "D", "dt", "linear", "act", "state", "coder")
FLOAT = "float"

# Option name -> allowed values.
_OPTION_CHOICES: dict[str, tuple] = {
    "grid": GRIDS,
    "symmetric": (True, False),
    "per_channel": (True, False),
    "rounding": tuple(ROUNDING),
    "power_of_two": (True, False),
    "complex_mode": COMPLEX_MODES + (None,),
    "scale_mode": QUANTIZER_SCALE_MODES,
    "ste": STE_MODES,
    "abar_bound": (True, False),
    "per_channel_scalars": (True, False),
}
DEFAULT_OPTIONS: dict[str, Any] = {
    "grid": "narrow", "symmetric": True, "per_channel": False, "rounding": "half_even",
    "power_of_two": False, "complex_mode": None, "scale_mode": "absmax", "ste": "identity",
    "abar_bound": True, "per_channel_scalars": False,
}
# Targets holding one value per channel: per channel they would get one scale per value.
SCALAR_TARGETS = ("dt", "D")
# The CLI's --granularity values: one scale per tensor, or per channel.
GRANULARITIES = ("tensor", "channel")


@dataclass(frozen=True)
class TargetOptions:
    """The resolved, validated options of one target (``QuantConfig.target``; module docstring).

    ``complex_mode`` is resolved ("shared" for C, "cartesian" for the other complex
    targets); ``per_channel`` is what the quantizer does (False for ``dt`` / ``D`` unless
    ``per_channel_scalars``); ``fixed_range`` is None unless ``scale_mode="fixed"`` gave one.
    """

    target: str
    grid: str
    symmetric: bool
    per_channel: bool
    rounding: str
    power_of_two: bool
    complex_mode: str
    scale_mode: str
    ste: str
    abar_bound: bool
    per_channel_scalars: bool
    fixed_range: float | list[float] | None = None

    def __post_init__(self) -> None:
        where = f"target_options[{self.target!r}]"
        for key, choices in _OPTION_CHOICES.items():
            value = getattr(self, key)
            if choices == (True, False):
                check_bool(f"{where}[{key!r}]", value)
            else:
                check_choice(f"{where}[{key!r}]", value, choices)
        r = self.fixed_range
        if r is None:
            return
        if self.scale_mode != "fixed":
            raise ValueError(f"{where} gives a fixed_range, which only scale_mode='fixed' uses; the target's "
                             f"scale_mode is {self.scale_mode!r}")
        if self.symmetric and min(r if isinstance(r, list) else [r]) <= 0:
            raise ValueError(f"{where}['fixed_range'] must be > 0 (a symmetric range r), got {r!r}")
        if not self.symmetric and not (isinstance(r, list) and len(r) == 2 and r[0] < r[1]):
            raise ValueError(f"{where}['fixed_range'] must be [lo, hi] with lo < hi (symmetric=False), got {r!r}")

Levels = Any  # None | int | "float" | list[...] | dict[int, ...]


def _check_value(name: str, value: object, per_layer: bool = True) -> object:
    """Validate one target value; returns it normalised (dict keys as ints)."""
    if value is None or value == FLOAT:
        return value
    if isinstance(value, (list, tuple)) and per_layer:
        return [_check_value(f"{name}[{i}]", v, per_layer=False) for i, v in enumerate(value)]
    if isinstance(value, Mapping) and per_layer:
        out = {}
        for k, v in value.items():
            try:
                layer = int(k)  # JSON turns int keys into strings
            except (TypeError, ValueError):
                raise ValueError(f"{name} per-layer keys must be layer indices, got {k!r}") from None
            out[check_int(f"{name} layer key", layer, min_value=0)] = _check_value(
                f"{name}[{layer}]", v, per_layer=False)
        return out
    if isinstance(value, str):
        raise ValueError(f"{name} must be an int >= 2, None or {FLOAT!r}, got {value!r}")
    return check_levels(value, name)


def _check_fixed_range(where: str, value: object) -> object:
    """A JSON-able range: a finite number, or a list of them (per channel, or [lo, hi])."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where} must be a number or a non-empty list of numbers, got {value!r}")
        return [check_float(f"{where}[{i}]", v) for i, v in enumerate(value)]
    return check_float(where, value)


def _check_options(where: str, options: Mapping[str, Any], per_target: bool = False) -> dict[str, Any]:
    options = dict(options)
    for key, value in options.items():
        if key == "fixed_range" and per_target:
            options[key] = _check_fixed_range(f"{where}[{key!r}]", value)
            continue
        if key not in _OPTION_CHOICES:
            raise ValueError(f"unknown quantization option {key!r} in {where}; "
                             f"expected some of {sorted(_OPTION_CHOICES)}")
        if _OPTION_CHOICES[key] == (True, False):  # 1 == True, so check_choice would let 1 / 0 in
            check_bool(f"{where}[{key!r}]", value)
        else:
            check_choice(f"{where}[{key!r}]", value, _OPTION_CHOICES[key])
    return options


class QuantConfig:
    """Levels and options per quantization target (see the module docstring)."""

    def __init__(self, all: Levels = None, *, target_options: Mapping[str, Mapping[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        levels = {t: kwargs.pop(t, None) for t in TARGETS}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_CHOICES}
        if "fixed_range" in kwargs:
            raise ValueError("fixed_range is set per target: target_options={target: {'scale_mode': 'fixed', "
                             "'fixed_range': r}}")
        if kwargs:
            raise ValueError(f"unknown quantization target or option(s) {sorted(kwargs)}; targets are "
                             f"{list(TARGETS)} and 'all', options {sorted(_OPTION_CHOICES)}")
        self.all = _check_value("all", all)
        self.levels = {t: _check_value(t, v) for t, v in levels.items()}
        self.options = {**DEFAULT_OPTIONS, **_check_options("options", options)}
        self.target_options: dict[str, dict[str, Any]] = {}
        for t, opts in (target_options or {}).items():
            check_choice("target_options key", t, TARGETS)
            self.target_options[t] = _check_options(f"target_options[{t!r}]", opts, per_target=True)
        self._targets = {t: self._resolve(t) for t in TARGETS}

    def _resolve(self, target: str) -> TargetOptions:
        o = {**self.options, **self.target_options.get(target, {})}
        if o["complex_mode"] is None:
            o["complex_mode"] = "shared" if target == "C" else "cartesian"
        if target in SCALAR_TARGETS and not o["per_channel_scalars"]:
            o["per_channel"] = False
        return TargetOptions(target, **o)

    # -- construction from the reference's command-line flags ---------------
    @classmethod
    def from_flags(cls, **flags: Any) -> "QuantConfig":
        """From the reference's ``*_quant`` flags: ``A_quant=16`` means 16 levels for A,
        ``all_quant`` sets all. Accepts ``vars(args)`` of an argparse namespace restricted
        to ``*_quant`` flags, plus option keywords (``grid``, ``scale_mode``, ...) as in
        ``QuantConfig(...)``, validated the same way.

        The level counts mean what they mean in the reference, but the default grid
        is still ours, ``narrow``: ``C_quant=16`` gives codes -7..7 (15 levels, a
        4-bit word), where the reference's grid gives -8..8 (17 levels). Pass
        ``grid="qs4d"`` to get the reference's codes.
        """
        kwargs: dict[str, Any] = {}
        for flag, value in flags.items():
            if flag in _OPTION_CHOICES:
                kwargs[flag] = value
                continue
            target = flag[:-len("_quant")] if flag.endswith("_quant") else None
            if target not in TARGETS + ("all",):
                raise ValueError(f"unknown quantization flag {flag!r}; expected one of "
                                 f"{[t + '_quant' for t in ('all',) + TARGETS]} or an option "
                                 f"{sorted(_OPTION_CHOICES)}")
            kwargs[target] = value
        return cls(**kwargs)

    # -- queries -------------------------------------------------------------
    @staticmethod
    def _pick(value: object, layer: int | None, name: str) -> object:
        if isinstance(value, list):
            if layer is None:
                raise ValueError(f"{name} has per-layer levels {value}; pass layer=")
            if not 0 <= layer < len(value):
                raise ValueError(f"{name} has levels for {len(value)} layers, got layer={layer}")
            return value[layer]
        if isinstance(value, dict):
            if layer is None:
                raise ValueError(f"{name} has per-layer levels {value}; pass layer=")
            return value.get(layer)
        return value

    def levels_for(self, target: str, layer: int | None = None) -> int | None:
        """Levels of ``target`` in ``layer`` (None = float): the specific value, else ``all``."""
        check_choice("target", target, TARGETS)
        if layer is not None:
            check_int("layer", layer, min_value=0)
        value = self._pick(self.levels[target], layer, target)
        if value is None:
            value = self._pick(self.all, layer, "all")
        return None if value in (None, FLOAT) else int(value)  # type: ignore[arg-type]

    def target(self, target: str) -> TargetOptions:
        """The resolved options of ``target`` (``TargetOptions``)."""
        check_choice("target", target, TARGETS)
        return self._targets[target]

    def options_for(self, target: str) -> dict[str, Any]:
        """``target(target)`` as a dict (its fields but ``target``; ``fixed_range`` only when set)."""
        o = asdict(self.target(target))
        del o["target"]
        if o["fixed_range"] is None:
            del o["fixed_range"]
        return o

    def spec_for(self, target: str, layer: int | None = None, axis: int | None = None,
                 halve: bool = False) -> QuantSpec | None:
        """The ``QuantSpec`` of (target, layer); ``axis`` is the channel axis used when per_channel.

        ``halve``: levels // 2 states, the reference's convolution-mode state target
        (kernel K and input u), but never fewer than the grid's smallest useful count (3 on
        the symmetric narrow grid, where 2 states leave only the code 0; 2 elsewhere): the
        reference's n = 2 leaves one state and quantizes everything to 0 (NaN for A).
        """
        levels = self.levels_for(target, layer)
        if levels is None:
            return None
        o = self.target(target)
        if halve:
            smallest = 3 if (o.grid == "narrow" and o.symmetric) else 2
            levels = max(levels // 2, smallest)
        return QuantSpec(levels, grid=o.grid, symmetric=o.symmetric, axis=axis if o.per_channel else None,
                         rounding=o.rounding, power_of_two=o.power_of_two, complex_mode=o.complex_mode)

    def bits_for(self, target: str, layer: int | None = None) -> int | None:
        """Word width a stored value of the target needs (None = float), e.g. for the hardware cost
        metrics: n = 2**b states need b bits on 'narrow'/'full', b+1 on 'qs4d'. A per-channel scalar
        with one scale per value (``per_channel_scalars``) counts as float: its scales hold it."""
        spec = self.spec_for(target, layer)
        if spec is None or (target in SCALAR_TARGETS and self.target(target).per_channel):
            return None
        return spec.bits

    def quantizer_for(self, target: str, layer: int | None = None, *, axis: int | None = None,
                      n_scales: int = 1, halve: bool = False, dtype: type = None,
                      cls: type[Quantizer] = Quantizer, **extra: Any) -> Quantizer | None:
        """A ``Quantizer`` (or the subclass ``cls``, e.g. ``StateQuantizer``) for (target, layer), or
        None when the target stays float (``halve``: see ``spec_for``)."""
        spec = self.spec_for(target, layer, axis, halve)
        if spec is None:
            return None
        o = self.target(target)
        kw: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        if o.scale_mode == "fixed":
            if o.fixed_range is None:
                raise ValueError(f"target {target!r} has scale_mode='fixed' but no range; give it one with "
                                 f"target_options={{{target!r}: {{'fixed_range': r}}}}")
            kw["fixed_range"] = o.fixed_range
        spec_fields = {k: extra.pop(k) for k in list(extra) if k in QuantSpec.__dataclass_fields__}
        if spec_fields:  # spec options beyond the config's (the Abar quantizer's max_modulus)
            spec = dataclasses.replace(spec, **spec_fields)
        return cls(spec, scale_mode=o.scale_mode, ste=o.ste, n_scales=n_scales,
                   name=f"{target}" if layer is None else f"{target}[{layer}]", **kw, **extra)

    @property
    def is_float(self) -> bool:
        return self.all is None and all(v in (None, FLOAT) for v in self.levels.values())

    # -- JSON ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (per-layer dict keys become strings in JSON; from_dict undoes it)."""
        return {"all": self.all, "levels": dict(self.levels), "options": dict(self.options),
                "target_options": {t: dict(o) for t, o in self.target_options.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        expected = {"all", "levels", "options", "target_options"}
        if set(data) != expected:
            raise ValueError(f"QuantConfig dict must have keys {sorted(expected)}, got {sorted(data)}")
        # saved before abar_bound existed: the Abar codes were unbounded, and stay so; saved before
        # per_channel_scalars existed: per channel gave dt and D one scale per value, and still does
        # (where neither was per channel the option changes nothing, and takes its default)
        saved = data["options"]
        per_channel = [{**saved, **data["target_options"].get(t, {})}.get("per_channel", False) for t in SCALAR_TARGETS]
        options = {"abar_bound": False, "per_channel_scalars": any(per_channel), **saved}
        return cls(data["all"], target_options=data["target_options"], **data["levels"], **options)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        set_levels = {t: v for t, v in self.levels.items() if v is not None}
        return f"QuantConfig(all={self.all!r}, {set_levels}, options={self.options}, target_options={self.target_options})"
