"""Bjøntegaard delta rate: exact values on curves where the integral is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from effvision.codecs.evaluation import bd_psnr, bd_rate

PSNR = np.linspace(28.0, 40.0, 5)


def _curve(log_rate, qualities=PSNR) -> list[tuple[float, float]]:
    return [(math.exp(log_rate(q)), float(q)) for q in qualities]


@pytest.mark.parametrize("delta", [bd_rate, bd_psnr])
@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_identical_curves_differ_by_zero(method: str, delta) -> None:
    curve = _curve(lambda q: 0.2 * q - 7)
    assert delta(curve, curve, method) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_half_the_rate_at_every_quality_is_minus_fifty_percent(method: str) -> None:
    anchor = _curve(lambda q: 0.2 * q - 7)
    test = _curve(lambda q: 0.2 * q - 7 + math.log(0.5))
    assert bd_rate(anchor, test, method) == pytest.approx(-0.5, abs=1e-12)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_one_db_better_on_a_log_linear_curve_is_exp_of_minus_the_slope(method: str) -> None:
    # log R = q / 10: the test codec reaches q with the anchor's rate at q - 1, over the overlap [29, 40]
    anchor = _curve(lambda q: q / 10)
    test = _curve(lambda q: (q - 1) / 10, PSNR + 1)
    assert bd_rate(anchor, test, method) == pytest.approx(math.exp(-0.1) - 1, abs=1e-12)


def test_cubic_fit_is_exact_for_cubic_log_rate_curves() -> None:
    # log R_anchor = cubic(q), log R_test = cubic(q) + 0.05 (q - 30): the mean difference over [28, 40] is
    # 0.05 * (34 - 30) = 0.2, so BD-rate = e^0.2 - 1
    def cubic(q):
        return 1e-4 * (q - 20) ** 3 + 0.1 * q - 5

    anchor = _curve(cubic)
    test = _curve(lambda q: cubic(q) + 0.05 * (q - 30))
    assert bd_rate(anchor, test, "cubic") == pytest.approx(math.exp(0.2) - 1, abs=1e-10)
    assert bd_rate(anchor, test, "pchip") == pytest.approx(math.exp(0.2) - 1, abs=5e-3)


def test_only_the_overlapping_quality_range_counts() -> None:
    # the test curve covers [34, 46] and is 30% cheaper only there; below 34 it does not exist
    anchor = _curve(lambda q: q / 10, np.linspace(28, 40, 7))
    test = _curve(lambda q: q / 10 + math.log(0.7), np.linspace(34, 46, 7))
    assert bd_rate(anchor, test) == pytest.approx(-0.3, abs=1e-12)


def test_one_test_point_gives_the_rate_difference_at_its_quality() -> None:
    anchor = _curve(lambda q: q / 10)
    assert bd_rate(anchor, [(math.exp(3.3) * 1.25, 33.0)]) == pytest.approx(0.25, abs=1e-6)
    assert bd_rate(anchor, [(math.exp(4.0) * 0.8, 40.0)]) == pytest.approx(-0.2, abs=1e-6)  # at the top end


def test_no_common_quality_range_gives_none() -> None:
    anchor = _curve(lambda q: q / 10)
    assert bd_rate(anchor, _curve(lambda q: q / 10, PSNR + 20)) is None
    assert bd_rate(anchor, [(0.03, 13.0)]) is None


def test_dominated_points_are_ignored() -> None:
    anchor = _curve(lambda q: q / 10)
    noisy = anchor + [(math.exp(3.5) * 2, 33.0)]  # twice the rate for less quality than a neighbour
    test = _curve(lambda q: q / 10 + math.log(0.5))
    assert bd_rate(noisy, test) == pytest.approx(-0.5, abs=1e-12)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="two anchor points"):
        bd_rate([(1.0, 30.0)], [(1.0, 30.0)])
    with pytest.raises(ValueError, match="4 points"):
        bd_rate(_curve(lambda q: q / 10, [30, 35, 40]), _curve(lambda q: q / 10), "cubic")
    with pytest.raises(ValueError, match="method"):
        bd_rate(_curve(lambda q: q / 10), _curve(lambda q: q / 10), "linear")


# ------------------------------------------------------------------------------------------------- BD-PSNR


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_bd_psnr_of_a_curve_one_db_higher_at_every_rate_is_one(method: str) -> None:
    anchor = _curve(lambda q: 0.2 * q - 7)
    test = [(rate, quality + 1.0) for rate, quality in anchor]
    assert bd_psnr(anchor, test, method) == pytest.approx(1.0, abs=1e-12)


def test_bd_psnr_answers_where_the_quality_ranges_do_not_overlap() -> None:
    # the anchor is 10 dB better at every rate: its worst point beats the test's best, so BD-rate has no
    # common quality range, but the rates overlap ([e^3.3, e^4.0]) and BD-PSNR is exactly -10 dB there
    anchor = _curve(lambda q: q / 10 - 1, np.linspace(43, 50, 8))
    test = _curve(lambda q: q / 10, np.linspace(28, 40, 7))
    assert bd_rate(anchor, test) is None
    assert bd_psnr(anchor, test) == pytest.approx(-10.0, abs=1e-9)


def test_bd_psnr_one_point_and_disjoint_rates() -> None:
    anchor = _curve(lambda q: q / 10)  # log-rate 2.8 .. 4.0
    assert bd_psnr(anchor, [(math.exp(3.5), 36.0)]) == pytest.approx(1.0, abs=1e-9)
    assert bd_psnr(anchor, [(math.exp(5.0), 60.0)]) is None
    assert bd_psnr(anchor, _curve(lambda q: q / 10 + 3)) is None
    with pytest.raises(ValueError):
        bd_psnr(anchor[:1], anchor)
