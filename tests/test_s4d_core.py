"""``S4DCore`` on its own: the SSM core y = SSM(u) + D*u, float and quantized, both modes, with its
backward checked against central differences in float64."""
import numpy as np
import pytest

from qs4d_np.quant import QuantConfig
from qs4d_np.ssm.core import ConvSaved, QuantScanSaved, S4DCore, ScanSaved
from reference.gradcheck import grad_error, numerical_grad
from reference.ssm import scan_naive

B, L, H, N = 2, 7, 3, 4


def core(**options):
    c = S4DCore(H, N, dtype=np.float64, seed=0, **options)
    rng = np.random.default_rng(1)
    for name, value in c.params.items():  # away from the symmetric init
        value += 0.05 * rng.standard_normal(value.shape)
    return c


def u_and_g():
    rng = np.random.default_rng(2)
    return rng.standard_normal((B, L, H)), rng.standard_normal((B, L, H))


def test_modes_agree_and_match_the_scan_twin():
    c, (u, _) = core(), u_and_g()
    y_conv, y_rec = c.forward(u, mode="conv"), c.forward(u, mode="recurrent")
    d = c.discrete()
    want, _ = scan_naive(u, d.Abar, d.Bbar, c.params["C"], c.params["D"])
    # float64: the FFT convolution and the scan differ by rounding only (~1e-15 of the output)
    assert np.abs(y_conv - want).max() <= 1e-12 and np.abs(y_rec - want).max() <= 1e-12


# Each case runs one path of the core (the saved record names it) and lists the parameters whose
# loss is smooth: those that reach the output through no quantizer. A quantizer's STE is the
# identity, so through it the analytic gradient is the surrogate's (tests/test_qat.py checks that);
# here the central differences of the real forward must match wherever no code moves.
CASES = {
    "conv float": (dict(), "conv", ConvSaved, ("log_dt", "log_A_real", "A_imag", "C", "D")),
    "conv quantized A, C": (dict(quant=QuantConfig(A=64, C=64)), "conv", ConvSaved, ("log_dt", "D")),
    "recurrent float scan": (dict(abar="discrete"), "recurrent", ScanSaved, ("Abar_rho", "Abar_theta", "Bbar", "C", "D")),
    "recurrent clipped scan, quantized C, D": (
        dict(quant=QuantConfig(C=64, D=64), state_clip=3.0, learn_B=True), "recurrent", QuantScanSaved,
        ("log_dt", "log_A_real", "A_imag", "B")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_central_differences(case):
    options, mode, saved_type, smooth = CASES[case]
    c, (u, g) = core(**options), u_and_g()
    y = c.forward(u, training=True, mode=mode)
    assert isinstance(c._cache, saved_type)
    du = c.backward(g)
    grads = dict(c.grads)
    assert set(grads) == set(c.params) and y.shape == u.shape
    loss = lambda: float(np.sum(g * c.forward(u, mode=mode)))  # noqa: E731
    # the suite's bound for float64 central differences of a smooth loss (docs/ARCHITECTURE.md)
    for name in smooth:
        assert grad_error(grads[name], numerical_grad(loss, c.params[name])) <= 1e-6, name
    assert grad_error(du, numerical_grad(loss, u)) <= 1e-6


def test_core_checks_its_input_and_gradient():
    c, (u, g) = core(), u_and_g()
    with pytest.raises(ValueError, match=r"u must have shape \(batch, length, 3\)"):
        c.forward(u[..., :2])
    with pytest.raises(ValueError, match="mode must be one of"):
        c.forward(u, mode="fft")
    with pytest.raises(RuntimeError, match="before forward"):
        c.backward(g)
    c.forward(u)
    with pytest.raises(ValueError, match="grad must have the forward output's shape"):
        c.backward(g[:, :3])


@pytest.mark.parametrize("abar", ["continuous", "discrete"])
def test_learned_steps_a_mode_does_not_run_get_zero_gradients(abar):
    # every learned step needs a gradient entry for the optimizer; those of quantizers the mode did
    # not run (conv: state, Bbar, D, a continuous core's Abar; recurrent: K, u, A) are zero
    c, (u, g) = core(abar=abar, quant=QuantConfig(16, scale_mode="learned")), u_and_g()
    ran = {"conv": {"A", "C", "dt", "K", "u"} | ({"Abar"} if abar != "continuous" else set()),
           "recurrent": {"Abar", "B", "C", "D", "dt", "x"}}
    for mode in ("conv", "recurrent"):
        c.forward(u, training=True, mode=mode)
        c.backward(g)
        assert set(c.grads) == set(c.params)
        for key, q in c.q.items():
            if q is not None:
                assert np.any(q.grads["step"] != 0) == (key in ran[mode]), (mode, key)


def test_state_quantizer_freezes_per_part_only():
    c = core(quant=QuantConfig(state=256, target_options={"state": {"scale_mode": "fixed", "fixed_range": 2.0}}))
    re, im = c.state_quantizer.frozen_parts(H, np.dtype(np.float64))
    assert re.inv.shape == im.inv.shape == (H,) and not re.check_finite
    with pytest.raises(TypeError, match="use frozen_parts"):
        c.state_quantizer.frozen(np.float64)
    with pytest.raises(ValueError, match="needs a C-contiguous array"):
        re.apply(np.zeros((H, 4)).T)
