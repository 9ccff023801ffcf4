"""Per-epoch cosine schedule with optional linear warmup."""
import math

import pytest

from qs4d_np.train.schedule import CosineSchedule


def test_cosine_matches_closed_form():
    s = CosineSchedule(100)
    assert s.factor(0) == 1.0
    assert s.factor(50) == pytest.approx(0.5, abs=1e-15)
    assert s.factor(25) == pytest.approx((1 + math.sqrt(0.5)) / 2, abs=1e-15)
    assert s.factor(99) == pytest.approx((1 + math.cos(math.pi * 0.99)) / 2, abs=1e-15)
    values = [s.factor(e) for e in range(100)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_torch_cosine_recursion_agrees():
    # torch CosineAnnealingLR's recursive form (eta_min = 0):
    # lr_{t+1} = lr_t * (1 + cos(pi (t+1)/T)) / (1 + cos(pi t/T))
    T = 7
    s = CosineSchedule(T)
    lr = 1.0
    for t in range(T - 1):
        lr = lr * (1 + math.cos(math.pi * (t + 1) / T)) / (1 + math.cos(math.pi * t / T))
        assert s.factor(t + 1) == pytest.approx(lr, rel=1e-12)


def test_warmup_then_cosine():
    s = CosineSchedule(10, warmup_epochs=3)
    assert [s.factor(e) for e in range(3)] == [0.25, 0.5, 0.75]
    assert s.factor(3) == 1.0
    assert s.factor(3 + 7 // 2) == pytest.approx((1 + math.cos(math.pi * 3 / 7)) / 2)


def test_state_and_bad_arguments():
    s = CosineSchedule(10, warmup_epochs=2)
    assert CosineSchedule.from_state(s.state()).factor(5) == s.factor(5)
    with pytest.raises(ValueError, match="epoch must be <= 9"):
        s.factor(10)
    with pytest.raises(ValueError, match="warmup_epochs must be <= 9"):
        CosineSchedule(10, warmup_epochs=10)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        CosineSchedule(0)
