"""A frozen ``S4DModelStream`` packed into the arrays of the fused streaming kernel (``kernels.stream``).

``PackedStream(stream)`` reads the pieces the stream froze (per block the ``BlockStepper``: its
``S4DStepper``'s ``CoreStep`` and act ``FrozenQuant``, the activation and mixing copies, the
norm; the encoder and decoder copies with their evaluation weights) and lays them out as
``kernels.stream.stream_steps`` takes them, once. ``run`` then costs one kernel call for any
number of steps, plus the BLAS products whose rounding belongs to BLAS, run with NumPy as the
forward runs them: the decoder of every step, and the encoder when d_input > 1 (at d_input = 1
each output is one product, which the kernel computes exactly as BLAS does).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np

from qs4d_np.core.activations import GELU, ReLU
from qs4d_np.core.checks import check_array
from qs4d_np.core.linear import Linear
from qs4d_np.core.mixing import PointwiseGLU
from qs4d_np.core.norm import BatchNorm, LayerNorm
from qs4d_np.kernels import stream as k
from qs4d_np.ssm.stream import CoreStep

if TYPE_CHECKING:
    from qs4d_np.models.stream import S4DModelStream

# Steps per pipeline chunk when ``run`` spreads the layers over Numba's threads: one parallel
# region (~4 us) per chunk; 16-64 measured alike for 784 steps of s4d-example at batch 1
PIPELINE_CHUNK = 32
ACTIVATIONS = {GELU: k.ACT_GELU, ReLU: k.ACT_RELU}
NORMS = {LayerNorm: k.NORM_LAYER, BatchNorm: k.NORM_BATCH}


def _norm_rows(norm: LayerNorm | BatchNorm | None, H: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, float]:
    """(weight, bias, eps) the kernel's norm computes with: LayerNorm's own, BatchNorm's
    evaluation scale and shift (eps unused there), ones and zeros without a norm."""
    if isinstance(norm, LayerNorm):
        return norm.params["weight"], norm.params["bias"], norm.eps
    if isinstance(norm, BatchNorm):
        return (*norm.eval_affine(), norm.eps)
    return np.ones(H, dtype), np.zeros(H, dtype), 0.0


class PackedStream:
    """The kernel's arrays of one frozen stream (shapes in ``kernels.stream``), all copies."""

    @staticmethod
    def accepts(stream: "S4DModelStream") -> bool:
        """Whether the kernel knows every part of ``stream``: digital cores (``CoreStep``) and plain
        ``Linear`` products (an analog model's parts run their own arithmetic, on the per-op path)."""
        linears = [stream.encoder, stream.decoder] + [op.linear for block in stream.blocks
                                                      for op in block.ssm.post_ops if isinstance(op, PointwiseGLU)]
        return (all(isinstance(block.ssm.core, CoreStep) for block in stream.blocks)
                and all(type(linear) is Linear for linear in linears))

    def __init__(self, stream: "S4DModelStream") -> None:
        dtype, H, M = stream.dtype, stream.d_model, stream.d_state // 2
        blocks = stream.blocks
        n = len(blocks)
        first = blocks[0]
        post = {type(op): op for op in first.ssm.post_ops}
        mixing = post.get(PointwiseGLU)
        activation = next((code for cls, code in ACTIVATIONS.items() if cls in post), k.ACT_NONE)
        self.dtype, self.n_layers, self.d_model, self.d_state = dtype, n, H, stream.d_state
        self.d_input = stream.encoder.d_in
        self.encode = self.d_input == 1
        self.mean_pool = stream.pool == "mean"
        opts = np.zeros(k.OPT_COUNT, np.int64)
        opts[[k.ENCODE, k.ACTIVATION, k.MIXING, k.NORM, k.PRENORM, k.RESIDUAL, k.POOL]] = (
            self.encode, activation, mixing is not None, NORMS.get(type(first.norm), k.NORM_NONE), first.prenorm,
            first.residual, k.POOL_MEAN if self.mean_pool else k.POOL_LAST)

        ssm = np.empty((n, M, 6, H), dtype)
        vec = np.empty((n, k.VEC_ROWS, H), dtype)
        scal = np.empty((n, k.SCAL_COLS), dtype)
        eps = np.empty(n)
        lflags = np.zeros((n, k.LFLAG_COLS), np.int64)
        W = np.empty((n, H, 2 * H) if mixing is not None else (n, 0, 0), dtype)
        wb = np.empty((n, 2 * H) if mixing is not None else (n, 0), dtype)
        for i, block in enumerate(blocks):
            core, act = block.ssm.core, block.ssm.act
            ssm[i] = np.stack([part.T for z in (core.Abar, core.Bbar, core.C) for part in (z.real, z.imag)], axis=1)
            vec[i, k.D] = core.D
            vec[i, k.NORM_W], vec[i, k.NORM_B], eps[i] = _norm_rows(block.norm, H, dtype)
            scal[i] = (np.inf, -1, 1, -1, 1)  # bounds of the quantizers a layer lacks are never read
            vec[i, [k.STATE_INV_RE, k.STATE_INV_IM, k.ACT_INV]] = 1
            vec[i, k.ACT_ZP] = 0
            if core.clip is None:
                lflags[i, k.STATE_KIND] = k.STATE_FLOAT
            else:
                scal[i, k.CLIP] = core.clip
                lflags[i, k.STATE_KIND] = k.STATE_CLIP
            if core.state is not None:  # the real and imaginary parts share the grid and rule
                re, im = core.state
                lflags[i, [k.STATE_KIND, k.STATE_ROUNDING]] = k.STATE_QUANT, re.rounding
                vec[i, k.STATE_INV_RE], vec[i, k.STATE_INV_IM] = re.inv, im.inv
                scal[i, [k.STATE_QMIN, k.STATE_QMAX]] = re.qmin, re.qmax
            if act is not None:
                lflags[i, [k.ACT_QUANT, k.ACT_ROUNDING]] = 1, act.rounding
                vec[i, k.ACT_INV], vec[i, k.ACT_ZP] = act.inv, act.zp  # a per-tensor scale repeats
                scal[i, [k.ACT_QMIN, k.ACT_QMAX]] = act.qmin, act.qmax
            if mixing is not None:
                linear = block.ssm.post_ops[-1].linear  # the mixing comes last
                W[i], wb[i] = linear.params["weight"], linear.params["bias"]
        enc = stream.encoder.params
        self._enc_w, self._enc_b = enc["weight"].copy(), enc["bias"].copy()
        dec = stream.decoder.params
        self._dec_w, self._dec_b = dec["weight"].copy(), dec["bias"].copy()
        enc2 = np.stack([self._enc_w[0], self._enc_b]) if self.encode else np.zeros((2, H), dtype)
        self._args = (enc2, ssm, vec, scal, eps, lflags, opts, W, wb)
        self._act_names = [None if b.ssm.act is None else b.ssm.act.name for b in blocks]
        self._no_pool = np.zeros((0, H))

    def run(self, x: np.ndarray, ssm: tuple[np.ndarray, ...], pool_sum: np.ndarray | None,
            steps: int, name: str) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray | None]:
        """T steps from a checked state: x (T, batch, d_input) C-contiguous in the dtype, ``ssm``
        the (d_state/2, batch, d_model) complex C-contiguous states, ``pool_sum`` (batch, d_model) float64
        (None for last pooling), ``steps`` taken before -> (logits (T, batch, d_output), the new
        states, the new pool_sum). The kernel checks x's values when d_input = 1 (``encode``; the
        caller checks them otherwise): a NaN or inf raises ``check_array``'s error for ``name``;
        one met by an act quantizer raises ValueError naming the quantizer, as ``FrozenQuant``.
        More than ``PIPELINE_CHUNK`` steps run pipelined over ``numba.get_num_threads()`` threads
        (``kernels.stream.stream_steps_pipelined``: the same bits; ``numba.set_num_threads(1)``
        keeps a stream on one core)."""
        B = x.shape[1]
        # NumPy's stacked matmul runs the 2-D product on each step's (batch, .) rows with the BLAS
        # routine that product alone takes, i.e. the forward's rounding (checked bit for bit in tests)
        if not self.encode:
            x = x @ self._enc_w
            x += self._enc_b
        out = np.empty((self.n_layers, *ssm[0].shape), ssm[0].dtype)
        pool_out = np.empty((B, self.d_model)) if self.mean_pool else self._no_pool
        feat = np.empty((x.shape[0], B, self.d_model), self.dtype)
        args = (x, *self._args, ssm, self._no_pool if pool_sum is None else pool_sum, steps, out, pool_out, feat)
        stages = min(numba.get_num_threads(), self.n_layers) if x.shape[0] > PIPELINE_CHUNK else 1
        status, count = k.stream_steps_pipelined(*args, stages, PIPELINE_CHUNK) if stages > 1 else k.stream_steps(*args)
        if status:
            if status < 0:
                check_array(name, x)  # raises: the input's count of NaN / inf in the usual words
            raise ValueError(f"{self._act_names[status - 1]}: the stream's values contain {count} non-finite "
                             "value(s) (NaN or inf); cannot quantize")
        # one step (``step``): the forward's own 2-D product, without the stacked matmul's ~1 us of set-up
        logits = (feat[0] @ self._dec_w)[None] if feat.shape[0] == 1 else feat @ self._dec_w
        logits += self._dec_b
        return logits, tuple(out), pool_out if self.mean_pool else None
