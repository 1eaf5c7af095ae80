"""Deterministic renderer of the embedded world: one object on a background.

An image is fully determined by its :class:`~erasekit.world.vocab.Labels` and a seed (which
draws size, position, rotation, colour jitter and texture phase). Rendering is vectorised
numpy on a supersampled grid, then box-filtered down for anti-aliasing.
"""

from __future__ import annotations

import math

import numpy as np

from .vocab import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, Labels

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 30),
    "green": (40, 185, 60),
    "cyan": (30, 205, 215),
    "blue": (35, 70, 220),
    "purple": (130, 45, 190),
    "pink": (250, 120, 190),
}


def _polar_polygon(radii: list[float], start: float, n: int):
    """Radius function r(theta) of a polygon that is star-shaped around the origin."""
    angles = np.array([start + 2 * math.pi * k / n for k in range(n)])
    rs = np.array(radii * (n // len(radii)))

    def r_of(theta: np.ndarray) -> np.ndarray:
        rel = np.mod(theta - start, 2 * math.pi)
        k = np.floor(rel / (2 * math.pi / n)).astype(int) % n
        k2 = (k + 1) % n
        t1, t2 = angles[k], angles[k] + 2 * math.pi / n
        r1, r2 = rs[k], rs[k2]
        th = start + rel
        d = 2 * math.pi / n
        return r1 * r2 * math.sin(d) / (r1 * np.sin(th - t1) + r2 * np.sin(t2 - th))

    return r_of


_TRI = _polar_polygon([1.0], math.pi / 2, 3)
_HEX = _polar_polygon([0.95], 0.0, 6)
_STAR = _polar_polygon([1.0, 0.42], math.pi / 2, 10)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in object coordinates (unit-ish extent, v pointing up)."""
    r = np.hypot(u, v)
    th = np.arctan2(v, u)
    if shape == "circle":
        return r <= 0.9
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        return r <= _TRI(th) * 1.05
    if shape == "hexagon":
        return r <= _HEX(th)
    if shape == "star":
        return r <= _STAR(th) * 1.05
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.3) & (b <= 0.92)) | ((b <= 0.3) & (a <= 0.92))
    if shape == "heart":
        x, y = u * 1.25, (v + 0.15) * 1.25
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "crescent":
        outer = r <= 0.92
        inner = np.hypot(u - 0.5, v - 0.12) <= 0.74
        return outer & ~inner
    raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def texture_mask(texture: str, x: np.ndarray, y: np.ndarray, phase: tuple[float, float]) -> np.ndarray:
    """Mask of the texture's secondary tone, in image pixels of the output resolution."""
    px, py = phase
    if texture == "solid":
        return np.zeros_like(x, dtype=bool)
    if texture == "striped":
        return np.mod((x + y) / math.sqrt(2) + px, 6.0) < 3.0
    if texture == "dotted":
        gx = np.mod(x + px, 6.0) - 3.0
        gy = np.mod(y + py, 6.0) - 3.0
        return gx * gx + gy * gy <= 1.7 ** 2
    if texture == "checkered":
        return (np.floor((x + px) / 3.5) + np.floor((y + py) / 3.5)) % 2 == 0
    raise KeyError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")


def background(name: str, x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Background image in [0, 1], shape (H, W, 3)."""
    h, w = x.shape
    if name == "white":
        base = np.full((h, w, 3), 0.96) + rng.normal(0, 0.01, (1, 1, 3))
    elif name == "black":
        base = np.full((h, w, 3), 0.06) + rng.normal(0, 0.01, (1, 1, 3))
    elif name == "sky":
        t = (y / size)[..., None]
        top, bottom = np.array([0.25, 0.50, 0.90]), np.array([0.78, 0.88, 1.0])
        base = top * (1 - t) + bottom * t
    elif name == "grass":
        blades = np.sin(x * 2.3 + 3 * np.sin(y * 0.7 + rng.uniform(0, 6))) * 0.5 + 0.5
        g = 0.30 + 0.12 * blades[..., None]
        base = np.concatenate([g * 0.45, g, g * 0.25], axis=-1)
    else:
        raise KeyError(f"unknown background {name!r}; known: {', '.join(BACKGROUNDS)}")
    return np.clip(base, 0, 1)


def render(labels: Labels, seed: int, size: int = 32, supersample: int = 3) -> np.ndarray:
    """Render one image as uint8 array (size, size, 3). Same labels and seed give the same image."""
    for axis, known in (("shape", SHAPES), ("colour", COLOURS), ("texture", TEXTURES),
                        ("background", BACKGROUNDS)):
        if getattr(labels, axis) not in known:
            raise KeyError(f"unknown {axis} {getattr(labels, axis)!r}; known: {', '.join(known)}")
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.30, 0.40) * size  # object radius in pixels
    cx = size / 2 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 + rng.uniform(-0.08, 0.08) * size
    rot = rng.uniform(-0.25, 0.25)
    phase = (float(rng.uniform(0, 6)), float(rng.uniform(0, 6)))
    jitter = rng.normal(0, 0.03, 3)
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    dx, dy = (x - cx) / scale, (cy - y) / scale
    c, s = math.cos(rot), math.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy
    img = background(labels.background, x, y, size, rng)
    mask = shape_mask(labels.shape, u, v)
    colour = np.clip(np.array(RGB[labels.colour]) / 255.0 + jitter, 0, 1)
    second = colour * 0.35 if labels.colour not in ("blue", "purple") else np.clip(colour * 0.35 + 0.55, 0, 1)
    tex = texture_mask(labels.texture, x, y, phase)
    obj = np.where(tex[..., None], second, colour)
    img = np.where(mask[..., None], obj, img)
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _render_chunk(args: tuple[list[Labels], list[int], int]) -> np.ndarray:
    labels, seeds, size = args
    return np.stack([render(lab, s, size) for lab, s in zip(labels, seeds)])


def render_batch(labels: list[Labels], seeds: list[int], size: int = 32, workers: int = 1) -> np.ndarray:
    """Render many images: uint8 array (N, size, size, 3). Each image depends only on its own
    (labels, seed), so ``workers`` > 1 processes give the same array, faster."""
    import multiprocessing as mp

    labels, seeds = list(labels), list(seeds)
    # fork (not spawn): spawn re-runs the caller's script, which a library cannot ask to be guarded;
    # the children only run numpy, so forking after torch (or CUDA) set up is safe
    if workers <= 1 or len(labels) < 2000 or "fork" not in mp.get_all_start_methods():
        return _render_chunk((labels, seeds, size))
    from concurrent.futures import ProcessPoolExecutor

    step = -(-len(labels) // (4 * workers))
    chunks = [(labels[i:i + step], seeds[i:i + step], size) for i in range(0, len(labels), step)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        return np.concatenate(list(ex.map(_render_chunk, chunks)))
