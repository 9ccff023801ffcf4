"""The integer S4D recurrent step, the SSM core (docs/integer_spec.md, section 4).

Per channel h and complex mode n, with every quantity an integer:

    x_re' = sat_x(RNE((M_a_re*(a_re*x_re) - M_a_im_to_re*(a_im*x_im) + M_b_re*(b_re*u)) / 2**r_x))
    x_im' = sat_x(RNE((M_a_re*(a_re*x_im) + M_a_im_to_im*(a_im*x_re) + M_b_im*(b_im*u)) / 2**r_x))
    y     = sat_y(RNE((M_c_re*S_re - M_c_im*S_im + M_d*(d*u)) / 2**r_y))
    S_re  = sum_n c_re*x_re',  S_im = sum_n c_im*x_im'

(a = Abar, b = Bbar, c = C, d = D; x' is the new state x_t, the readout uses it
and u_t; x_{-1} = 0. The real and imaginary parts of x may have different
steps, hence two multipliers for the cross term a_im * x.) The factor 2 of y = 2*Re(C x) + D*u lives in M_c.
Pure int64 NumPy; the constructor proves every accumulator fits int64.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from qs4d_np.core.checks import check_array
from qs4d_np.golden.fixedpoint import IntFormat, check_headroom, requantize

SPEC_VERSION = 2

# Which grid of SSMCoreFormats each weight lies on.
WEIGHT_FORMAT = {"Abar_re": "Abar", "Abar_im": "Abar", "Bbar_re": "Bbar", "Bbar_im": "Bbar",
                 "C_re": "C", "C_im": "C", "D": "D"}


@dataclass(frozen=True)
class SSMCoreFormats:
    """The integer grid of every tensor of the core (width and clamp range)."""

    u: IntFormat
    Abar: IntFormat
    Bbar: IntFormat
    C: IntFormat
    D: IntFormat
    x: IntFormat
    y: IntFormat


@dataclass
class SSMCoreTrace:
    """Per-step integer trace of one run; ``B, L, H, N2`` = batch, length, channels, modes."""

    x_re: np.ndarray    # (B, L, H, N2) state x_t, real part
    x_im: np.ndarray    # (B, L, H, N2) imaginary part
    y: np.ndarray       # (B, L, H) output y_t
    sat_x_re: np.ndarray  # (B, L, H, N2) 1 where x_re was clamped at step t
    sat_x_im: np.ndarray  # (B, L, H, N2)
    sat_y: np.ndarray     # (B, L, H)

    def saturation_counts(self) -> dict[str, int]:
        """Number of clamped words per tensor over the whole run."""
        return {"x_re": int(self.sat_x_re.sum()), "x_im": int(self.sat_x_im.sum()),
                "y": int(self.sat_y.sum())}


class SSMCore:
    """One S4D layer's integer SSM core: complex diagonal update, saturation, C readout, D skip.

    Weights (int arrays on their grids): ``Abar_re``, ``Abar_im``, ``Bbar_re``,
    ``Bbar_im``, ``C_re``, ``C_im`` shaped (H, N2) and ``D`` shaped (H,).
    Requantization (non-negative int multipliers and right shifts): ``m_a_re``,
    ``m_a_im_to_re``, ``m_a_im_to_im``, ``m_b_re``, ``m_b_im``, ``r_x`` shaped
    (H, N2) for the state;
    ``m_c_re``, ``m_c_im``, ``m_d``, ``r_y`` shaped (H,) for the output.
    """

    WEIGHTS_HN = ("Abar_re", "Abar_im", "Bbar_re", "Bbar_im", "C_re", "C_im")
    REQUANT_HN = ("m_a_re", "m_a_im_to_re", "m_a_im_to_im", "m_b_re", "m_b_im", "r_x")
    REQUANT_H = ("m_c_re", "m_c_im", "m_d", "r_y")

    def __init__(self, formats: SSMCoreFormats, **arrays: np.ndarray) -> None:
        names = self.WEIGHTS_HN + ("D",) + self.REQUANT_HN + self.REQUANT_H
        missing = [n for n in names if n not in arrays]
        extra = [n for n in arrays if n not in names]
        if missing or extra:
            raise TypeError(f"SSMCore needs exactly {list(names)}; missing {missing}, unexpected {extra}")
        self.formats = formats
        first = check_array("Abar_re", arrays["Abar_re"], ndim=2, min_size=1)
        self.H, self.N2 = first.shape
        for name in names:
            shape = (self.H,) if name == "D" or name in self.REQUANT_H else (self.H, self.N2)
            value = check_array(name, arrays[name], shape=shape)
            if name in WEIGHT_FORMAT:
                value = getattr(formats, WEIGHT_FORMAT[name]).check(name, value)
            elif value.dtype.kind not in ("i", "u"):
                raise TypeError(f"{name} must be an integer numpy array, got dtype {value.dtype}")
            setattr(self, name, value.astype(np.int64))
        f = formats
        ax, bu = f.Abar.maxabs * f.x.maxabs, f.Bbar.maxabs * f.u.maxabs
        check_headroom("state (x_re)", [ax, ax, bu], [self.m_a_re, self.m_a_im_to_re, self.m_b_re],
                       self.r_x)
        check_headroom("state (x_im)", [ax, ax, bu], [self.m_a_re, self.m_a_im_to_im, self.m_b_im],
                       self.r_x)
        cx = self.N2 * f.C.maxabs * f.x.maxabs
        check_headroom("output (y)", [cx, cx, f.D.maxabs * f.u.maxabs],
                       [self.m_c_re, self.m_c_im, self.m_d], self.r_y)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every integer array by name (what the vector writer exports)."""
        return {n: getattr(self, n) for n in self.WEIGHTS_HN + ("D",) + self.REQUANT_HN + self.REQUANT_H}

    def step(self, x_re: np.ndarray, x_im: np.ndarray, u_t: np.ndarray, *, return_acc: bool = False
             ) -> tuple[np.ndarray, ...]:
        """One time step for a batch: x (B, H, N2), u_t (B, H) -> (x_re, x_im, y, sat_re, sat_im, sat_y).

        With ``return_acc`` also (acc_re, acc_im, acc_y), the exact sums before rounding.
        Inputs must be int64 on their grids; ``run`` checks them once for the
        whole sequence, this inner step does not.
        """
        u_n = u_t[:, :, None]
        new_re, sat_re, acc_re = requantize(
            [self.Abar_re * x_re, -(self.Abar_im * x_im), self.Bbar_re * u_n],
            [self.m_a_re, self.m_a_im_to_re, self.m_b_re], self.r_x, self.formats.x, return_acc=True)
        new_im, sat_im, acc_im = requantize(
            [self.Abar_re * x_im, self.Abar_im * x_re, self.Bbar_im * u_n],
            [self.m_a_re, self.m_a_im_to_im, self.m_b_im], self.r_x, self.formats.x, return_acc=True)
        S_re = (self.C_re * new_re).sum(axis=-1)
        S_im = (self.C_im * new_im).sum(axis=-1)
        y, sat_y, acc_y = requantize([S_re, -S_im, self.D * u_t], [self.m_c_re, self.m_c_im, self.m_d],
                                     self.r_y, self.formats.y, return_acc=True)
        out = (new_re, new_im, y, sat_re, sat_im, sat_y)
        return out + (acc_re, acc_im, acc_y) if return_acc else out

    def run(self, u: np.ndarray) -> SSMCoreTrace:
        """Run the recurrence from x = 0 over int ``u`` shaped (B, L, H); return the full trace."""
        check_array("u", u, ndim=3, min_size=1)
        if u.shape[2] != self.H:
            raise ValueError(f"u must have shape (batch, length, {self.H}), got {u.shape}")
        u = self.formats.u.check("u", u)
        B, L, H = u.shape
        trace = SSMCoreTrace(**{f.name: np.zeros((B, L, H, self.N2) if f.name.endswith(("re", "im"))
                                                 else (B, L, H), dtype=np.int64)
                                for f in fields(SSMCoreTrace)})
        x_re = np.zeros((B, H, self.N2), dtype=np.int64)
        x_im = np.zeros_like(x_re)
        for t in range(L):
            x_re, x_im, y, s_re, s_im, s_y = self.step(x_re, x_im, u[:, t])
            trace.x_re[:, t], trace.x_im[:, t], trace.y[:, t] = x_re, x_im, y
            trace.sat_x_re[:, t], trace.sat_x_im[:, t], trace.sat_y[:, t] = s_re, s_im, s_y
        return trace
