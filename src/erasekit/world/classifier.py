"""The concept classifier: reads shape, colour, texture and background back from an image.

A small CNN with one head per axis, trained on renders with noise/blur augmentation so that
it scores imperfect model samples fairly, then calibrated by temperature scaling per head on
held-out renders. It is the judge of every metric on the embedded world.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .render import render_batch
from .vocab import AXES, CONCEPTS, Labels

NUM_CLASSES: dict[str, int] = {a: len(CONCEPTS[a]) for a in AXES}


def random_labels(rng: random.Random) -> Labels:
    """Uniformly random labels over every axis."""
    return Labels(*(rng.choice(list(CONCEPTS[a])) for a in AXES))


class ConceptClassifier(nn.Module):
    """CNN over 32x32 RGB in [-1, 1] with one calibrated head per concept axis."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.SiLU()]

        self.features = nn.Sequential(*conv(3, w), nn.MaxPool2d(2), *conv(w, 2 * w), *conv(2 * w, 2 * w),
                                      nn.MaxPool2d(2), *conv(2 * w, 4 * w), *conv(4 * w, 4 * w),
                                      nn.MaxPool2d(2), *conv(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, n) for a, n in NUM_CLASSES.items()})
        self.register_buffer("log_temperature", torch.zeros(len(AXES)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (used for perceptual distances and FID-style statistics)."""
        return self.features(x)

    def forward(self, x: torch.Tensor, calibrated: bool = True) -> dict[str, torch.Tensor]:
        """Logits per axis (divided by the fitted temperature when ``calibrated``)."""
        h = self.features(x)
        out = {}
        for i, (a, head) in enumerate(self.heads.items()):
            z = head(h)
            out[a] = z / self.log_temperature[i].exp() if calibrated else z
        return out

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Calibrated class probabilities per axis for uint8 HWC or float CHW [-1, 1] images."""
        x = to_input(images)
        self.eval()
        dev = self.log_temperature.device
        parts: dict[str, list[torch.Tensor]] = {a: [] for a in AXES}
        for i in range(0, len(x), batch_size):
            for a, z in self(x[i:i + batch_size].to(dev)).items():
                parts[a].append(z.softmax(-1).cpu())
        return {a: torch.cat(v) for a, v in parts.items()}


def to_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) arrays, or float tensors (N, 3, H, W) in [-1, 1], to classifier input."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError("expected uint8 images of shape (N, H, W, 3)")
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    else:
        x = images.float()
    if x.shape[-1] != 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and contrast jitter so that grainy or soft samples are judged fairly."""
    n = x.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.25
    x = x + sigma * torch.randn(x.shape, generator=gen)
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    return (x * gain).clamp(-1.2, 1.2)


def render_labeled(n: int, seed: int, workers: int = 1) -> tuple[np.ndarray, torch.Tensor]:
    """``n`` random renders and their class indices (N, 4)."""
    rng = random.Random(seed)
    labels = [random_labels(rng) for _ in range(n)]
    imgs = render_batch(labels, [seed * 1_000_003 + i for i in range(n)], workers=workers)
    return imgs, torch.tensor([lab.index() for lab in labels])


@dataclass
class ClassifierReport:
    accuracy: dict[str, float]
    ece: dict[str, float]
    temperature: dict[str, float]
    seconds: float


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> float:
    """Standard ECE of the top-class confidence."""
    conf, pred = probs.max(-1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean().item() * abs(conf[m].mean().item() - correct[m].mean().item())
    return ece


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Temperature minimising held-out NLL."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def train_classifier(steps: int = 1200, batch_size: int = 64, seed: int = 0, n_train: int = 16000,
                     n_calib: int = 2000, log=print, device: str = "cpu",
                     workers: int = 1) -> tuple[ConceptClassifier, ClassifierReport]:
    """Train and calibrate the judge from renders; returns the model and held-out figures.

    Random draws (batches, augmentation) come from CPU generators on every device, so a GPU run
    sees the same batches as a CPU run of the same seed."""
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    imgs, y = render_labeled(n_train, seed=seed + 1, workers=workers)
    x_all = to_input(imgs)
    model = ConceptClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        x = augment(x_all[idx].clone(), gen).to(device)
        out = model(x, calibrated=False)
        yb = y[idx].to(device)
        loss = sum(F.cross_entropy(out[a], yb[:, i]) for i, a in enumerate(AXES))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f}")
    model.eval()
    # calibrate on held-out renders, with the same augmentation as samples will need
    cimgs, cy = render_labeled(n_calib, seed=seed + 2)
    cx = augment(to_input(cimgs), torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():
        logits = {a: z.cpu() for a, z in model(cx.to(device), calibrated=False).items()}
    temps = {}
    for i, a in enumerate(AXES):
        temps[a] = fit_temperature(logits[a], cy[:, i])
        model.log_temperature[i] = float(np.log(temps[a]))
    report = evaluate_classifier(model, n=2000, seed=seed + 4)
    report.temperature = temps
    report.seconds = time.time() - t0
    return model, report


@torch.no_grad()
def evaluate_classifier(model: ConceptClassifier, n: int = 2000, seed: int = 12345,
                        noisy: bool = False) -> ClassifierReport:
    """Held-out accuracy and calibration error per head on fresh renders."""
    imgs, y = render_labeled(n, seed=seed)
    x = to_input(imgs)
    if noisy:
        x = augment(x, torch.Generator().manual_seed(seed))
    probs = model.predict_proba(x)
    acc = {a: float((probs[a].argmax(-1) == y[:, i]).float().mean()) for i, a in enumerate(AXES)}
    ece = {a: expected_calibration_error(probs[a], y[:, i]) for i, a in enumerate(AXES)}
    temps = {a: float(model.log_temperature[i].exp()) for i, a in enumerate(AXES)}
    return ClassifierReport(acc, ece, temps, 0.0)


def save_classifier(model: ConceptClassifier, path: str | Path) -> None:
    """Write the classifier's weights (safetensors), atomically."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"format": "pt", "arch": "erasekit.ConceptClassifier", "width": "32"})


def load_classifier(path: str | Path | None = None) -> ConceptClassifier:
    """Load the shipped classifier (or one at ``path``)."""
    from safetensors.torch import load_file

    from ..errors import ModelLoadError
    from .assets import classifier_path

    p = Path(path) if path is not None else classifier_path()
    if not p.is_file():
        raise ModelLoadError(f"classifier weights not found at {p}; run `erasekit world train` to build them")
    model = ConceptClassifier()
    model.load_state_dict(load_file(str(p)))
    return model.eval()
