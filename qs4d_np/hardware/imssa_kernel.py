"""The IMSSA recurrence of one S4D layer on its crossbar arrays, all time steps in one Numba kernel.

Layout (``qs4d_np.hardware.imssa_layout.IMSSALayout``): the layer's mapped channels c = 0..C-1, each
with its mapped modes e = mode_ptr[c] .. mode_ptr[c+1]-1; the arrays a = 0..A-1 hold the
channels arr_ptr[a] .. arr_ptr[a+1]-1. Mode e owns two state lines p = 0 (real), 1
(imaginary), channel c one input / output line (u_t in, y_t out). The programmed cells, in
level units (g+ - g-, so g / g_max = level * g_unit):

* ``Ga`` (4, E): the 2x2 Abar block, rows (re, im) x columns (re, im): rr, ri, ir, ii;
* ``Gb`` (2, E): the Bbar column (the channel's input line into the mode's re, im rows);
* ``Gc`` (2, E): the output row over the mode's re, im columns;
* ``Gd`` (C,): the output row's cell on the input line, or with ``delayed`` on the
  previous-input line (the ``ssm_readout`` of ``qs4d_np.hardware.imssa_layout``).

Per sample b, read t and array a (``reference.analog`` is the same, step by step, as
dense matrices); direct: reads t = 0..L-1, each converting every row; delayed: reads
t = 0..L, the state rows converted for t < L, the output rows (which then give y_{t-1})
for t > 0:

1. inputs z: the state lines (x_{t-1}), the input lines (u_t; 0 for t = L) and, delayed,
   the previous-input lines (u_{t-1}; 0 for t = 0, coded with the input lines' scales);
   digital input scales ``r_s`` (2, E), ``r_u`` (C,) (calibrated DAC ranges; 1 without
   calibration);
   noise management: sc = max_j |z_j * (1 / r_j)| / nm_target over the array (1 for a
   zero vector or nm_target == 0);
2. DAC, round k of bound management (0 first): code_j = z_j * (1 / (r_j * inp_step)) *
   (2^-k / sc), rounded half to even and clamped to +-qmax_in when qmax_in > 0, else
   clamped to +-clamp_in when clamp_in > 0 (reciprocals, as a digital periphery
   multiplies by stored scales);
3. analog sums acc_i = sum over row i's cells of G_ij * code_j, in float64 in the cell
   order above (Abar re, Abar im, Bbar; the output row mode by mode, then Gd), of the
   rows converted in this read;
4. v_i = acc_i * k_acc in normalized output units (k_acc = inp_step * g_unit); read noise
   v_i += sqrt(out_noise^2 + w_noise^2 * q_i) * n_i, n_i the counter-based normal of
   (key, counter, i) with counter = ((t * B + b) * A + a) * (max_round + 1) + k and i the
   row's index in the array (channel by channel: re_0, im_0, re_1, ..., output), q_i =
   sum over row i's cells of xn_j^2 (``noise_type`` 1) or |G_ij| * g_unit * xn_j^2 (2),
   xn_j = code_j * inp_step;
5. ADC: w_i = v_i * (1 / step_i) (``step_s`` (2, E), ``step_y`` (C,): the calibrated or
   common ADC steps); rint and clamp to +-qmax_out when qmax_out > 0, else clamp to +-lim_i
   (``lim_s``, ``lim_y``; 0 = none); an output is clipped when the clamp changed it;
6. bound management: when a converted output of the array clipped and k < max_round, redo
   the array with k + 1 (fresh noise); the last round is accepted as it is;
7. digital: out_i = w_i * (step_i * f_i) * (sc * 2^k) with the digital output scales
   ``f_s``, ``f_y`` (weight scale times drift compensation); the state lines become
   x_t, the output lines y_t (delayed: y_{t-1}).
8. state register: x_t is the state lines' out, or with ``increment`` x_{t-1} + out (the
   state rows hold Abar - I: ``CrossbarConfig.state_update``); |x_t| > state_bound (or a
   non-finite x_t) marks the sample overflowed at that step; its prediction is lost, so its
   remaining steps are not computed (their outputs stay 0 and its final state is the
   saturated one: +-state_bound, NaN -> 0, or 0 where state_bound is inf).

Calibration: ``rec_in`` (B, 2E + C) and ``rec_out`` (B, 2E + C), when not empty, receive
per sample the largest |z_j| over the reads (inputs, before any scaling; state lines 2e + p,
input lines 2E + c, which also stand for the previous-input lines: the same values) and the
largest |v_i| of the converted rows (outputs in normalized units before the ADC) of every
round (calibration runs exact arrays, without bound management, so every round is accepted).

Speed: one round of one array (``_read_round``) codes the array's state lines once into
scratch vectors, then runs the state rows and the output rows as separate per-channel loops
over contiguous modes; the read-kind branches sit outside them, and on the common paths
(quantizing DAC and ADC, no recording; no or output-only read noise) the converter and noise
flags are literals of the inlined call, so the per-mode loops carry none of those branches.
Measured (CPU time, 1 thread, H 64, N 64, L 784, batch 8, on a loaded 2-core VM): 25-33 ->
14-22 ns per mode-step without noise, 45-49 -> 27-34 ns with ``realistic()`` read noise. The
arithmetic and its order are the earlier kernel's (noise-free results are the same numbers;
the weight-proportional variance of an output row is now summed as |G| * x^2 per cell).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qs4d_np.hardware.rng import fill_row_normals, row_key

NOISE_NONE, NOISE_OUT_ONLY, NOISE_ADDITIVE, NOISE_PROPORTIONAL = -1, 0, 1, 2


@njit(cache=True, inline="always")
def _dac(v, quantized, qmax, clamp):
    """One DAC code of a scaled input (step 2 of the module docstring); ``quantized``: qmax > 0."""
    if quantized:
        return min(max(np.rint(v), -qmax), qmax)
    if clamp > 0.0:
        return min(max(v, -clamp), clamp)
    return v


@njit(cache=True, inline="always")
def _adc(v, inv_step, quantized, qmax, lim):
    """(ADC output in steps, clipped) of one normalized output (step 5); ``quantized``: qmax > 0."""
    w = v * inv_step
    if quantized:
        r = np.rint(w)
        c = min(max(r, -qmax), qmax)
        return c, c != r
    if lim > 0.0:
        c = min(max(w, -lim), lim)
        return c, c != w
    return w, False


@njit(cache=True, inline="always")
def _record_max(rec, E, e0, e1, c0, c1, state, lines):
    """rec (2E + C,) <- the larger of itself and |value| on one array's state lines (2, E) and lines (C,)."""
    for p in range(2):
        for e in range(e0, e1):
            rec[2 * e + p] = max(rec[2 * e + p], abs(state[p, e]))
    for c in range(c0, c1):
        rec[2 * E + c] = max(rec[2 * E + c], abs(lines[c]))


