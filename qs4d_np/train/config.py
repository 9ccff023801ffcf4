"""The hyperparameters of a training run (``TrainConfig``), checked when it is made."""
from __future__ import annotations

import dataclasses

from qs4d_np.core.checks import check_bool, check_choice, check_float, check_int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a run (the QS4D / state-spaces recipe by default, 100 epochs).

    ``eval_batch_size`` matters beyond speed for quantized models: activation
    scales are taken over the whole batch (SPEC section 2), so evaluation
    results depend on it, as in the reference.
    """

    epochs: int = 100
    batch_size: int = 64
    eval_batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 0.01
    ssm_lr_cap: float | None = 0.001
    warmup_epochs: int = 0
    clip_norm: float | None = None
    seed: int = 0
    drop_last: bool = False
    noise: float = 0.0
    noise_protocol: str = "qs4d"
    noise_targets: tuple[str, ...] = ("A",)
    noise_eval: bool = False

    # ``noise`` sigma > 0: noise-aware training. Every training forward (and its backward) runs
    # inside ``qs4d_np.hardware.noise.transient_noise(model, noise, rng, noise_protocol,
    # noise_targets)``: fresh noise on the values the forward computes with (after the
    # quantizers), straight through in the backward, so the optimizer updates the float weights.
    # ``noise_eval``: validation and test run under the same noise (the reference's choice).
    # The generator is seeded from ``seed`` and saved with the checkpoints.

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, min_value=1)
        check_int("batch_size", self.batch_size, min_value=1)
        check_int("eval_batch_size", self.eval_batch_size, min_value=1)
        check_float("lr", self.lr, min_value=0.0, min_inclusive=False)
        check_float("weight_decay", self.weight_decay, min_value=0.0)
        if self.clip_norm is not None:
            check_float("clip_norm", self.clip_norm, min_value=0.0, min_inclusive=False)
        check_int("seed", self.seed, min_value=0)
        check_float("noise", self.noise, min_value=0.0)
        from qs4d_np.hardware.noise import PROTOCOLS, TARGETS  # hardware only for its names
        check_choice("noise_protocol", self.noise_protocol, PROTOCOLS)
        if isinstance(self.noise_targets, str) or not self.noise_targets:
            raise ValueError(f"noise_targets must be a non-empty sequence of {list(TARGETS)}, "
                             f"got {self.noise_targets!r}")
        object.__setattr__(self, "noise_targets", tuple(self.noise_targets))  # frozen: normalise once
        for t in self.noise_targets:
            check_choice("noise_targets entry", t, TARGETS)
        check_bool("noise_eval", self.noise_eval)
        check_bool("drop_last", self.drop_last)
