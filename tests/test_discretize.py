"""ZOH / bilinear discretization: accuracy against exact references, the A = 0 limit, gradients, argument checks."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.ssm.discretize import derivatives, discretize, discretize_backward, discretize_dt_A, zoh_phi1, zoh_psi
from reference.gradcheck import grad_error, numerical_grad
from reference.ssm import bilinear_exact, zoh_factors_decimal

# Measured worst relative errors of zoh_phi1 / zoh_psi against the 60-digit decimal series
# over 4000 log-uniform points of the left half-plane, 1e-9 <= |z| <= 60: 6.5e-16
# (a few ulp, from exp/expm1 and the final division). 2e-15 leaves a 3x margin;
# the closed forms it replaced miss it by up to 1e10x (3.2e-5 at z = -1e-6).
ZOH_RTOL = 2e-15
# bilinear: a handful of correctly rounded complex operations, each <= ~2 ulp
BILINEAR_RTOL = 2e-15


def rel(got, want):
    return abs(got - want) / abs(want)


def one_mode(dt, A, method):
    """discretize() for one channel with one mode A (Re(A) < 0) and step dt."""
    return discretize(np.array([np.log(dt)]), np.array([[np.log(-A.real)]]), np.array([[A.imag]]), None, method)


# left half-plane points: |z| log-uniform over 1e-9..60, argument in [pi/2, 3pi/2]
left_half_plane = st.builds(lambda r, th: complex(r * np.cos(th), r * np.sin(th)),
                            st.floats(1e-9, 60.0).map(float), st.floats(np.pi / 2, 3 * np.pi / 2))


@settings(max_examples=60, deadline=None)
@given(st.one_of(left_half_plane, st.sampled_from([0j, -1.5 + 0j, 1.5j, -1.5 - 1e-12j, -1.4999999 + 0j,
                                                    -1e-6 + 2j * np.pi, -1e-300 + 0j, -700 + 0j])))
def test_zoh_factors_match_decimal_series(z):
    phi1, psi = zoh_phi1(np.array([z])), zoh_psi(np.array([z]))
    ref_phi1, ref_psi = zoh_factors_decimal(z)
    assert rel(phi1[0], ref_phi1) <= ZOH_RTOL
    assert rel(psi[0], ref_psi) <= ZOH_RTOL


@pytest.mark.parametrize("dt, A", [(1e-3, -0.5 + 0j), (1e-4, -0.5 + 0j), (1e-5, -0.5 + 0j), (1e-3, -1e-3 + 0j),
                                   (1e-3, -0.5 + 0.785j), (1e-2, -0.5 + 3j), (0.1, -0.5 + 30j), (0.1, -2.0 + 10j)])
def test_zoh_bbar_and_its_A_derivative_are_accurate(dt, A):
    """The review's cases: dBbar0/dA by the closed form was off by 1.6e-10 .. 3.2e-5 relative here."""
    d = one_mode(dt, A, "zoh")
    dt_, A_ = float(d.dt[0, 0]), complex(d.A[0, 0])  # the values discretize actually used
    phi1, psi = zoh_factors_decimal(dt_ * A_)
    dAbar_dA, dAbar_ddt, dBbar0_dA, dBbar0_ddt = (x[0, 0] for x in derivatives(d))
    assert rel(d.Bbar0[0, 0], dt_ * phi1) <= ZOH_RTOL
    assert rel(dBbar0_dA, dt_**2 * psi) <= ZOH_RTOL
    # the remaining ones are products of exp(z), which is correctly rounded to a few ulp
    E = np.exp(dt_ * A_)
    assert rel(dAbar_dA, dt_ * E) <= ZOH_RTOL and rel(dAbar_ddt, A_ * E) <= ZOH_RTOL
    assert rel(dBbar0_ddt, E) <= ZOH_RTOL


@pytest.mark.parametrize("dt, A", [(1e-3, -0.5 + 0j), (1e-5, -1e-3 + 0j), (1e-2, -0.5 + 3j), (0.1, -0.5 + 30j),
                                   (0.5, -3.0 + 1j), (1.0, -0.01 + 100j)])
def test_bilinear_matches_exact_rational_arithmetic(dt, A):
    d = one_mode(dt, A, "bilinear")
    exact = bilinear_exact(float(d.dt[0, 0]), complex(d.A[0, 0]))
    got = dict(zip(("dAbar_dA", "dAbar_ddt", "dBbar0_dA", "dBbar0_ddt"), (x[0, 0] for x in derivatives(d))))
    got.update(Abar=d.Abar[0, 0], Bbar0=d.Bbar0[0, 0])
    for name, want in exact.items():
        assert rel(got[name], want) <= BILINEAR_RTOL, name


