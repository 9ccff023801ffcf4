"""Step-by-step twin of ``qs4d_np.hardware.imssa_kernel.imssa_scan``: dense arrays, one MVM at a time.

Same signature and results as the kernel (per-mode arrays component-major: ``Ga`` (4, E),
states (B, 2, E), ...). Each array is rebuilt as the dense block of its channels
(``channel_matrix``'s layout: per channel the outputs re_0, im_0, ..., y and the inputs re_0,
im_0, ..., u and, delayed, the previous input), the unprogrammed positions zero; every read
of every sample then runs the crossbar pipeline on whole vectors:
scale, noise management, DAC, a dense float64 matrix product, read noise (the pure-Python
counter-based normals of ``reference.crossbar``), ADC, bound management, digital rescale and
the state register. Integer codes and levels make the product exact, so on noise-free integer
configurations the twin equals the kernel exactly; with noise the normals are the same numbers,
and the results agree up to the summation order of the product.
"""
from __future__ import annotations

import numpy as np

from reference.crossbar import gaussian

NOISE_NONE, NOISE_OUT_ONLY, NOISE_ADDITIVE, NOISE_PROPORTIONAL = -1, 0, 1, 2


def _dense_arrays(channel, mode_ptr, arr_ptr, delayed, Ga, Gb, Gc, Gd):
    """Per array: (dense G (n_out, n_in), structure mask (n_out, n_in), output lines, input lines);
    a line is ("s", e, p) (state), ("u", c) (input / output), ("p", c) (previous input)."""
    arrays = []
    for a in range(len(arr_ptr) - 1):
        outs, ins = [], []
        for c in range(arr_ptr[a], arr_ptr[a + 1]):
            states = [("s", e, p) for e in range(mode_ptr[c], mode_ptr[c + 1]) for p in range(2)]
            outs += states + [("u", c)]
            ins += states + ([("u", c), ("p", c)] if delayed else [("u", c)])
        row_of = {line: i for i, line in enumerate(outs)}
        col_of = {line: j for j, line in enumerate(ins)}
        G = np.zeros((len(outs), len(ins)))
        mask = np.zeros_like(G)

        def put(row, col, value):
            G[row_of[row], col_of[col]] = value
            mask[row_of[row], col_of[col]] = 1.0

        for c in range(arr_ptr[a], arr_ptr[a + 1]):
            for e in range(mode_ptr[c], mode_ptr[c + 1]):
                re, im, io = ("s", e, 0), ("s", e, 1), ("u", c)
                put(re, re, Ga[0, e])
                put(re, im, Ga[1, e])
                put(im, re, Ga[2, e])
                put(im, im, Ga[3, e])
                put(re, io, Gb[0, e])
                put(im, io, Gb[1, e])
                put(io, re, Gc[0, e])
                put(io, im, Gc[1, e])
            put(("u", c), ("p", c) if delayed else ("u", c), Gd[c])
        arrays.append((G, mask, outs, ins))
    return arrays


