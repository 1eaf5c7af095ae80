"""Fidelity of the embedded world model, side by side with the judge's ceiling and chance.

For N prompts over (shape, colour, texture, background) combinations never rendered for
training, generate one image each with fresh seeds and ask the classifier whether it agrees
with the prompt, per axis; once with canonical words and once with synonyms. The baseline
columns are the same classifier on true renders of the same labels (the ceiling the judge
allows) and chance.

With ``--paraphrase`` the same held-out combinations are also asked for in the paraphrase family's
phrasings (a grammar no training caption uses), canonical words and synonyms, against the retraining
bar: paraphrases >= 0.95 on every axis with the training templates still >= 0.98.

    python benchmarks/world_fidelity.py [--n 512] [--model PATH] [--device cpu|cuda] [--paraphrase]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from erasekit.models import load_pipeline  # noqa: E402
from erasekit.world.classifier import load_classifier  # noqa: E402
from erasekit.world.render import render  # noqa: E402
from erasekit.world.train import SAMPLING_DEFAULTS, fidelity, fidelity_prompts  # noqa: E402
from erasekit.world.vocab import AXES, CONCEPTS  # noqa: E402

BARS = {"shape": 0.90, "colour": 0.90, "texture": 0.80, "background": 0.90}
#: the retraining bar for a world model that reads more than its templates
PARAPHRASE_BAR, TEMPLATE_BAR = 0.95, 0.98


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="images per prompt set (>= 500 for the quality bar)")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped world model)")
    ap.add_argument("--seed", type=int, default=2024, help="prompt/seed set (training probes use 1 and 2)")
    ap.add_argument("--classifier", default=None,
                    help="judge weights (default: classifier.safetensors beside --model, else the shipped judge)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (figures are the same up to float rounding)")
    ap.add_argument("--paraphrase", action="store_true",
                    help="also measure the paraphrase family's phrasings (the retraining bar)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device)
    judge_path = args.classifier
    if judge_path is None and args.model and (Path(args.model).parent / "classifier.safetensors").is_file():
        judge_path = Path(args.model).parent / "classifier.safetensors"
    judge = load_classifier(judge_path).to(args.device)

    t0 = time.time()
    canon = fidelity(pipe, judge, args.n, seed=args.seed)
    t_gen = time.time() - t0
    syn = fidelity(pipe, judge, args.n, seed=args.seed, synonyms=True)
    items = fidelity_prompts(args.n, args.seed)
    renders = np.stack([render(lab, 900_000 + i) for i, (_, lab) in enumerate(items)])
    probs = judge.predict_proba(renders)
    target = torch.tensor([lab.index() for _, lab in items])
    ceiling = {a: float((probs[a].argmax(-1) == target[:, i]).float().mean()) for i, a in enumerate(AXES)}

    print(f"world fidelity: {args.n} held-out prompts per set, {pipe.erasekit_source}, judge {judge_path or 'shipped'}")
    print(f"{'axis':<11}{'bar':>6}{'canonical':>11}{'±95%':>7}{'synonyms':>10}{'gap':>7}{'renders':>9}{'chance':>8}  verdict")
    all_ok = True
    for a in AXES:
        gap = canon[a] - syn[a]
        ok = canon[a] >= BARS[a] and abs(gap) <= 0.05
        all_ok &= ok
        half = 1.96 * (canon[a] * (1 - canon[a]) / args.n) ** 0.5  # normal approximation of a binomial
        print(f"{a:<11}{BARS[a]:>6.2f}{canon[a]:>11.3f}{half:>7.3f}{syn[a]:>10.3f}{gap:>+7.3f}{ceiling[a]:>9.3f}"
              f"{1 / len(CONCEPTS[a]):>8.3f}  {'meets bar' if ok else 'BELOW BAR'}")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"generation: {args.n / t_gen:.1f} images/s ({where}, "
          f"{SAMPLING_DEFAULTS['num_inference_steps']} steps, guidance {SAMPLING_DEFAULTS['guidance_scale']})")
    print("all bars met" if all_ok else "some bars not met (see verdicts)")
    if not args.paraphrase:
        return
    p_canon = fidelity(pipe, judge, args.n, seed=args.seed, family="paraphrase")
    p_syn = fidelity(pipe, judge, args.n, seed=args.seed, synonyms=True, family="paraphrase")
    print(f"\nparaphrase family (same held-out combinations, phrasings no training caption uses); "
          f"bar: paraphrases >= {PARAPHRASE_BAR} canonical and synonyms, templates >= {TEMPLATE_BAR}")
    print(f"{'axis':<11}{'templates':>10}{'synonyms':>10}{'paraphr.':>10}{'p:synonyms':>11}  verdict")
    met = True
    for a in AXES:
        ok = min(p_canon[a], p_syn[a]) >= PARAPHRASE_BAR and min(canon[a], syn[a]) >= TEMPLATE_BAR
        met &= ok
        print(f"{a:<11}{canon[a]:>10.3f}{syn[a]:>10.3f}{p_canon[a]:>10.3f}{p_syn[a]:>11.3f}  "
              f"{'meets bar' if ok else 'BELOW BAR'}")
    print("retraining bar met" if met else "retraining bar not met")


if __name__ == "__main__":
    main()
