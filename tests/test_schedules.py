"""Schedules against their closed forms."""

import pytest

from compressor.schedules import CubicSchedule, OneShot, ThresholdSchedule, count_to_prune, q_for_final_sparsity


def test_threshold_schedule_closed_form_values():
    # θ = 2·q·freq / (2·(ramp − start) + 3·(end − ramp)) = 2·0.5·10 / (400 + 600) = 0.01, φ = 0.015
    s = ThresholdSchedule(start_itr=100, ramp_itr=300, end_itr=500, freq=10)
    assert s.theta(0.5) == pytest.approx(0.01, rel=1e-12)
    assert s.phi(0.5) == pytest.approx(0.015, rel=1e-12)
    # itr < ramp: θ·(itr − start + 1)/freq
    assert s.target(150, q=0.5) == pytest.approx(0.01 * 51 / 10, rel=1e-12)
    # itr >= ramp: (θ·(ramp − start + 1) + φ·(itr − ramp + 1))/freq
    assert s.target(400, q=0.5) == pytest.approx((0.01 * 201 + 0.015 * 101) / 10, rel=1e-12)
    assert s.target(300, q=0.5) == pytest.approx((0.01 * 201 + 0.015 * 1) / 10, rel=1e-12)


def test_threshold_schedule_update_steps_and_monotone():
    s = ThresholdSchedule(start_itr=100, ramp_itr=300, end_itr=500, freq=10)
    updates = [i for i in range(0, 600) if s.is_update_step(i)]
    assert updates == list(range(110, 500, 10))  # start < itr < end, itr % freq == 0
    values = [s.target(i, q=1.0) for i in updates]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert s.last_update_itr() == 490


def test_threshold_schedule_custom_phi_ratio():
    s = ThresholdSchedule(start_itr=0, ramp_itr=10, end_itr=20, freq=1, phi_ratio=2.0)
    assert s.phi(1.0) == pytest.approx(2.0 * s.theta(1.0))


def test_q_for_final_sparsity_hits_the_final_threshold():
    s = ThresholdSchedule(start_itr=7, ramp_itr=33, end_itr=101, freq=4)
    q = q_for_final_sparsity(s, final_threshold=0.123)
    assert s.target(s.last_update_itr(), q=q) == pytest.approx(0.123, rel=1e-12)
    # the paper's choice: the final threshold is close to q
    assert q == pytest.approx(0.123, rel=0.1)


@pytest.mark.parametrize("bad", [dict(start_itr=10, ramp_itr=5, end_itr=20), dict(start_itr=0, ramp_itr=0, end_itr=5, freq=10)])
def test_threshold_schedule_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        ThresholdSchedule(**bad)


def tfmot_polynomial_decay(step, initial_sparsity, final_sparsity, begin_step, end_step, frequency, power=3):
    """TF Model Optimization's PolynomialDecay (prune_schedule.py), transcribed: returns
    (should_prune, sparsity)."""
    p = min(1.0, max(0.0, (step - begin_step) / (end_step - begin_step)))
    sparsity = (initial_sparsity - final_sparsity) * (1 - p) ** power + final_sparsity
    in_range = begin_step <= step and step <= end_step
    is_turn = (step - begin_step) % frequency == 0
    return in_range and is_turn, sparsity


@pytest.mark.parametrize("initial,final,t0,n,dt", [(0.0, 0.9, 0, 10, 10), (0.2, 0.95, 37, 7, 13), (0.0, 0.5, 5, 1, 100)])
def test_cubic_schedule_matches_tfmot_polynomial_decay(initial, final, t0, n, dt):
    s = CubicSchedule(final_sparsity=final, start_itr=t0, n_steps=n, delta_t=dt, initial_sparsity=initial)
    for step in range(0, t0 + n * dt + 3 * dt):
        should, expected = tfmot_polynomial_decay(step, initial, final, t0, t0 + n * dt, dt)
        assert s.is_update_step(step) == should, step
        assert s.target(step) == pytest.approx(expected, abs=1e-12), step


def test_cubic_schedule_hand_value():
    # s_t = 0.9 + (0 − 0.9)·(1 − 50/100)³ = 0.7875
    s = CubicSchedule(final_sparsity=0.9, start_itr=0, n_steps=10, delta_t=10)
    assert s.target(50) == pytest.approx(0.7875, abs=1e-12)
    assert s.target(0) == 0.0 and s.target(100) == pytest.approx(0.9) and s.target(10_000) == pytest.approx(0.9)


def test_one_shot():
    s = OneShot(0.8, at_itr=5)
    assert [i for i in range(20) if s.is_update_step(i)] == [5]
    assert s.target(5) == 0.8
    with pytest.raises(ValueError):
        OneShot(1.0)


def test_count_to_prune_rounds_half_up():
    assert count_to_prune(0.9, 10) == 9
    assert count_to_prune(0.25, 10) == 3  # 2.5 → 3
    assert count_to_prune(0.999, 10) == 10
    assert count_to_prune(0.0, 10) == 0
