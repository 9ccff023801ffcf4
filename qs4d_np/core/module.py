"""The base of every op: forward/backward with hand-written gradients.

Conventions shared by every op in the package:

* Activations are NumPy arrays shaped (batch, length, channels).
* ``forward(x, training=False)`` computes the output and caches what
  ``backward`` needs; ``backward(grad)`` takes dL/d(output) and returns
  dL/d(input) and *overwrites* ``.grads`` (one backward per forward; the
  trainer never accumulates over several forwards).
* ``.params`` and ``.grads`` are flat dicts keyed alike. A composite op
  registers its children with ``add_child`` and its dicts then also hold the
  children's entries under dotted names (``layers.0.ssm.C``). The arrays are
  shared, not copied, so an optimizer updates parameters in place.
* An op split into parts without changing its names registers a part with
  ``add_child(name, part, inline=True)``: the part's entries (and its
  children's) keep the parent's names, so checkpoint keys stay as they were
  (the S4D layer's SSM core: ``layers.0.ssm.C``, not ``layers.0.ssm.core.C``).
* A complex parameter's gradient is dL/dRe + i*dL/dIm (the PyTorch convention).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import numpy as np

from qs4d_np.core.checks import check_array, check_choice


class Module:
    """An op with parameters, gradients, child ops and a forward cache.

    Subclasses store their own parameters in ``self._params`` and write their
    own gradients to ``self._grads`` in ``backward``; the public ``params`` and
    ``grads`` views add the children's entries.
    """

    def __init__(self) -> None:
        self._params: dict[str, np.ndarray] = {}
        self._grads: dict[str, np.ndarray] = {}
        self._children: dict[str, Module] = {}
        self._inline: set[str] = set()
        self._cache: Any = None

    # -- the op interface -------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        return self.forward(x, training=training)

    # -- parameters, gradients, children ----------------------------------
    def add_child(self, name: str, module: "Module", *, inline: bool = False) -> "Module":
        """Register ``module`` as child ``name``; ``inline``: its entries keep this module's names."""
        if "." in name:
            raise ValueError(f"child name {name!r} must not contain '.'")
        self._children[name] = module
        if inline:
            self._inline.add(name)
        else:
            self._inline.discard(name)
        return module

    def replace_child(self, name: str, module: "Module") -> "Module":
        """Put ``module`` in place of child ``name`` (module substitution: ``hardware.to_analog``), keeping
        its registration (inline or not) and the attribute of the same name that held the old child."""
        if name not in self._children:
            raise KeyError(f"{type(self).__name__} has no child {name!r}; children: {sorted(self._children)}")
        old = self._children[name]
        self._children[name] = module
        if getattr(self, name, None) is old:
            setattr(self, name, module)
        return module

    def _child_prefix(self, name: str, prefix: str) -> str:
        """The dotted name of child ``name`` below ``prefix`` (``prefix`` itself when inline)."""
        if name in self._inline:
            return prefix
        return f"{prefix}.{name}" if prefix else name

    def children(self) -> dict[str, "Module"]:
        return dict(self._children)

    def modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """Yield (dotted name, module) for this module and every descendant."""
        yield prefix, self
        for name, child in self._children.items():
            yield from child.modules(self._child_prefix(name, prefix))

    def _flat(self, own: dict[str, np.ndarray], of_child: str) -> dict[str, np.ndarray]:
        out = dict(own)
        for name, child in self._children.items():
            for key, value in getattr(child, of_child).items():
                full = key if name in self._inline else f"{name}.{key}"
                if full in out:  # an inline child's entry would hide the parent's, or another's
                    raise ValueError(f"{type(self).__name__}: two entries named {full!r} (inline child {name!r})")
                out[full] = value
        return out

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self._flat(self._params, "params")

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return self._flat(self._grads, "grads")

    def zero_grads(self) -> None:
        """Set every gradient (this op's and every descendant's) to zeros shaped like its parameter."""
        self._grads = {k: np.zeros_like(v) for k, v in self._params.items()}
        for child in self._children.values():
            child.zero_grads()

    def set_grad(self, name: str, grad: np.ndarray) -> None:
        """Store ``grad`` as dL/d(this op's own parameter ``name``), replacing the gradient there.

        For a gradient computed outside this op's ``backward``: a parent's fused backward
        (``PointwiseGLU`` computes its Linear's) or a straight-through chain from a swapped-in
        weight back to the parameter (``quant.weights.WeightQuant``). ``grad`` has the
        parameter's shape and is stored as given (not copied or cast).
        """
        check_choice("name", name, self._params)
        grad = check_array("grad", grad, shape=self._params[name].shape, finite=False, allow_complex=True)
        self._grads[name] = grad

    def num_params(self) -> int:
        """Number of real scalars (a complex entry counts twice)."""
        return int(sum(v.size * (2 if np.iscomplexobj(v) else 1) for v in self.params.values()))

    # -- cache handling ---------------------------------------------------
    def clear_caches(self) -> None:
        """Drop the forward cache of this module and every descendant (a pending backward is lost)."""
        self._cache = None
        for child in self._children.values():
            child.clear_caches()

    def _saved(self) -> Any:
        """Return the forward cache, or fail clearly when there is none."""
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called before forward(); "
                "run forward(x, training=...) first"
            )
        return self._cache

    @contextmanager
    def kept_caches(self) -> Iterator[None]:
        """Run forwards inside (inspection, inference) without disturbing a pending backward: on exit
        the forward cache of this op and of every descendant is what it was on entry."""
        saved = self._cache
        try:
            with ExitStack() as children:
                for child in self._children.values():
                    children.enter_context(child.kept_caches())
                yield
        finally:
            self._cache = saved
