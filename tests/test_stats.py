"""Intervals that hold: prompts are the unit (cluster bootstrap), and 0 of n is not [0, 0]."""

import numpy as np
import pytest

from erasekit.evaluation.metrics import harmonic, harmonic_interval
from erasekit.evaluation.stats import bootstrap, bootstrap_diff, effective_n, wilson

Z2 = 1.959964**2


def width(e):
    return e.high - e.low


def test_wilson_known_answers():
    assert wilson(0.0, 48) == (0.0, pytest.approx(Z2 / (48 + Z2)))
    assert wilson(1.0, 48) == (pytest.approx(48 / (48 + Z2)), 1.0)
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)  # textbook values


def test_zero_and_all_of_n_do_not_collapse():
    zero, full = bootstrap(np.zeros(48)), bootstrap(np.ones(48))
    assert (zero.value, zero.low) == (0.0, 0.0) and zero.high == pytest.approx(Z2 / (48 + Z2))
    assert (full.value, full.high) == (1.0, 1.0) and full.low == pytest.approx(48 / (48 + Z2))
    # 4 prompts x 12 seeds, all failing: nothing bounds how much a prompt's seeds agree, so the
    # effective n is the number of prompts and the interval is Wilson's at n = 4
    prompts = np.repeat(["p1", "p2", "p3", "p4"], 12)
    clustered = bootstrap(np.zeros(48), clusters=prompts)
    assert clustered.clusters == 4 and clustered.n_eff == 4
    assert clustered.high == pytest.approx(Z2 / (4 + Z2))
    assert bootstrap(np.ones(48), clusters=prompts).low == pytest.approx(4 / (4 + Z2))
    # one hit in 48 independent images: Wilson's lower bound is above 0, and the upper bound
    # is Wilson's (the percentile bootstrap alone says 3 / 48)
    one = bootstrap(np.r_[1.0, np.zeros(47)])
    assert one.high == pytest.approx(wilson(1 / 48, 48)[1]) and one.low == 0.0


def test_cluster_interval_is_wider_than_the_naive_one_when_prompts_decide_the_outcome():
    # 16 prompts x 8 seeds; half the prompts always draw the concept, half never
    prompts = np.repeat(np.arange(16), 8)
    x = (prompts % 2).astype(float)
    naive, cluster = bootstrap(x), bootstrap(x, clusters=prompts)
    assert naive.value == cluster.value == 0.5
    assert width(cluster) > 2 * width(naive)
    assert effective_n(x, prompts) == pytest.approx(16)
    # with one image per prompt the cluster bootstrap is the image bootstrap
    y = (np.arange(48) % 3 == 0).astype(float)
    a, b = bootstrap(y), bootstrap(y, clusters=[f"prompt {i}" for i in range(48)])
    assert (a.low, a.high) == (b.low, b.high)


def test_cluster_intervals_cover_when_seeds_of_a_prompt_agree():
    """Simulated evaluations: each prompt has its own rate (most prompts near 0 or 1), 8 seeds each.
    Resampling images under-covers; resampling prompts keeps the nominal 95%."""
    rng = np.random.default_rng(1)
    truth, reps = 0.3, 300
    hit_naive = hit_cluster = 0
    prompts = np.repeat(np.arange(12), 8)
    for r in range(reps):
        p = rng.beta(truth * 0.2, (1 - truth) * 0.2, size=12)  # mean 0.3, strongly clustered
        x = (rng.random(96) < p[prompts]).astype(float)
        n, c = bootstrap(x, n_boot=400, seed=r), bootstrap(x, n_boot=400, seed=r, clusters=prompts)
        hit_naive += n.low <= truth <= n.high
        hit_cluster += c.low <= truth <= c.high
    assert hit_cluster / reps >= 0.90
    assert hit_naive / reps <= 0.80


def test_paired_drop_of_an_unchanged_set_is_a_small_interval_around_zero():
    x = (np.arange(48) % 2).astype(float)
    d = bootstrap_diff(x, x.copy())
    assert d.value == 0 and d.low < 0 < d.high
    assert d.high == pytest.approx(Z2 / (48 + Z2)) and d.low == pytest.approx(-Z2 / (48 + Z2))
    # distances are not rates: no Wilson bound, a plain cluster bootstrap
    e = bootstrap(np.full(10, 2.5))
    assert e.low == e.high == 2.5 and e.as_dict()["prompts"] == 10 and "n_eff" not in e.as_dict()


def test_harmonic_interval():
    zeros, ones = np.zeros(48), np.ones(48)
    # a perfect eraser: H = 1, but 48 images cannot prove it
    lo, hi = harmonic_interval((zeros, None), [(ones, None), (ones, None)], (zeros, None))
    assert hi == pytest.approx(1.0, abs=1e-3) and 0.9 < lo < 0.99
    # a middling eraser: the interval holds the point estimate, and is wider when prompts repeat
    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(6), 8)
    e = (prompts % 3 == 0).astype(float)  # 2 of 6 prompts still draw the concept
    s = (rng.random(48) < 0.9).astype(float)
    g = (prompts % 2 == 0).astype(float)
    h = harmonic(e.mean(), s.mean(), g.mean())
    naive = harmonic_interval((e, None), [(s, None)], (g, None))
    cluster = harmonic_interval((e, prompts), [(s, prompts)], (g, prompts))
    # strictly: harmonic_interval clamps its bounds to the point, so "<=" would hold for any bootstrap
    assert naive[0] < h < naive[1] and cluster[0] < h < cluster[1]
    assert cluster[1] - cluster[0] < 0.6  # and the bootstrap is not spread over everything
    assert cluster[1] - cluster[0] > naive[1] - naive[0]
