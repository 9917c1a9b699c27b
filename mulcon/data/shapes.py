"""Drawing for the synthetic demo set: the 12 shape classes, cluttered backgrounds, distractors.

Class identity is carried by outline, helped by a colour: each class has a home colour it is drawn
in most of the time (`HOME_COLOUR_PROBABILITY`), otherwise any colour of the shared palette, with
random size, position and a small rotation. Twelve classes share ten home colours, so colour alone
never settles the class; it gives a network trained from scratch on a few hundred images a cue to
start from. Distractors (thin lines, arcs, dots, zigzags) use the same palette but are not classes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours shared by all classes and distractors.
PALETTE = np.array(
    [
        (230, 40, 40), (40, 180, 60), (40, 80, 230), (240, 220, 40), (220, 60, 220),
        (40, 210, 220), (250, 140, 30), (245, 245, 245), (25, 25, 25), (140, 70, 200),
    ],
    dtype=np.int64,
)
MAX_ROTATION_DEGREES = 25.0  # enough to vary pose, small enough that a square never becomes a diamond


def _regular(sides: int, phase: float) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(sides) / sides
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    angles = -math.pi / 2 + math.pi * np.arange(10) / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    points -= (points.max(axis=0) + points.min(axis=0)) / 2
    return points / np.abs(points).max()


def _crescent() -> np.ndarray:
    # Inside the unit circle, outside a circle of radius 0.85 centred at x = 0.5.
    offset, inner = 0.5, 0.85
    cross_x = (1 - inner**2 + offset**2) / (2 * offset)
    cross_y = math.sqrt(1 - cross_x**2)
    outer_start = math.atan2(cross_y, cross_x)
    outer = np.linspace(outer_start, 2 * math.pi - outer_start, 32)  # top -> left -> bottom
    inner_top = math.atan2(cross_y, cross_x - offset)
    inner_angles = np.linspace(2 * math.pi - inner_top, inner_top, 24)  # bottom -> left -> top
    outer_points = np.stack([np.cos(outer), np.sin(outer)], axis=1)
    inner_points = np.stack([offset + inner * np.cos(inner_angles), inner * np.sin(inner_angles)], axis=1)
    return np.concatenate([outer_points, inner_points])


def _polygon(points: list[tuple[float, float]]) -> np.ndarray:
    return np.array(points, dtype=np.float64)


# Unit outlines (radius <= 1 around the origin). "ring" is drawn as a thick circle outline.
OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular(40, 0.0),
    "square": _regular(4, math.pi / 4) * 0.95,
    "triangle": _regular(3, -math.pi / 2),
    "star": _star(),
    "cross": _polygon([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
                       (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]),
    "ring": _regular(40, 0.0),
    "hexagon": _regular(6, 0.0),
    "diamond": _polygon([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)]),
    "arrow": _polygon([(-1, -0.18), (0.25, -0.18), (0.25, -0.55), (1, 0), (0.25, 0.55), (0.25, 0.18),
                       (-1, 0.18)]),
    "heart": _heart(),
    "crescent": _crescent(),
    "bar": _polygon([(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)]),
}


HOME_COLOUR_PROBABILITY = 0.7


def random_colour(rng: np.random.Generator, home: int | None = None) -> tuple[int, int, int]:
    """A palette colour with a little jitter, so colours are not exactly discrete.

    With `home` (a palette index), that colour is taken with probability HOME_COLOUR_PROBABILITY.
    """
    index = int(rng.integers(len(PALETTE)))
    if home is not None and rng.random() < HOME_COLOUR_PROBABILITY:
        index = home % len(PALETTE)
    colour = PALETTE[index] + rng.integers(-20, 21, size=3)
    return tuple(int(c) for c in np.clip(colour, 0, 255))


def class_colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    """The colour of one object of class `name`: usually its home colour (see module docstring)."""
    return random_colour(rng, home=list(OUTLINES).index(name))


def place_outline(name: str, centre: tuple[float, float], radius: float, degrees: float) -> np.ndarray:
    """Outline of class `name`, rotated by `degrees`, scaled to `radius` pixels, moved to `centre`.

    Returns:
        (P, 2) float64 pixel coordinates (x, y).
    """
    angle = math.radians(degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return OUTLINES[name] @ rotation.T * radius + np.asarray(centre)


def draw_object(draw: ImageDraw.ImageDraw, name: str, points: np.ndarray, colour: tuple) -> None:
    """Draw one object whose outline `points` came from `place_outline`."""
    if name == "ring":
        low, high = points.min(axis=0), points.max(axis=0)
        width = max(2, int(round((high[0] - low[0]) * 0.16)))
        draw.ellipse([low[0], low[1], high[0], high[1]], outline=colour, width=width)
    else:
        draw.polygon([tuple(p) for p in points], fill=colour)


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A linear gradient between two random colours at a random angle, plus pixel noise."""
    start, end = rng.uniform(30, 225, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    grid = np.arange(size) / max(size - 1, 1)
    ramp = math.cos(angle) * grid[None, :] + math.sin(angle) * grid[:, None]
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)  # (H, W) in [0, 1]
    pixels = start + (end - start) * ramp[..., None]  # (H, W, 3)
    pixels += rng.normal(0, 10, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def draw_distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """Thin strokes and dots that belong to no class: clutter the model must learn to ignore."""
    for _ in range(int(rng.integers(3, 9))):
        kind = rng.integers(4)
        colour = random_colour(rng)
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, size=4))
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=1)
        elif kind == 1:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2]
            start = float(rng.uniform(0, 360))
            draw.arc(box, start, start + float(rng.uniform(40, 160)), fill=colour, width=1)
        elif kind == 2:
            radius = float(rng.uniform(0.5, 0.025 * size + 0.5))
            draw.ellipse([x0 - radius, y0 - radius, x0 + radius, y0 + radius], fill=colour)
        else:
            steps = rng.uniform(-0.12 * size, 0.12 * size, size=(4, 2)).cumsum(axis=0) + (x0, y0)
            draw.line([tuple(p) for p in steps], fill=colour, width=1)
