"""Each metric module on constructed outcomes with known answers."""

import numpy as np
import pytest

from erasekit.evaluation.metrics import (distribution_distances, efficacy, eval_cost, feature_distance, fidelity,
                                         fit_cost, generality, harmonic, harmonic_scores, specificity)

ONES, ZEROS = np.ones(40), np.zeros(40)


def test_efficacy_of_a_perfect_eraser():
    m = efficacy({"original": ONES, "patched": ZEROS}, {"original": ONES * 0.9, "patched": ZEROS + 0.1})
    assert m["efficacy_original"]["value"] == 1 and m["efficacy_patched"]["value"] == 0
    # a drop of 40 of 40 is not a point: Newcombe's square-and-add of the two Wilson bounds
    w = 1.959964**2 / (40 + 1.959964**2)  # Wilson's distance from 0 of n (and from n of n) for n = 40
    assert m["efficacy_drop"]["value"] == 1 and m["efficacy_drop"]["ci95"][1] == 1
    assert m["efficacy_drop"]["ci95"][0] == pytest.approx(1 - np.hypot(w, w))
    assert m["p_target_patched"]["value"] == pytest.approx(0.1)


def test_efficacy_drop_is_paired():
    # the same rate before and after, but on different seeds: a paired drop of 0 with a wide interval
    a = np.array([1, 0] * 20, float)
    m = efficacy({"original": a, "patched": 1 - a})
    assert m["efficacy_drop"]["value"] == 0
    assert m["efficacy_drop"]["ci95"][0] < -0.2 and m["efficacy_drop"]["ci95"][1] > 0.2


def test_generality_and_specificity():
    g = generality({"original": ONES, "patched": np.r_[ONES[:10], ZEROS[:30]]})
    assert g["generality_patched"]["value"] == 0.25 and g["generality_drop"]["value"] == 0.75
    s = specificity({"neighbours": {"original": ONES, "patched": np.r_[ONES[:36], ZEROS[:4]]},
                     "unrelated": {"original": ONES, "patched": ONES}})
    assert s["specificity_neighbours_patched"]["value"] == 0.9
    assert s["specificity_neighbours_drop"]["value"] == pytest.approx(0.1)
    assert s["specificity_unrelated_drop"]["value"] == 0
    assert specificity({"unrelated": {"original": ONES, "patched": ONES}}).keys() == {
        "specificity_unrelated_original", "specificity_unrelated_patched", "specificity_unrelated_drop"}


def test_harmonic_from_the_other_metrics():
    m = {**efficacy({"original": ONES, "patched": ZEROS}),
         **generality({"original": ONES, "patched": np.r_[ONES[:20], ZEROS[:20]]}),
         **specificity({"neighbours": {"original": ONES, "patched": np.r_[ONES[:30], ZEROS[:10]]},
                        "unrelated": {"original": ONES, "patched": ONES}})}
    h = harmonic_scores(m)
    assert h["harmonic"] == pytest.approx(harmonic(0.0, 0.875, 0.5))
    assert h["harmonic_original"] == 0.0  # the unpatched model draws the target: no erasure at all


class FeatureJudge:
    """Features = mean colour per channel, so moved pixels give known distances."""

    name = "mean-colour"

    def features(self, x):
        return x.mean(dim=(2, 3)) + 2.0  # offset so the scale (mean norm) is far from zero


class DetectorJudge:
    name = "detector"

    def features(self, x):
        return None


def _images(value, n=24, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(value, 20, size=(n, 8, 8, 3)), 0, 255).astype(np.uint8)


def test_fidelity_is_zero_for_identical_sets_and_grows_with_change():
    a = _images(100)
    same = fidelity(FeatureJudge(), a, a.copy())
    assert same["feature_distance"]["value"] == 0
    assert abs(same["distribution"]["fid"]) < 1e-6
    near = feature_distance(FeatureJudge(), a, np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8))["value"]
    far = feature_distance(FeatureJudge(), a, np.clip(a.astype(int) + 80, 0, 255).astype(np.uint8))["value"]
    assert 0 < near < far
    d_near = distribution_distances(FeatureJudge(), a, _images(110, seed=1))
    d_far = distribution_distances(FeatureJudge(), a, _images(200, seed=1))
    assert d_near["fid"] < d_far["fid"] and d_near["kid"] < d_far["kid"]
    assert distribution_distances(FeatureJudge(), a, _images(110, seed=1)) == d_near  # seeded KID subsets


def test_fidelity_is_skipped_for_a_judge_without_features():
    out = fidelity(DetectorJudge(), _images(100), _images(100))
    assert out["feature_distance"] is None and "no image features" in out["distribution"]["skipped"]


def test_cost_reads_the_patch_manifest():
    class P:
        method, digest = "uce", "abc"
        manifest = {"wall_time_s": 0.5, "timings_s": {"solve": 0.2}, "peak_memory_mb": {"process_peak_rss_mb": 10.0},
                    "config": {"lamb": 0.1}}

    (c,) = fit_cost([P()])
    assert c["fit_wall_s"] == 0.5 and c["fit_peak_memory_mb"] == {"process_peak_rss_mb": 10.0}
    e = eval_cost(3.21, 2.0, 5, 7, [P()])
    assert e["eval_wall_s"] == 3.21 and e["cache_misses"] == 7 and e["peak_rss_mb"] > 0


def test_inception_features_fail_early_and_clearly_when_unavailable():
    from erasekit.errors import InvalidInputError
    from erasekit.evaluation.metrics.fidelity import check_features

    check_features("judge")
    with pytest.raises(InvalidInputError, match="unknown FID feature space"):
        check_features("vgg")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidInputError, match="torch-fidelity"):
            check_features("inception")
