"""cocotb test of s4d_ssm_core with qs4d_np.golden as the model.

Reads the core (weights, multipliers, shifts) and the input sequences from the
vector directory in $QS4D_VECTORS, drives them into the RTL, and after every
clock compares the registered state, output and saturation flags with
``SSMCore.step`` computed here in Python, step by step.
"""
import os

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge, Timer

from qs4d_np.golden.vectors import MULT_WIDTH, SHIFT_WIDTH, read_ssm_vectors


def pack(values: np.ndarray, width: int) -> int:
    """Flat bus: word i (C order) at bits [i*width +: width], two's complement."""
    mask = (1 << width) - 1
    return sum((int(v) & mask) << (i * width) for i, v in enumerate(values.ravel()))


def unpack(handle, count: int, width: int, signed: bool = True) -> np.ndarray:
    """Words of a bus signal; its binary string form works for 1-bit and wider
    signals alike, and an X or Z bit fails the int() conversion loudly."""
    bus = int(str(handle.value), 2)
    words = [(bus >> (i * width)) & ((1 << width) - 1) for i in range(count)]
    if signed:
        words = [w - (1 << width) if w >> (width - 1) else w for w in words]
    return np.array(words, dtype=np.int64)


async def reset(dut) -> None:
    """One clock edge with the synchronous rst high (x_{-1} = 0), released 1 ns after it."""
    dut.rst.value = 1
    await RisingEdge(dut.clk)
    await Timer(1, unit="ns")
    dut.rst.value = 0


@cocotb.test()
async def ssm_core_matches_golden(dut):
    core, u, _ = read_ssm_vectors(os.environ["QS4D_VECTORS"])
    f, H, N2 = core.formats, core.H, core.N2
    widths = {"Abar": f.Abar.width, "Bbar": f.Bbar.width, "C": f.C.width, "D": f.D.width}
    for name, value in core.arrays().items():
        width = (SHIFT_WIDTH if name.startswith("r_") else MULT_WIDTH if name.startswith("m_")
                 else widths[name.split("_")[0]])
        getattr(dut, name.lower() if not name.startswith(("m_", "r_")) else name).value = pack(value, width)
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.step.value = 0
    mismatches = []
    for b in range(u.shape[0]):
        await reset(dut)
        x_re = np.zeros((1, H, N2), dtype=np.int64)
        x_im = np.zeros_like(x_re)
        for t in range(u.shape[1]):
            dut.u.value = pack(u[b, t], f.u.width)
            dut.step.value = 1
            x_re, x_im, y, s_re, s_im, s_y = core.step(x_re, x_im, u[b:b + 1, t])
            await RisingEdge(dut.clk)
            await ReadOnly()
            got = {"x_re": unpack(dut.x_re, H * N2, f.x.width),
                   "x_im": unpack(dut.x_im, H * N2, f.x.width),
                   "y": unpack(dut.y, H, f.y.width),
                   "sat_x_re": unpack(dut.sat_x_re, H * N2, 1, signed=False),
                   "sat_x_im": unpack(dut.sat_x_im, H * N2, 1, signed=False),
                   "sat_y": unpack(dut.sat_y, H, 1, signed=False)}
            want = {"x_re": x_re, "x_im": x_im, "y": y, "sat_x_re": s_re, "sat_x_im": s_im, "sat_y": s_y}
            for name, value in want.items():
                bad = np.flatnonzero(value.ravel() != got[name])
                mismatches += [f"{name} batch {b} step {t} word {i}: expected {value.ravel()[i]}, "
                               f"got {got[name][i]}" for i in bad]
            await Timer(1, unit="ns")
            dut.step.value = 0
    assert not mismatches, f"{len(mismatches)} mismatching words, first: {mismatches[:5]}"
