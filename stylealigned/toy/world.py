"""A synthetic world of shapes drawn in styles, with known ground truth, for the built-in model.

Every image is 64x64 RGB: one object (a shape polygon with position, size and rotation jitter) drawn with one
style, a rendering recipe that applies to any shape. Everything is seeded, so `sample(seed)` is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SUPERSAMPLE = 4
OBJECTS = ("circle", "square", "triangle", "star", "cross", "heart")
STYLES = ("pastel", "outline", "striped", "neon", "pixel", "polka")
CAPTION_MIX = {"styled": 0.5, "unstyled": 0.4, "empty": 0.1}

PASTELS = ((255, 179, 186), (186, 225, 255), (186, 255, 201), (255, 223, 186), (221, 190, 255))
NEONS = ((0, 255, 255), (255, 0, 255), (120, 255, 0))


@dataclass(frozen=True)
class Sample:
    """One drawn image with its ground truth."""

    image: Image.Image
    object: str
    style: str


def _outline_points(shape: str) -> list[tuple[float, float]]:
    """The shape as a closed polygon on the unit scale (radius about 1), centred on the origin."""
    if shape == "circle":
        return [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a) + 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    if shape == "cross":
        a, b = 0.3, 0.9
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        return [(math.sin(t) ** 3 * 0.95,
                 -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17 + 0.1)
                for t in ts]
    raise ValueError(f"unknown object {shape!r}; choose from {OBJECTS}")


def _placed_polygon(shape: str, rng: np.random.Generator, scale: float) -> list[tuple[float, float]]:
    """The shape's polygon with random centre, radius and rotation, in pixels of a canvas `scale` times 64."""
    cx, cy = rng.uniform(24, 40, size=2)
    radius = rng.uniform(14, 21)
    angle = math.radians(rng.uniform(-25, 25))
    cos, sin = math.cos(angle), math.sin(angle)
    return [((cx + radius * (x * cos - y * sin)) * scale, (cy + radius * (x * sin + y * cos)) * scale)
            for x, y in _outline_points(shape)]


def _mask(polygon, outline_width: float = 0.0, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the filled polygon, or of its outline when `outline_width` > 0."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    if outline_width:
        draw.line(polygon + polygon[:1], fill=255, width=round(outline_width * SUPERSAMPLE), joint="curve")
    else:
        draw.polygon(polygon, fill=255)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _compose(background, layers) -> np.ndarray:
    """Paint (coverage, colour image) layers over a flat background colour; returns float RGB in [0, 255]."""
    canvas = np.broadcast_to(np.asarray(background, np.float32), (SIZE, SIZE, 3)).copy()
    for coverage, colour in layers:
        canvas = canvas * (1 - coverage[..., None]) + np.asarray(colour, np.float32) * coverage[..., None]
    return canvas


def _stripes(rng: np.random.Generator) -> np.ndarray:
    """Diagonal red/yellow stripes over the whole canvas."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    phase = ((xx + yy + rng.integers(0, 8)) // 4) % 2
    return np.where(phase[..., None] == 0, np.array([220, 40, 40]), np.array([255, 210, 0])).astype(np.float32)


def _polka(rng: np.random.Generator) -> np.ndarray:
    """Yellow with a grid of red dots over the whole canvas."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ox, oy = rng.integers(0, 8, size=2)
    dots = ((xx + ox) % 8 - 3.5) ** 2 + ((yy + oy) % 8 - 3.5) ** 2 <= 5.0
    return np.where(dots[..., None], np.array([200, 20, 60]), np.array([255, 230, 90])).astype(np.float32)


def render(shape: str, style: str, rng: np.random.Generator) -> Image.Image:
    """Draw `shape` in `style` at 64x64 with random placement; the same generator state gives the same image."""
    polygon = _placed_polygon(shape, rng, SUPERSAMPLE)
    if style == "pastel":
        pixels = _compose((255, 255, 255), [(_mask(polygon), PASTELS[rng.integers(len(PASTELS))])])
    elif style == "outline":
        pixels = _compose((245, 235, 205), [(_mask(polygon, outline_width=3.5), (15, 15, 15))])
    elif style == "striped":
        pixels = _compose((200, 200, 200), [(_mask(polygon), _stripes(rng))])
    elif style == "neon":
        line = _mask(polygon, outline_width=2.0)
        glow = np.asarray(Image.fromarray(np.uint8(line * 255)).filter(ImageFilter.GaussianBlur(3)), np.float32) / 255
        colour = NEONS[rng.integers(len(NEONS))]
        pixels = _compose((0, 0, 0), [(np.clip(glow * 2.5, 0, 1) * 0.7, colour), (line, (255, 255, 255))])
    elif style == "pixel":
        coarse = _mask([(x / 2, y / 2) for x, y in polygon], size=SIZE // 2) > 0.5
        blocks = np.kron(coarse, np.ones((2, 2))).astype(np.float32)
        pixels = _compose((60, 20, 90), [(blocks, (255, 140, 0))])
    elif style == "polka":
        pixels = _compose((40, 70, 170), [(_mask(polygon), _polka(rng))])
    else:
        raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 255).round()))


def sample(seed: int) -> Sample:
    """Draw one image with an object and a style chosen uniformly; deterministic per seed."""
    rng = np.random.default_rng(seed)
    shape, style = OBJECTS[rng.integers(len(OBJECTS))], STYLES[rng.integers(len(STYLES))]
    return Sample(render(shape, style, rng), shape, style)


def styled_caption(shape: str, style: str) -> str:
    """The caption naming both object and style."""
    return f"a {shape} in {style} style"


def unstyled_caption(shape: str) -> str:
    """The caption naming only the object."""
    return f"a {shape}"


def caption(shape: str, style: str, rng: np.random.Generator) -> str:
    """A training caption drawn from `CAPTION_MIX`: styled, unstyled, or empty (for guidance dropout)."""
    kind = rng.choice(list(CAPTION_MIX), p=list(CAPTION_MIX.values()))
    return {"styled": styled_caption(shape, style), "unstyled": unstyled_caption(shape), "empty": ""}[kind]


def vocabulary() -> list[str]:
    """Every word a caption of this world can contain."""
    return ["a", "in", "style", *OBJECTS, *STYLES]
