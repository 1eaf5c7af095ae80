"""Held-out accuracy and calibration of the shipped concept classifier (the judge).

Fresh renders with seeds never used in training, clean and with sample-like noise/blur.
Calibration is shown side by side: the raw logits (baseline) against the shipped
temperature-scaled probabilities, as expected calibration error (ECE, lower is better).

    python benchmarks/classifier_accuracy.py [--n 5000]
"""

from __future__ import annotations

import argparse

import torch

from erasekit.world.classifier import augment, expected_calibration_error, load_classifier, render_labeled, to_input
from erasekit.world.vocab import AXES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=777_777)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_classifier()
    imgs, y = render_labeled(args.n, seed=args.seed)
    clean = to_input(imgs)
    noisy = augment(clean.clone(), torch.Generator().manual_seed(args.seed))
    print(f"classifier on {args.n} fresh renders (bar: accuracy >= 0.98 on every head)")
    print(f"{'axis':<11}{'acc clean':>10}{'acc noisy':>10}{'ECE raw':>9}{'ECE calib':>10}{'T':>6}")
    ok = True
    with torch.no_grad():
        raw = model(noisy, calibrated=False)
        cal = model(noisy, calibrated=True)
        cl = model(clean, calibrated=True)
    for i, a in enumerate(AXES):
        acc_c = float((cl[a].argmax(-1) == y[:, i]).float().mean())
        acc_n = float((cal[a].argmax(-1) == y[:, i]).float().mean())
        e_raw = expected_calibration_error(raw[a].softmax(-1), y[:, i])
        e_cal = expected_calibration_error(cal[a].softmax(-1), y[:, i])
        ok &= acc_c >= 0.98
        print(f"{a:<11}{acc_c:>10.4f}{acc_n:>10.4f}{e_raw:>9.4f}{e_cal:>10.4f}{float(model.log_temperature[i].exp()):>6.2f}")
    print("all heads meet the bar" if ok else "SOME HEADS BELOW 0.98")


if __name__ == "__main__":
    main()