@njit(cache=True, inline="always")
def _read_round(c0, c1, mode_ptr, read_state, read_out, x, zu, zp, g, scale, cells, scales, consts, flags, normals,
                rec_out, cr, ci, x_new, y_new):
    """One round of one array's read (steps 2-5, 7 of the module docstring): the codes of its lines,
    its converted rows into x_new (2, E) and y_new (C,); returns the clipped outputs. ``cells``,
    ``scales``, ``consts`` as ``imssa_scan`` packs them; ``flags`` (quant_in, quant_out, noise_type,
    recording, delayed) are literals at the hot call sites, so that their branches fold away and
    each per-mode loop runs straight through. (Packed: Python compiles a call with more than 30
    arguments to a *args call, which Numba does not inline.)"""
    Ga, Gb, Gc, Gd = cells
    _, _, dac_s, dac_u, inv_step_s, inv_step_y, out_s, out_y, lim_s, lim_y = scales
    _, inp_step, k_acc, g_unit, qmax_in, clamp_in, qmax_out, out_noise2, w_noise2, _ = consts
    quant_in, quant_out, noise_type, recording, delayed = flags
    E = Ga.shape[1]
    e0, e1 = mode_ptr[c0], mode_ptr[c1]
    # 2. the state lines' codes (reused by the state rows and the output rows)
    for e in range(e0, e1):
        cr[e] = _dac(x[0, e] * dac_s[0, e] * g, quant_in, qmax_in, clamp_in)
        ci[e] = _dac(x[1, e] * dac_s[1, e] * g, quant_in, qmax_in, clamp_in)
    n_clip = 0
    for c in range(c0, c1):
        m0, m1 = mode_ptr[c], mode_ptr[c + 1]
        i0 = 2 * (m0 - e0) + (c - c0)  # the row index of the channel's first state row in the array
        uc = _dac(zu[c] * dac_u[c] * g, quant_in, qmax_in, clamp_in)
        xu = uc * inp_step
        if read_state:
            # 3.-5. the state rows
            for e in range(m0, m1):
                vr = (Ga[0, e] * cr[e] + Ga[1, e] * ci[e] + Gb[0, e] * uc) * k_acc
                vi = (Ga[2, e] * cr[e] + Ga[3, e] * ci[e] + Gb[1, e] * uc) * k_acc
                if noise_type >= 0:
                    xr, xi = cr[e] * inp_step, ci[e] * inp_step
                    q_r = q_i = 0.0
                    if noise_type == NOISE_ADDITIVE:
                        q_r = q_i = xr * xr + xi * xi + xu * xu
                    elif noise_type == NOISE_PROPORTIONAL:
                        q_r = (abs(Ga[0, e]) * xr * xr + abs(Ga[1, e]) * xi * xi + abs(Gb[0, e]) * xu * xu) * g_unit
                        q_i = (abs(Ga[2, e]) * xr * xr + abs(Ga[3, e]) * xi * xi + abs(Gb[1, e]) * xu * xu) * g_unit
                    i = i0 + 2 * (e - m0)
                    vr += np.sqrt(out_noise2 + w_noise2 * q_r) * normals[i]
                    vi += np.sqrt(out_noise2 + w_noise2 * q_i) * normals[i + 1]
                if recording:
                    rec_out[2 * e] = max(rec_out[2 * e], abs(vr))
                    rec_out[2 * e + 1] = max(rec_out[2 * e + 1], abs(vi))
                wr, hit_r = _adc(vr, inv_step_s[0, e], quant_out, qmax_out, lim_s[0, e])
                wi, hit_i = _adc(vi, inv_step_s[1, e], quant_out, qmax_out, lim_s[1, e])
                n_clip += hit_r + hit_i
                x_new[0, e] = wr * out_s[0, e] * scale
                x_new[1, e] = wi * out_s[1, e] * scale
        if read_out:
            # 3.-5. the output row, over the state lines and the input (delayed: previous-input) line
            dc = _dac(zp[c] * dac_u[c] * g, quant_in, qmax_in, clamp_in) if delayed else uc
            acc_y = 0.0
            for e in range(m0, m1):
                acc_y += Gc[0, e] * cr[e]
                acc_y += Gc[1, e] * ci[e]
            acc_y += Gd[c] * dc
            vy = acc_y * k_acc
            if noise_type >= 0:
                xd = dc * inp_step
                q_y = 0.0
                if noise_type == NOISE_ADDITIVE:
                    for e in range(m0, m1):
                        q_y += (cr[e] * inp_step) ** 2 + (ci[e] * inp_step) ** 2
                    q_y += xd * xd
                elif noise_type == NOISE_PROPORTIONAL:
                    for e in range(m0, m1):
                        q_y += (abs(Gc[0, e]) * (cr[e] * inp_step) ** 2 + abs(Gc[1, e]) * (ci[e] * inp_step) ** 2) * g_unit
                    q_y += abs(Gd[c]) * xd * xd * g_unit
                vy += np.sqrt(out_noise2 + w_noise2 * q_y) * normals[i0 + 2 * (m1 - m0)]
            if recording:
                rec_out[2 * E + c] = max(rec_out[2 * E + c], abs(vy))
            wy, hit = _adc(vy, inv_step_y[c], quant_out, qmax_out, lim_y[c])
            n_clip += hit
            y_new[c] = wy * out_y[c] * scale
    return n_clip