@pytest.mark.filterwarnings("error")  # 0/0 used to warn and give nan+nanj
@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_A_zero_takes_the_limits(method):
    """A quantized mode can have A = 0 exactly (Im(A) = 0 and Re(A) rounded to 0).

    ZOH limits as A -> 0 of Bbar0 = (e^{dt A} - 1)/A: dt; of dBbar0/dA: dt^2/2
    (the series dt^2 sum (k-1) z^(k-2)/k! at z = 0); of dBbar0/ddt = e^{dt A}: 1.
    Bilinear is regular there: Bbar0 = dt, dBbar0/dA = dt^2/2, dBbar0/ddt = 1 too.
    """
    dt = np.array([1e-3, 0.25])
    d = discretize_dt_A(dt, np.zeros((2, 1), dtype=np.complex128), None, method)
    dAbar_dA, dAbar_ddt, dBbar0_dA, dBbar0_ddt = derivatives(d)
    np.testing.assert_array_equal(d.Abar[:, 0], 1.0)
    np.testing.assert_array_equal(d.Bbar0[:, 0], dt)
    np.testing.assert_allclose(dBbar0_dA[:, 0], dt**2 / 2, rtol=1e-15)
    np.testing.assert_array_equal(dBbar0_ddt[:, 0], 1.0)
    np.testing.assert_array_equal(dAbar_dA[:, 0], dt)
    np.testing.assert_array_equal(dAbar_ddt[:, 0], 0.0)
    # the same through the public entry: exp(-800) underflows to 0, so A = 0 there too
    d = discretize(np.log(dt), np.full((2, 1), -800.0), np.zeros((2, 1)), None, method)
    assert np.all(d.A == 0) and np.array_equal(d.Bbar0, d.dt)
    # and the limits are the derivatives: central differences in A and dt around A = 0
    h = 1e-4
    for k, t in enumerate(dt):
        def bbar0(A, t=t):
            return discretize_dt_A(np.array([t]), np.array([[A]]), None, method).Bbar0[0, 0]
        fd_A = (bbar0(h) - bbar0(-h)) / (2 * h)  # holomorphic: the real-direction quotient is d/dA
        fd_dt = (discretize_dt_A(np.array([t + h]), np.zeros((1, 1)), None, method).Bbar0[0, 0]
                 - discretize_dt_A(np.array([t - h]), np.zeros((1, 1)), None, method).Bbar0[0, 0]) / (2 * h)
        # truncation O(h^2 * dt^3) relative to dt^2/2 (ZOH) / O(h^2 dt^2) (bilinear): < 1e-7 here
        assert rel(dBbar0_dA[k, 0], fd_A) <= 1e-7
        assert rel(dBbar0_ddt[k, 0], fd_dt) <= 1e-7


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("dt_range", [(1e-3, 1e-1), (0.2, 2.0)])
def test_discretize_backward_matches_finite_differences(method, dt_range):
    """All four parameter gradients, with |dt*A| on both sides of the series switch (|z| = 1.5).

    Not at dt <= 1e-4: there the gradients are ~dt^2 small against a loss of
    O(1), and central differences' own rounding (eps*|loss|/h) is ~1e-5 of
    them; that regime is covered by the comparisons with the exact series.
    """
    rng = np.random.default_rng(int(dt_range[0] * 1e5) + len(method))
    H, M = 2, 4
    log_dt = rng.uniform(np.log(dt_range[0]), np.log(dt_range[1]), H)
    log_A_real = rng.uniform(-3, 1, (H, M))
    A_imag = rng.uniform(-5, 5, (H, M))
    B = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    gA = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    gB = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))

    def loss():
        d = discretize(log_dt, log_A_real, A_imag, B, method)
        return float(np.sum(np.real(np.conj(gA) * d.Abar) + np.real(np.conj(gB) * d.Bbar)))

    grads = discretize_backward(discretize(log_dt, log_A_real, A_imag, B, method), B, gA, gB)
    for name, x in (("log_dt", log_dt), ("log_A_real", log_A_real), ("A_imag", A_imag), ("B", B)):
        assert grad_error(grads[name], numerical_grad(loss, x)) <= 1e-6, name


def test_discretize_argument_checks():
    ok = dict(log_dt=np.zeros(1), log_A_real=np.zeros((1, 4)), A_imag=np.zeros((1, 4)), B=None, method="zoh")

    def call(**kw):
        return discretize(**{**ok, **kw})

    with pytest.raises(ValueError, match=r"method must be one of \['zoh', 'bilinear'\], got 'euler'"):
        call(method="euler")
    # used to broadcast silently to (2, 4)
    with pytest.raises(ValueError, match=r"log_A_real must have shape \(2, \*\), got \(1, 4\)"):
        call(log_dt=np.zeros(2))
    with pytest.raises(ValueError, match=r"log_dt must have 1 dimensions, got shape \(1, 1\)"):
        call(log_dt=np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"A_imag must have shape \(1, 4\), got \(1, 3\)"):
        call(A_imag=np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"B must have shape \(1, 4\), got \(4,\)"):
        call(B=np.ones(4, dtype=complex))
    with pytest.raises(ValueError, match="log_dt contains 1 non-finite"):
        call(log_dt=np.array([np.nan]))
    with pytest.raises(ValueError, match="log_A_real contains 4 non-finite"):
        call(log_A_real=np.full((1, 4), -np.inf))
    with pytest.raises(TypeError, match="A_imag must be a numpy array, got list"):
        call(A_imag=[[0.0] * 4])
    with pytest.raises(TypeError, match="A_imag must be real"):
        call(A_imag=np.zeros((1, 4), dtype=complex))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert call(log_dt=np.zeros(3), log_A_real=np.zeros((3, 2)), A_imag=np.zeros((3, 2))).Abar.shape == (3, 2)
