"""Deterministic degradations of a reference image: blur, noise, JPEG compression, downscaling, 3 levels each.

Levels scale with the image: blur radius and downscale factor are fractions of the side, so 64 px (the built-in
model) and 1024 px (SDXL) references are degraded alike. Noise is seeded, so the same call gives the same pixels.
The result has the input's size (a downscaled image is scaled back up), ready to be inverted.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

LEVELS = (1, 2, 3)
BLUR_SIDE_FRACTION = {1: 1 / 96, 2: 1 / 48, 3: 1 / 24}  # Gaussian radius / shorter side: 64 px 0.7-2.7, 1024 px 11-43
NOISE_STD = {1: 10.0, 2: 25.0, 3: 50.0}  # Gaussian pixel noise, std on the 0..255 scale
JPEG_QUALITY = {1: 50, 2: 20, 3: 5}
DOWNSCALE_FACTOR = {1: 2, 2: 4, 3: 8}  # shrink by the factor (bicubic), then back to the original size


def _blur(image: Image.Image, level: int, seed: int) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(min(image.size) * BLUR_SIDE_FRACTION[level]))


def _noise(image: Image.Image, level: int, seed: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    noisy = pixels + np.random.default_rng(seed).normal(0.0, NOISE_STD[level], pixels.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, level: int, seed: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY[level])
    with Image.open(buffer) as compressed:
        return compressed.convert("RGB")


def _downscale(image: Image.Image, level: int, seed: int) -> Image.Image:
    factor = DOWNSCALE_FACTOR[level]
    small = (max(1, image.width // factor), max(1, image.height // factor))
    return image.resize(small, Image.Resampling.BICUBIC).resize(image.size, Image.Resampling.BICUBIC)


DEGRADATIONS = {"blur": _blur, "noise": _noise, "jpeg": _jpeg, "downscale": _downscale}


def degrade(image: Image.Image, kind: str, level: int, seed: int = 0) -> Image.Image:
    """`image` (as RGB) degraded by `kind` at `level` (1 mild .. 3 strong); `seed` drives the noise only."""
    if kind not in DEGRADATIONS or level not in LEVELS:
        raise ValueError(f"unknown degradation {kind!r} at level {level}; kinds: {', '.join(DEGRADATIONS)}, "
                         f"levels {LEVELS}")
    return DEGRADATIONS[kind](image.convert("RGB"), level, seed)
