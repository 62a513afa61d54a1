"""The statistics every finding uses, against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from report_builder import stats


def test_a_share_gets_wilsons_interval():
    # Wilson's score interval for 8 of 10 at 95 %: 0.4902 to 0.9433 (hand-computed with z = 1.95996)
    s = stats.share(8, 10)
    assert s.value == 0.8 and s.low == pytest.approx(0.4902, abs=1e-4) and s.high == pytest.approx(0.9433, abs=1e-4)
    assert stats.share(0, 5).low == 0.0 and stats.share(5, 5).high == 1.0  # stays inside [0, 1]
    assert np.isnan(stats.share(0, 0).value)


def test_the_bootstrap_interval_covers_the_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.5, 0.1, 10), rng.normal(0.5, 0.1, 1000)
    a, b = stats.bootstrap(few), stats.bootstrap(many)
    assert a.low < a.value < a.high and b.low < b.value < b.high
    assert (b.high - b.low) < (a.high - a.low) / 5  # about 1/sqrt(100) as wide
    # with 1000 normal draws the percentile interval is close to mean +- 1.96 sd / sqrt(n)
    half = 1.96 * many.std(ddof=1) / np.sqrt(len(many))
    assert b.high - b.low == pytest.approx(2 * half, rel=0.1)
    assert stats.bootstrap(few) == stats.bootstrap(few)  # seeded
    assert stats.bootstrap([0.3]).low == stats.bootstrap([0.3]).high == 0.3
    assert stats.bootstrap([0.1, np.nan, 0.3]).n == 2


def test_five_images_never_separate_two_methods_but_thirty_clear_ones_do():
    a = np.array([0.10, 0.12, 0.09, 0.11, 0.13])
    five = stats.paired(a, a + 0.05)  # b always higher: the smallest two-sided signed-rank p over 5 pairs is 1/16
    assert five.p_value == pytest.approx(0.0625) and not five.significant
    assert "within noise" in stats.compare_words(five) and "over 5 images" in stats.compare_words(five)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 30)
    clear = stats.paired(x + 0.2 + rng.normal(0, 0.02, 30), x)
    assert clear.significant and clear.difference.low > 0.15
    assert stats.compare_words(clear).startswith("higher by 0.2")
    same = stats.paired(x, x)
    assert same.p_value == 1.0 and not same.significant
    with pytest.raises(ValueError, match="paired comparison"):
        stats.paired([1, 2], [1, 2, 3])


def test_the_interval_prints_as_the_tables_do():
    assert stats.Interval(0.35, 0.21, 0.48, 5).format() == "0.35 [0.21, 0.48]"
    assert stats.Interval(0.35, 0.21, 0.48, 5).as_dict() == {"value": 0.35, "low": 0.21, "high": 0.48, "n": 5}


def test_an_interval_from_draws_made_elsewhere():
    draws = np.arange(101, dtype=float)  # quantiles 2.5 and 97.5 of 0..100 are 2.5 and 97.5
    i = stats.from_draws(50.0, draws, n=30)
    assert (i.low, i.high, i.n) == (pytest.approx(2.5), pytest.approx(97.5), 30)
    assert stats.from_draws(200.0, draws, n=30).high == 200.0  # widened to hold the value
    assert stats.from_draws(1.0, [], n=3).low == 1.0


def test_paired_draws_separate_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 200)
    shifted = stats.paired_draws(10.0, 5.0, base + 5, base, n=50)  # every paired difference is 5
    assert shifted.significant and shifted.difference.low == pytest.approx(5) and shifted.p_value == 0.0
    noise = stats.paired_draws(0.0, 0.0, rng.normal(0, 1, 200), rng.normal(0, 1, 200), n=50)
    assert not noise.significant and noise.difference.covers(0) and noise.p_value > 0.05
    with pytest.raises(ValueError):
        stats.paired_draws(0, 0, [1, 2], [1], n=2)
