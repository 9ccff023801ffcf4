"""Plain-Python-int twin of the golden SSM core (qs4d_np.golden.layer).

Python ints never overflow, so agreement with the int64 NumPy path on inputs
at the grid edges proves the int64 path never overflowed. Written from the
spec (docs/integer_spec.md, section 4) with loops and divmod, sharing no code
with the fast path.
"""
from __future__ import annotations


def rne_div_pow2(value: int, shift: int) -> int:
    """value / 2**shift rounded half to even (exact, any size)."""
    q, r = divmod(value, 1 << shift)  # floor division: r in [0, 2**shift)
    twice = 2 * r
    if twice > (1 << shift) or (twice == (1 << shift) and q % 2 == 1):
        q += 1
    return q


def clamp(value: int, lo: int, hi: int) -> tuple[int, int]:
    return min(max(value, lo), hi), int(value < lo or value > hi)


def ssm_core_run(p: dict, u: list, x_grid: tuple[int, int], y_grid: tuple[int, int]) -> dict:
    """Run the core over u[b][t][h] with weights/multipliers ``p`` given as nested lists of ints.

    Returns nested lists: x_re[b][t][h][n], x_im, y[b][t][h] and the 0/1
    saturation flags sat_x_re, sat_x_im, sat_y.
    """
    H, N2 = len(p["Abar_re"]), len(p["Abar_re"][0])
    out = {k: [] for k in ("x_re", "x_im", "y", "sat_x_re", "sat_x_im", "sat_y")}
    for seq in u:
        x = [[(0, 0)] * N2 for _ in range(H)]
        rows = {k: [] for k in out}
        for u_t in seq:
            step = {k: [] for k in out}
            for h in range(H):
                xr_row, xi_row, sr_row, si_row = [], [], [], []
                S_re = S_im = 0
                for n in range(N2):
                    a_re, a_im = p["Abar_re"][h][n], p["Abar_im"][h][n]
                    xr, xi = x[h][n]
                    acc_re = (p["m_a_re"][h][n] * a_re * xr - p["m_a_im_to_re"][h][n] * a_im * xi
                              + p["m_b_re"][h][n] * p["Bbar_re"][h][n] * u_t[h])
                    acc_im = (p["m_a_re"][h][n] * a_re * xi + p["m_a_im_to_im"][h][n] * a_im * xr
                              + p["m_b_im"][h][n] * p["Bbar_im"][h][n] * u_t[h])
                    new_re, s_re = clamp(rne_div_pow2(acc_re, p["r_x"][h][n]), *x_grid)
                    new_im, s_im = clamp(rne_div_pow2(acc_im, p["r_x"][h][n]), *x_grid)
                    x[h][n] = (new_re, new_im)
                    S_re += p["C_re"][h][n] * new_re
                    S_im += p["C_im"][h][n] * new_im
                    xr_row.append(new_re), xi_row.append(new_im), sr_row.append(s_re), si_row.append(s_im)
                acc_y = p["m_c_re"][h] * S_re - p["m_c_im"][h] * S_im + p["m_d"][h] * p["D"][h] * u_t[h]
                y, s_y = clamp(rne_div_pow2(acc_y, p["r_y"][h]), *y_grid)
                for key, val in zip(out, (xr_row, xi_row, y, sr_row, si_row, s_y)):
                    step[key].append(val)
            for key in out:
                rows[key].append(step[key])
        for key in out:
            out[key].append(rows[key])
    return out


def requant(terms: list, mults: list, shift: int, grid: tuple[int, int], offset: int = 0, sign: int = 1) -> int:
    """sat(RNE((sign * sum_k M_k * T_k + offset) / 2**shift)) with Python ints (docs/integer_spec.md 2.3)."""
    return clamp(rne_div_pow2(sign * sum(m * t for m, t in zip(mults, terms)) + offset, shift), *grid)[0]


def linear_requant(a: list, lin) -> list:
    """One ``IntLinear`` of the golden model on a vector ``a`` of ints, from its int arrays as Python ints."""
    W, b = lin.W.tolist(), lin.b.tolist()
    M, R, f = lin.requant.M[0].tolist(), lin.requant.R.tolist(), lin.requant.fmt
    return [requant([sum(W[h][o] * a[h] for h in range(len(a))) + b[o]], [M[o]], R[o], (f.qmin, f.qmax))
            for o in range(len(b))]


def model_run(model, x: list) -> list:
    """Logits of the whole integer model (qs4d_np.golden.IntegerModel) on x[b][t][i], in Python ints.

    Layer by layer over whole sequences (the ops after the core are pointwise
    in time); the core is ``ssm_core_run``. Shares no arithmetic with the
    int64 paths: only the parameter words are read from ``model``.
    """
    u = [[linear_requant(x_t, model.encoder) for x_t in seq] for seq in x]
    for layer in model.layers:
        core, f = layer.core, layer.core.formats
        p = {k: v.tolist() for k, v in core.arrays().items()}
        y = ssm_core_run(p, u, (f.x.qmin, f.x.qmax), (f.y.qmin, f.y.qmax))["y"]
        lut, zb_min = layer.sig_lut.tolist(), layer.mix_b.requant.fmt.qmin
        g, post = layer.glu, layer.post
        out = []
        for seq_y, seq_u in zip(y, u):
            rows = []
            for y_t, u_t in zip(seq_y, seq_u):
                za, zb = linear_requant(y_t, layer.mix_a), linear_requant(y_t, layer.mix_b)
                act = [requant([za[h] * lut[zb[h] - zb_min]], [int(g.M[0][h])], int(g.R[h]), (g.fmt.qmin, g.fmt.qmax))
                       for h in range(len(za))]
                if post is not None:
                    act = [requant([act[h], u_t[h]] if layer.residual else [act[h]],
                                   [int(m[h]) for m in post.M], int(post.R[h]), (post.fmt.qmin, post.fmt.qmax),
                                   0 if post.offset is None else int(post.offset[h]),
                                   1 if post.sign is None else int(post.sign[h])) for h in range(len(act))]
                rows.append(act)
            out.append(rows)
        u = out
    pool, dec = model.pool, model.decoder
    logits = []
    for seq in u:
        pooled = [sum(step[h] for step in seq) for h in range(len(seq[0]))]
        avg = [requant([pooled[h]], [int(pool.M[0][h])], int(pool.R[h]), (pool.fmt.qmin, pool.fmt.qmax))
               for h in range(len(pooled))]
        logits.append(linear_requant(avg, dec))
    return logits
