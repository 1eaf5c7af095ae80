import numpy as np
import torch

from erasekit.world.classifier import evaluate_classifier, render_labeled
from erasekit.world.vocab import AXES


def test_shipped_classifier_is_accurate_on_fresh_renders(classifier):
    report = evaluate_classifier(classifier, n=400, seed=424242)
    for axis in AXES:
        assert report.accuracy[axis] >= 0.95, (axis, report.accuracy)


def test_probabilities_are_calibrated_distributions(classifier):
    imgs, y = render_labeled(300, seed=99)
    probs = classifier.predict_proba(imgs)
    for i, axis in enumerate(AXES):
        p = probs[axis]
        assert torch.allclose(p.sum(-1), torch.ones(len(p)), atol=1e-5)
        conf = p.max(-1).values
        acc = (p.argmax(-1) == y[:, i]).float().mean()
        # calibrated: mean confidence tracks accuracy
        assert abs(conf.mean() - acc) < 0.05, axis
    report = evaluate_classifier(classifier, n=400, seed=7, noisy=True)
    assert max(report.ece.values()) < 0.08, report.ece


def test_classifier_is_uncertain_on_noise(classifier):
    noise = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    probs = classifier.predict_proba(noise)
    rendered = classifier.predict_proba(render_labeled(64, seed=5)[0])
    for axis in AXES:
        assert probs[axis].max(-1).values.mean() < rendered[axis].max(-1).values.mean()