@njit(cache=True)
def _run_sample(b, u, x0, channel, mode_ptr, arr_ptr, increment, cells, scales, consts, flags, max_round, key,
                max_rows, rec_in, rec_out, outputs):
    """Sample b's reads (module docstring) into outputs = (y, x_out, clipped, retries, overflow) at b.
    A function of its own, called per sample from the prange loop: inlined there, Numba's parfor
    lowering lost the final state's store."""
    y, x_out, clipped, retries, overflow = outputs
    quant_in, quant_out, noise_type, recording, delayed = flags
    inv_r_s, inv_r_u = scales[0], scales[1]
    nm_target, state_bound = consts[0], consts[9]
    hot = quant_in and quant_out and not recording
    B, L, H = u.shape
    n_arr = arr_ptr.shape[0] - 1
    E = cells[0].shape[1]
    n_ch = channel.shape[0]
    rounds = max_round + 1
    x = x0[b].copy()
    x_new = np.empty((2, E))
    cr = np.empty(E)
    ci = np.empty(E)
    zu = np.zeros(n_ch)
    zp = np.zeros(n_ch)  # delayed: the previous input
    y_new = np.empty(n_ch)
    normals = np.zeros(max_rows)
    hashes = np.empty(max_rows, dtype=np.uint64)
    for t in range(L + 1 if delayed else L):
        if overflow[b] >= 0:
            break
        read_state = t < L
        read_out = t > 0 or not delayed
        for c in range(n_ch):
            if delayed:
                zp[c] = zu[c]
            zu[c] = u[b, t, channel[c]] if read_state else 0.0
        for a in range(n_arr):
            c0, c1 = arr_ptr[a], arr_ptr[a + 1]
            e0, e1 = mode_ptr[c0], mode_ptr[c1]
            # 1. inputs and noise management
            sc = 1.0
            if nm_target > 0.0:
                m = 0.0
                for p in range(2):
                    for e in range(e0, e1):
                        m = max(m, abs(x[p, e] * inv_r_s[p, e]))
                for c in range(c0, c1):
                    m = max(m, abs(zu[c] * inv_r_u[c]), abs(zp[c] * inv_r_u[c]))
                if m > 0.0:
                    sc = m / nm_target
            if recording:
                _record_max(rec_in[b], E, e0, e1, c0, c1, x, zu)
            for k in range(rounds):
                if noise_type >= 0:
                    counter = ((t * B + b) * n_arr + a) * rounds + k
                    n_rows = 2 * (e1 - e0) + (c1 - c0)
                    fill_row_normals(row_key(key, counter), normals[:n_rows], hashes)
                g, scale = 2.0 ** -k / sc, sc * 2.0 ** k
                # the common paths with their flags as literals (quantizing DAC and ADC, no recording)
                if hot and noise_type == NOISE_NONE:
                    n_clip = _read_round(c0, c1, mode_ptr, read_state, read_out, x, zu, zp, g, scale, cells, scales,
                                         consts, (True, True, NOISE_NONE, False, delayed), normals, rec_out[b], cr,
                                         ci, x_new, y_new)
                elif hot and noise_type == NOISE_OUT_ONLY:
                    n_clip = _read_round(c0, c1, mode_ptr, read_state, read_out, x, zu, zp, g, scale, cells, scales,
                                         consts, (True, True, NOISE_OUT_ONLY, False, delayed), normals, rec_out[b],
                                         cr, ci, x_new, y_new)
                else:
                    n_clip = _read_round(c0, c1, mode_ptr, read_state, read_out, x, zu, zp, g, scale, cells, scales,
                                         consts, flags, normals, rec_out[b], cr, ci, x_new, y_new)
                # 6. bound management
                if n_clip > 0 and k < max_round:
                    retries[b] += 1
                    continue
                clipped[b] += n_clip
                if read_out:
                    for c in range(c0, c1):
                        y[b, t - 1 if delayed else t, channel[c]] = y_new[c]
                break
        # 8. the state register (increment: the state rows gave the change, the register adds it)
        if read_state:
            for p in range(2):
                for e in range(E):
                    v = x[p, e] + x_new[p, e] if increment else x_new[p, e]
                    if not (abs(v) <= state_bound and np.isfinite(v)):
                        if overflow[b] < 0:
                            overflow[b] = t
                        v = 0.0 if (v != v or state_bound == np.inf) else np.copysign(state_bound, v)
                    x[p, e] = v
    x_out[b] = x


