"""Test-set corruptions for the robustness protocol (FusionBench section 4.3, after
Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations", ICLR 2019, arXiv:1903.12261).

Each works on a uint8 batch of shape (N, H, W, 3), severity 1..5, and is seeded so the
corrupted test set is the same on every machine.
"""

from __future__ import annotations

import io

import numpy as np

SEVERITIES = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg": [80, 65, 58, 50, 40],
    "motion_blur": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
    "spatter": [0.05, 0.1, 0.15, 0.2, 0.25],
}


def _as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def _as_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def gaussian_noise(x, c, rng):
    f = _as_float(x)
    return _as_uint8(f + rng.normal(0, c, f.shape))


def impulse_noise(x, c, rng):
    f = _as_float(x)
    u = rng.random(f.shape)
    f = np.where(u < c / 2, 0.0, np.where(u > 1 - c / 2, 1.0, f))
    return _as_uint8(f)


def contrast(x, c, rng):
    f = _as_float(x)
    means = f.mean(axis=(1, 2, 3), keepdims=True)
    return _as_uint8((f - means) * c + means)


def pixelate(x, c, rng):
    from PIL import Image
    out = []
    for im in x:
        h, w = im.shape[:2]
        small = Image.fromarray(im).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
        out.append(np.asarray(small.resize((w, h), Image.BOX)))
    return np.stack(out)


def jpeg(x, c, rng):
    from PIL import Image
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=int(c))
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return np.stack(out)


def motion_blur(x, c, rng):
    radius, sigma = c
    scale = x.shape[1] / 224 * 8  # kernels are set for 224px images; shrink with the image
    length = max(2, int(round(radius * scale / 2)))
    out = []
    for im in x:
        angle = rng.uniform(-np.pi / 4, np.pi / 4)
        weights = np.exp(-np.arange(length) ** 2 / (2 * max(sigma * scale / 2, 0.5) ** 2))
        weights /= weights.sum()
        f = _as_float(im)
        acc = np.zeros_like(f)
        for i, wgt in enumerate(weights):
            dy, dx = int(round(i * np.sin(angle))), int(round(i * np.cos(angle)))
            acc += wgt * np.roll(f, shift=(dy, dx), axis=(0, 1))
        out.append(_as_uint8(acc))
    return np.stack(out)


def spatter(x, c, rng):
    f = _as_float(x)
    n, h, w, _ = f.shape
    out = []
    for im in f:
        drops = int(c * h * w / 6)
        mask = np.zeros((h, w), np.float32)
        ys, xs = rng.integers(0, h, drops), rng.integers(0, w, drops)
        rad = rng.uniform(0.6, 1.8, drops)
        yy, xx = np.mgrid[0:h, 0:w]
        for y0, x0, r in zip(ys, xs, rad):
            mask = np.maximum(mask, ((yy - y0) ** 2 + (xx - x0) ** 2 <= r * r).astype(np.float32))
        mud = np.array([0.25, 0.18, 0.1], np.float32)
        out.append(im * (1 - 0.8 * mask[..., None]) + mud * 0.8 * mask[..., None])
    return _as_uint8(np.stack(out))


CORRUPTIONS = {
    "gaussian_noise": gaussian_noise, "impulse_noise": impulse_noise, "contrast": contrast,
    "pixelate": pixelate, "jpeg": jpeg, "motion_blur": motion_blur, "spatter": spatter,
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption `name` at `severity` (1..5) to a uint8 (N, H, W, 3) batch."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{name}'; known: {sorted(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    rng = np.random.default_rng([seed, severity, sorted(CORRUPTIONS).index(name)])
    return CORRUPTIONS[name](np.ascontiguousarray(images), SEVERITIES[name][severity - 1], rng)
