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
