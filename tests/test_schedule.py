import math

import pytest

from dynvit import NoiseSchedule, TauSchedule, tau_at


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
def test_endpoints_and_monotone(kind):
    taus = [tau_at(s, 100, 5.0, 0.5, kind) for s in range(0, 131)]
    assert taus[0] == pytest.approx(5.0) and taus[100] == pytest.approx(0.5) and taus[130] == pytest.approx(0.5)
    assert all(b <= a + 1e-12 for a, b in zip(taus, taus[1:]))


def test_shapes():
    assert tau_at(50, 100, 2.0, 1.0, "linear") == pytest.approx(1.5)
    assert tau_at(50, 100, 2.0, 1.0, "cosine") == pytest.approx(1.5)
    assert tau_at(50, 100, 4.0, 1.0, "exponential") == pytest.approx(2.0)
    assert tau_at(25, 100, 2.0, 1.0, "cosine") == pytest.approx(1.0 + 0.5 * (1 + math.cos(math.pi / 4)))
    assert tau_at(10**6, 100, 3.0, 0.1, "constant") == 3.0


def test_pure_function_of_step():
    sched = TauSchedule("cosine", 1.0, 0.1, 1000)
    first = [sched(s) for s in (0, 10, 999, 500)]
    assert [sched(s) for s in (0, 10, 999, 500)] == first  # nothing advances on calls


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown tau schedule"):
        TauSchedule("step", 1.0, 0.1, 10)
    with pytest.raises(ValueError, match="> 0"):
        tau_at(0, 10, 0.0, 1.0, "linear")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_noise_schedule_anneals_to_zero_and_stays(kind):
    sched = NoiseSchedule(kind, 1.0, 0.0, 100)
    scales = [sched(s) for s in range(0, 150)]
    assert scales[0] == 1.0 and scales[100] == 0.0 and scales[149] == 0.0
    assert all(b <= a for a, b in zip(scales, scales[1:]))
    assert NoiseSchedule()(10**6) == 1.0  # the default samples Bernoulli(sigmoid(logit)) throughout


def test_bad_noise_schedules():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NoiseSchedule("linear", 1.5, 0.0, 10)
    with pytest.raises(ValueError, match="exponential"):
        NoiseSchedule("exponential", 1.0, 0.0, 10)
