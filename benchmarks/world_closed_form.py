"""Every closed-form method erasing each shape of the embedded world, one at a time.

For each (method, shape): the judge's detection rate of the shape on prompts that ask for it
(target, lower is better), on prompts that ask for it by synonym (synonyms, lower is better),
and the accuracy on prompts for the other shapes (others, higher is better). The first row is
the unedited model (the baseline). Sampling seeds are shared between rows.

    python benchmarks/world_closed_form.py [--per-shape 16] [--methods uce,rece,speed,mace,realera]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import erasekit  # noqa: E402
from erasekit.concepts import ConceptSpec  # noqa: E402
from erasekit.methods import REGISTRY  # noqa: E402
from erasekit.world.classifier import load_classifier  # noqa: E402
from erasekit.world.train import generate_images  # noqa: E402
from erasekit.world.vocab import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, Labels, caption, erase_templates  # noqa: E402


def prompts(shape: str, n: int, seed: int, synonyms: bool) -> list[str]:
    rng = random.Random(seed)
    return [caption(Labels(shape, rng.choice(list(COLOURS)), rng.choice(list(TEXTURES)), rng.choice(list(BACKGROUNDS))),
                    rng, synonym_p=1.0 if synonyms else 0.0) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-shape", type=int, default=16, help="images per prompt set")
    ap.add_argument("--methods", default=",".join(REGISTRY))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = erasekit.load_pipeline(device="cpu")
    judge = load_classifier()
    shapes = args.shapes.split(",")
    n = args.per_shape
    sets = {s: (prompts(s, n, 1, False), prompts(s, n, 2, True), prompts(s, n, 3, False)) for s in SHAPES}

    cache: dict[tuple[str, str], torch.Tensor] = {}

    def rates(tag: str) -> dict[str, tuple[float, float]]:
        out = {}
        for s in SHAPES:
            canon, syn, _ = sets[s]
            imgs = generate_images(pipe, canon + syn, list(range(2 * n)))
            pred = judge.predict_proba(imgs)["shape"].argmax(-1)
            k = list(SHAPES).index(s)
            out[s] = (float((pred[:n] == k).float().mean()), float((pred[n:] == k).float().mean()))
        return out

    t0 = time.time()
    base = rates("base")
    print(f"world closed-form erasure: {n} images per prompt set, seeds shared; base model row first")
    print(f"{'method':<9}{'shape':<10}{'target':>8}{'synonyms':>10}{'others':>8}{'fit s':>8}")
    mean_other = lambda r, s: sum(r[o][0] for o in SHAPES if o != s) / (len(SHAPES) - 1)  # noqa: E731
    for s in shapes:
        print(f"{'(none)':<9}{s:<10}{base[s][0]:>8.2f}{base[s][1]:>10.2f}{mean_other(base, s):>8.2f}{'':>8}")
    for method in args.methods.split(","):
        for s in shapes:
            spec = ConceptSpec(s, preserve=tuple(o for o in SHAPES if o != s))
            patch = erasekit.erase(pipe, spec, method=method, templates=erase_templates("shape"))
            with patch.scoped(pipe):
                r = rates(method)
            print(f"{method:<9}{s:<10}{r[s][0]:>8.2f}{r[s][1]:>10.2f}{mean_other(r, s):>8.2f}"
                  f"{patch.manifest['wall_time_s']:>8.2f}", flush=True)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
