"""float64 NumPy twins of the core ops and their kernels (slow, obviously correct).

Each function states the formula once, vectorised over NumPy arrays, with no
fusion and no blocking; the tests compare the Numba kernels and the ops'
forward/backward against these.
"""
from __future__ import annotations

import numpy as np
from scipy.special import erf


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# -- activations ---------------------------------------------------------
def gelu(x):
    (x,) = _f64(x)
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def gelu_backward(x, grad):
    x, grad = _f64(x, grad)
    cdf = 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    return grad * (cdf + x * pdf)


def relu(x):
    (x,) = _f64(x)
    return np.maximum(x, 0.0)


def relu_backward(x, grad):
    x, grad = _f64(x, grad)
    return np.where(x > 0, grad, 0.0)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def glu(z, bias=None):
    """GLU along the last axis of z + bias: first half * sigmoid(second half)."""
    (z,) = _f64(z)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    c = z.shape[-1] // 2
    return z[..., :c] * _sigmoid(z[..., c:])


def glu_backward(z, grad, bias=None):
    """(dz, dbias) of ``glu``; dbias sums dz over every leading axis."""
    z, grad = _f64(z, grad)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    c = z.shape[-1] // 2
    a, s = z[..., :c], _sigmoid(z[..., c:])
    dz = np.concatenate([grad * s, grad * a * s * (1.0 - s)], axis=-1)
    return dz, dz.reshape(-1, 2 * c).sum(axis=0)


# -- linear / mixing -----------------------------------------------------
def linear(x, weight, bias=None):
    x, weight = _f64(x, weight)
    y = x @ weight
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)


def linear_backward(x, weight, grad):
    """(dx, dweight, dbias) of y = x @ weight + bias for any leading dims."""
    x, weight, grad = _f64(x, weight, grad)
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad.reshape(-1, grad.shape[-1])
    return grad @ weight.T, x2.T @ g2, g2.sum(axis=0)


# -- norms ---------------------------------------------------------------
def layernorm(x, weight, bias, eps):
    """Returns (y, mean, rstd) normalising over the last axis."""
    x, weight, bias = _f64(x, weight, bias)
    mean = x.mean(axis=-1)
    var = x.var(axis=-1)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean[..., None]) * rstd[..., None]
    return xhat * weight + bias, mean, rstd


def layernorm_backward(x, weight, eps, grad):
    """(dx, dweight, dbias), derived from the forward formula without fusion."""
    x, weight, grad = _f64(x, weight, grad)
    c = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    gh = grad * weight
    dx = rstd * (gh - gh.sum(-1, keepdims=True) / c - xhat * (gh * xhat).sum(-1, keepdims=True) / c)
    lead = tuple(range(x.ndim - 1))
    return dx, (grad * xhat).sum(axis=lead), grad.sum(axis=lead)


def batchnorm_train(x, weight, bias, eps):
    """Training-mode BatchNorm over every axis but the last: (y, mean, biased var)."""
    x, weight, bias = _f64(x, weight, bias)
    lead = tuple(range(x.ndim - 1))
    mean = x.mean(axis=lead)
    var = x.var(axis=lead)
    return (x - mean) / np.sqrt(var + eps) * weight + bias, mean, var


def batchnorm_train_backward(x, weight, eps, grad):
    """(dx, dweight, dbias) of ``batchnorm_train``."""
    x, weight, grad = _f64(x, weight, grad)
    lead = tuple(range(x.ndim - 1))
    m = x.size // x.shape[-1]
    mean = x.mean(axis=lead)
    rstd = 1.0 / np.sqrt(x.var(axis=lead) + eps)
    xhat = (x - mean) * rstd
    dbias = grad.sum(axis=lead)
    dweight = (grad * xhat).sum(axis=lead)
    dx = weight * rstd * (grad - dbias / m - xhat * dweight / m)
    return dx, dweight, dbias


def batchnorm_eval(x, weight, bias, running_mean, running_var, eps):
    x, weight, bias, running_mean, running_var = _f64(x, weight, bias, running_mean, running_var)
    return (x - running_mean) / np.sqrt(running_var + eps) * weight + bias


def column_affine(x, scale, shift):
    x, scale, shift = _f64(x, scale, shift)
    return x * scale + shift


# -- dropout, pooling, loss ----------------------------------------------
def channel_mask_apply(x, mask):
    """x (B, L, C) times a (B, C) mask shared over time."""
    x, mask = _f64(x, mask)
    return x * mask[:, None, :]


def mean_pool(x):
    return np.asarray(x, dtype=np.float64).mean(axis=1)


def last_pool(x):
    return np.asarray(x, dtype=np.float64)[:, -1, :]


def softmax_cross_entropy(logits, labels):
    """(mean loss, dloss/dlogits) for integer labels."""
    (logits,) = _f64(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -logp[np.arange(n), labels].mean()
    dlogits = np.exp(logp)
    dlogits[np.arange(n), labels] -= 1.0
    return loss, dlogits / n
