"""Slow, obviously-correct twin of the modulus-bounded complex quantizer
(``QuantSpec(max_modulus=...)``, kernel ``qs4d_np.kernels.fake_quant.disk_bound``).

Written from the rule in ``QuantSpec``'s docstring with whole-array NumPy
operations in float64 (the four corners side by side, the nearest admissible
one by ``argmin``, which keeps the first of equal distances) and a plain loop
for the rare values where no corner is admissible. The per-part products
x*inv of unprojected values are taken in x's dtype as the plain quantizer
does, so float32 and float64 results match the kernel bit for bit.
"""
from __future__ import annotations

import numpy as np

from reference.quant import fake_quant_ref, grid_ref


def _admissible(kr, ki, iv_r, iv_i, m2):
    a = kr / iv_r
    b = ki / iv_i
    return a * a + b * b <= m2


def bound_codes_ref(x, q, inv, zp, qmin, qmax, max_modulus):
    """Codes (2,) + x.shape (x's real dtype) moved into the disk; q, inv, zp as ``fake_quant_ref``
    returns them (plain codes stacked (real, imag); scales broadcastable to q)."""
    parts = np.stack([x.real, x.imag])
    inv_b, zp_b = np.broadcast_to(inv, q.shape), np.broadcast_to(zp, q.shape)
    iv, z = inv_b.astype(np.float64), zp_b.astype(np.float64)
    m = float(max_modulus)
    m2 = m * m
    keep = _admissible(q[0] - z[0], q[1] - z[1], iv[0], iv[1], m2)

    xv = parts.astype(np.float64)
    r2 = xv[0] * xv[0] + xv[1] * xv[1]
    proj = r2 > m2
    s = m / np.sqrt(np.where(proj, r2, 1.0))
    xp = np.where(proj, xv * s, xv)
    u = np.where(proj, xp * iv, (parts * inv_b).astype(np.float64))

    def saturate(k):
        return np.clip(k + z, qmin, qmax) - z

    zero_ward = saturate(np.where(u >= 0, np.floor(u), np.ceil(u)))
    outward = saturate(np.where(u >= 0, np.ceil(u), np.floor(u)))
    corners = [(zero_ward[0], zero_ward[1]), (zero_ward[0], outward[1]),
               (outward[0], zero_ward[1]), (outward[0], outward[1])]
    dists = []
    for kr, ki in corners:
        dr = kr / iv[0] - xp[0]
        di = ki / iv[1] - xp[1]
        dists.append(np.where(_admissible(kr, ki, iv[0], iv[1], m2), dr * dr + di * di, np.inf))
    dists = np.stack(dists)
    pick = np.argmin(dists, axis=0)
    k = np.stack([np.choose(pick, [c[0] for c in corners]), np.choose(pick, [c[1] for c in corners])])

    # no admissible corner (float rounding of x*inv): walk the larger part toward zero
    for idx in zip(*np.nonzero(~keep & np.isinf(dists.min(axis=0)))):
        kr, ki = float(zero_ward[0][idx]), float(zero_ward[1][idx])
        ivr, ivi = float(iv[0][idx]), float(iv[1][idx])
        while not _admissible(kr, ki, ivr, ivi, m2):
            if abs(kr / ivr) >= abs(ki / ivi):
                kr -= np.sign(kr)
            else:
                ki -= np.sign(ki)
        k[0][idx], k[1][idx] = kr, ki
    return np.where(keep, q, (k + z).astype(q.dtype))


def fake_quant_disk_ref(x, levels, max_modulus, **options):
    """``fake_quant_ref`` with the modulus bound: (x_hat, q, inv, zp), q stacked (real, imag)."""
    x = np.asarray(x)
    if not np.iscomplexobj(x):
        raise ValueError("the modulus bound is for complex tensors")
    _, q, inv, zp = fake_quant_ref(x, levels, **options)
    qmin, qmax, _ = grid_ref(options.get("grid", "narrow"), levels, options.get("symmetric", True))
    q = bound_codes_ref(x, q, inv, zp, qmin, qmax, max_modulus)
    out = ((q - zp) / inv).astype(q.dtype)
    return (out[0] + 1j * out[1]).astype(x.dtype), q, inv, zp
