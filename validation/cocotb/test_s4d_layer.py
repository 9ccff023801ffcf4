"""cocotb test of s4d_layer (the whole block) against a layer vector directory.

Reads every weight word, the input u and the expected words of one layer from the directory in
$QS4D_VECTORS (``validation/sim.py layer_vectors``), drives the steps through the layer's
valid/ready handshake with a seeded random pattern of idle input cycles and output stalls, and
compares every registered output with the expected words at each accepted step.
"""
import os
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge, Timer

from qs4d_np.golden.vectors import load_vector_config, read_tensor
from test_s4d_ssm_core import pack, reset, unpack

# port -> file of the layer directory
PORTS = {"abar_re": "Abar_re", "abar_im": "Abar_im", "bbar_re": "Bbar_re", "bbar_im": "Bbar_im", "c_re": "C_re",
         "c_im": "C_im", "d": "D", "m_a_re": "m_a_re", "m_a_im_to_re": "m_a_im_to_re",
         "m_a_im_to_im": "m_a_im_to_im", "m_b_re": "m_b_re", "m_b_im": "m_b_im", "r_x": "r_x", "m_c_re": "m_c_re",
         "m_c_im": "m_c_im", "m_d": "m_d", "r_y": "r_y", "mix_a_w": "mix_a_W", "mix_a_b": "mix_a_b",
         "mix_a_m": "mix_a_m0", "mix_a_r": "mix_a_r", "mix_b_w": "mix_b_W", "mix_b_b": "mix_b_b",
         "mix_b_m": "mix_b_m0", "mix_b_r": "mix_b_r", "sig_lut": "sig_lut", "glu_m": "glu_m0", "glu_r": "glu_r",
         "post_m0": "post_m0", "post_m1": "post_m1", "post_offset": "post_offset", "post_sign": "post_sign",
         "post_r": "post_r"}


@cocotb.test()
async def layer_matches_golden(dut):
    directory = Path(os.environ["QS4D_VECTORS"])
    config = load_vector_config(directory)
    specs = config["tensors"]
    words = {name: read_tensor(directory, name, spec) for name, spec in specs.items()}
    H = config["params"]["H"]
    for port, name in PORTS.items():
        if name in words:
            getattr(dut, port).value = pack(words[name], specs[name]["width"])
        else:  # no post op or no residual: the port's words are unused, drive zeros
            getattr(dut, port).value = 0
    if "post_sign" not in words:
        dut.post_sign.value = pack(np.ones(H, dtype=np.int64), 2)
    rng = np.random.default_rng(int(os.environ.get("QS4D_SEED", "1")))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.in_valid.value = 0
    dut.out_ready.value = 0
    u = words["u"]
    outputs = [n for n, spec in specs.items() if spec["output"]]
    mismatches = []
    for b in range(u.shape[0]):
        await reset(dut)
        for t in range(u.shape[1]):
            for _ in range(int(rng.integers(0, 3))):
                await RisingEdge(dut.clk)
            await Timer(1, unit="ns")
            dut.u.value = pack(u[b, t], specs["u"]["width"])
            dut.in_valid.value = 1
            while not int(dut.in_ready.value):
                await RisingEdge(dut.clk)
                await Timer(1, unit="ns")
            await RisingEdge(dut.clk)
            await Timer(1, unit="ns")
            dut.in_valid.value = 0
            while not int(dut.out_valid.value):
                await RisingEdge(dut.clk)
                await Timer(1, unit="ns")
            for _ in range(int(rng.integers(0, 3))):  # stall: the words must hold
                await RisingEdge(dut.clk)
            await ReadOnly()
            for name in outputs:
                want = words[name][b, t].ravel()
                got = unpack(getattr(dut, name), want.size, specs[name]["width"], specs[name]["signed"])
                bad = np.flatnonzero(want != got)
                mismatches += [f"{name} sample {b} step {t} word {i}: expected {want[i]}, got {got[i]}"
                               for i in bad]
            await Timer(1, unit="ns")
            dut.out_ready.value = 1
            await RisingEdge(dut.clk)
            await Timer(1, unit="ns")
            dut.out_ready.value = 0
    assert not mismatches, f"{len(mismatches)} mismatching words, first: {mismatches[:5]}"