@njit(cache=True, parallel=True)
def imssa_scan(u, x0, channel, mode_ptr, arr_ptr, delayed, increment, Ga, Gb, Gc, Gd, r_s, r_u, f_s, f_y, step_s, step_y,
               lim_s, lim_y, nm_target, inp_step, qmax_in, clamp_in, g_unit, qmax_out, noise_type, out_noise,
               w_noise, max_round, key, state_bound, rec_in, rec_out):
    """Run the layer's arrays over u (B, L, H) from the state x0 (B, 2, E) (module docstring).

    Per-mode arrays come component-major, each component contiguous over the modes: ``Ga``
    (4, E), ``Gb``, ``Gc``, ``r_s``, ``f_s``, ``step_s``, ``lim_s`` (2, E), states (B, 2, E).
    Returns y (B, L, H) float64 (zeros on unmapped channels), the final state (B, 2, E), per
    sample the clipped outputs accepted, the bound-management reruns of an array, and the
    first overflowing step (-1: none).
    """
    B, L, H = u.shape
    n_arr = arr_ptr.shape[0] - 1
    E = Ga.shape[1]
    recording = rec_in.shape[0] > 0
    k_acc = inp_step * g_unit
    out_noise2 = out_noise * out_noise
    w_noise2 = w_noise * w_noise
    # the periphery's stored scales
    inv_r_s, inv_r_u = 1.0 / r_s, 1.0 / r_u
    dac_s, dac_u = 1.0 / (r_s * inp_step), 1.0 / (r_u * inp_step)
    inv_step_s, inv_step_y = 1.0 / step_s, 1.0 / step_y
    out_s, out_y = step_s * f_s, step_y * f_y
    y = np.zeros((B, L, H))
    x_out = np.empty((B, 2, E))
    clipped = np.zeros(B, dtype=np.int64)
    retries = np.zeros(B, dtype=np.int64)
    overflow = np.full(B, -1, dtype=np.int64)
    max_rows = 0
    for a in range(n_arr):
        c0, c1 = arr_ptr[a], arr_ptr[a + 1]
        max_rows = max(max_rows, 2 * (mode_ptr[c1] - mode_ptr[c0]) + (c1 - c0))
    quant_in, quant_out = qmax_in > 0.0, qmax_out > 0.0
    cells = (Ga, Gb, Gc, Gd)
    scales = (inv_r_s, inv_r_u, dac_s, dac_u, inv_step_s, inv_step_y, out_s, out_y, lim_s, lim_y)
    consts = (nm_target, inp_step, k_acc, g_unit, qmax_in, clamp_in, qmax_out, out_noise2, w_noise2, state_bound)
    outputs = (y, x_out, clipped, retries, overflow)
    flags = (quant_in, quant_out, noise_type, recording, delayed)
    for b in prange(B):
        _run_sample(b, u, x0, channel, mode_ptr, arr_ptr, increment, cells, scales, consts, flags, max_round, key,
                    max_rows, rec_in, rec_out, outputs)
    return y, x_out, clipped, retries, overflow
