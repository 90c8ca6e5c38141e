"""Generated pictures of coloured shapes with captions and question-answer turns (the ``shapes`` demo set).

Image-text methods (CLIP, the LLaVA-style projector) need paired data, and none can be downloaded here; these
pictures are drawn with PIL, so the ground truth is exact. Each 64 px image holds one shape with four
attributes: colour (6), shape (5), size (2) and position (5). Five colour-shape combinations never occur in
``train``/``val``: they form the ``heldout`` split, so zero-shot and question answering can be measured on
compositions the model has never seen, while every colour and every shape alone has been seen.

Per sample: ``jpg``; ``txt`` a caption from a few templates ("a small red circle at the top left"); ``cls``
the colour-shape class index (``CLASSES``); ``json`` the attributes plus a LLaVA-format conversation
(``{"from": "human"|"gpt", "value": ...}`` turns, ``<image>`` in the first human turn).
Do not flip these images in augmentation: left and right are part of the labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 210, 45),
    "purple": (145, 60, 185),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.13, "large": 0.23}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
HELD_OUT = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("yellow", "star"),
    ("purple", "cross"),
)
CLASSES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)  # class index = position in this list
SIZE = 64

CAPTIONS = (
    "a {size} {color} {shape} {where}",
    "a photo of a {size} {color} {shape} {where}",
    "{where_cap}, a {color} {shape}",
    "a {color} {shape}, {size}, {where}",
)
QUESTIONS = {
    "color": ("What color is the shape?", "What is the color of the object?"),
    "shape": ("What shape is shown?", "What kind of shape is this?"),
    "position": ("Where is the shape?", "Where in the picture is the object?"),
    "size": ("Is the shape small or large?", "How big is the shape?"),
}


def where(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in corners]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a + angle), cy + r * math.sin(a + angle))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5 + angle
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.38
        arm = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]
    raise ValueError(f"unknown shape {shape!r}")


def draw(color: str, shape: str, size: str, position: str, rng: np.random.Generator) -> Image.Image:
    """One picture: a noisy grey background and the shape, with a little jitter in place, size and angle."""
    base = int(rng.integers(40, 120))
    noise = rng.normal(0, 6, (SIZE, SIZE, 1))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8).repeat(3, axis=2), "RGB")
    px, py = POSITIONS[position]
    cx, cy = (px + rng.uniform(-0.05, 0.05)) * SIZE, (py + rng.uniform(-0.05, 0.05)) * SIZE
    r = SIZES[size] * SIZE * rng.uniform(0.9, 1.1)
    fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[color])
    canvas = ImageDraw.Draw(img)
    if shape == "circle":
        canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        canvas.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.25, 0.25)), fill=fill)
    return img


def conversation(attrs: dict, rng: np.random.Generator) -> list[dict]:
    """1-3 question-answer turns about the picture, LLaVA's ``conversations`` format."""
    asked = rng.permutation(list(QUESTIONS))[: int(rng.integers(1, 4))]
    turns = []
    for i, attribute in enumerate(asked):
        question = QUESTIONS[attribute][int(rng.integers(len(QUESTIONS[attribute])))]
        turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": attrs[attribute]})
    return turns


def samples(split: str, n: int, seed: int) -> Iterator[tuple[str, Image.Image, str, int, dict]]:
    """(key, image, caption, class index, json) for ``n`` pictures of ``split`` (train | val | heldout)."""
    combos = [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELD_OUT) == (split == "heldout")]
    rng = np.random.default_rng(seed)
    for i, combo in enumerate(rng.permutation(np.arange(n) % len(combos))):  # balanced, shuffled
        color, shape = combos[combo]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        attrs = {"color": color, "shape": shape, "size": size, "position": position}
        template = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
        caption = template.format(
            color=color, shape=shape, size=size, where=where(position), where_cap=where(position).capitalize()
        )
        image = draw(color, shape, size, position, rng)
        meta = {**attrs, "conversations": conversation(attrs, rng)}
        yield f"{split}_{i:06d}", image, caption, CLASSES.index(f"{color} {shape}"), meta