def imssa_scan(u, x0, channel, mode_ptr, arr_ptr, delayed, increment, Ga, Gb, Gc, Gd, r_s, r_u, f_s, f_y, step_s, step_y,
               lim_s, lim_y, nm_target, inp_step, qmax_in, clamp_in, g_unit, qmax_out, noise_type, out_noise,
               w_noise, max_round, key, state_bound, rec_in, rec_out):
    B, L, H = u.shape
    E = Ga.shape[1]
    n_arr = len(arr_ptr) - 1
    arrays = _dense_arrays(channel, mode_ptr, arr_ptr, delayed, Ga, Gb, Gc, Gd)
    recording = rec_in.shape[0] > 0
    key = int(key)
    y = np.zeros((B, L, H))
    x_out = np.empty((B, 2, E))
    clipped = np.zeros(B, dtype=np.int64)
    retries = np.zeros(B, dtype=np.int64)
    overflow = np.full(B, -1, dtype=np.int64)

    def per_line(lines, state_values, input_values, prev_values=None):
        table = {"u": input_values, "p": input_values if prev_values is None else prev_values}
        return np.array([state_values[ln[2], ln[1]] if ln[0] == "s" else table[ln[0]][ln[1]] for ln in lines])

    n_ch = len(channel)
    for b in range(B):
        x = np.array(x0[b], dtype=np.float64)
        for t in range(L + 1 if delayed else L):
            if overflow[b] >= 0:  # the sample is lost: the rest is not computed
                break
            x_new = np.empty((2, E))
            u_t = np.array([u[b, t, channel[c]] if t < L else 0.0 for c in range(n_ch)])
            u_prev = np.array([u[b, t - 1, channel[c]] if t > 0 else 0.0 for c in range(n_ch)])
            for a, (G, mask, outs, ins) in enumerate(arrays):
                z = per_line(ins, x, u_t, u_prev)
                r = per_line(ins, r_s, r_u)
                f, step, lim = per_line(outs, f_s, f_y), per_line(outs, step_s, step_y), per_line(outs, lim_s, lim_y)
                # the rows this read converts: delayed, no output before the first state, no state after the last
                read = np.array([(t < L) if ln[0] == "s" else (t > 0 or not delayed) for ln in outs])
                index_in = [2 * ln[1] + ln[2] if ln[0] == "s" else 2 * E + ln[1] for ln in ins]
                index_out = [2 * ln[1] + ln[2] if ln[0] == "s" else 2 * E + ln[1] for ln in outs]
                if recording:
                    for j, v in zip(index_in, np.abs(z)):
                        rec_in[b, j] = max(rec_in[b, j], v)
                sc = 1.0
                if nm_target > 0:
                    m = np.max(np.abs(z * (1.0 / r)))
                    if m > 0:
                        sc = m / nm_target
                for k in range(max_round + 1):
                    codes = z * (1.0 / (r * inp_step)) * (2.0 ** -k / sc)
                    if qmax_in > 0:
                        codes = np.clip(np.rint(codes), -qmax_in, qmax_in)
                    elif clamp_in > 0:
                        codes = np.clip(codes, -clamp_in, clamp_in)
                    v = (G @ codes) * (inp_step * g_unit)
                    if noise_type != NOISE_NONE:
                        counter = ((t * B + b) * n_arr + a) * (max_round + 1) + k
                        normals = np.array([gaussian(key, counter, i) for i in range(len(outs))])
                        xn2 = (codes * inp_step) ** 2
                        q = np.zeros(len(outs))
                        if noise_type == NOISE_ADDITIVE:
                            q = mask @ xn2
                        elif noise_type == NOISE_PROPORTIONAL:
                            q = (np.abs(G) * g_unit) @ xn2
                        v = v + np.sqrt(out_noise ** 2 + w_noise ** 2 * q) * normals
                    w = v * (1.0 / step)
                    if qmax_out > 0:
                        w_clamped = np.clip(np.rint(w), -qmax_out, qmax_out)
                        hit = w_clamped != np.rint(w)
                    else:
                        w_clamped = np.where(lim > 0, np.clip(w, -lim, lim), w)
                        hit = w_clamped != w
                    hit &= read
                    if hit.any() and k < max_round:
                        retries[b] += 1
                        continue
                    clipped[b] += int(hit.sum())
                    if recording:
                        for i in np.flatnonzero(read):
                            rec_out[b, index_out[i]] = max(rec_out[b, index_out[i]], abs(v[i]))
                    out = w_clamped * (step * f) * (sc * 2.0 ** k)
                    for i, ln in enumerate(outs):
                        if not read[i]:
                            continue
                        if ln[0] == "s":
                            x_new[ln[2], ln[1]] = out[i]
                        else:
                            y[b, t - 1 if delayed else t, channel[ln[1]]] = out[i]
                    break
            if t == L:  # the last delayed read converts no state
                continue
            for e in range(E):
                for p in range(2):
                    v = x[p, e] + x_new[p, e] if increment else x_new[p, e]  # increment: the rows gave the change
                    if not (abs(v) <= state_bound and np.isfinite(v)):
                        if overflow[b] < 0:
                            overflow[b] = t
                        v = 0.0 if (np.isnan(v) or state_bound == np.inf) else np.copysign(state_bound, v)
                    x[p, e] = v
        x_out[b] = x
    return y, x_out, clipped, retries, overflow
