"""A deterministic, offline, learnable bird-like dataset: each species is a coloured shape on a noisy background.

Same seed, same bytes. Used by the smoke experiment and the tests; no network needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from birdcli.data.layout import SPLITS, CsvRow, write_csv

COLORS = {
    "CRIMSON": (200, 30, 40),
    "AZURE": (30, 110, 220),
    "GOLDEN": (230, 190, 30),
    "EMERALD": (30, 170, 80),
    "VIOLET": (140, 60, 200),
    "SNOWY": (240, 240, 240),
    "EBONY": (25, 25, 25),
    "COPPER": (190, 110, 50),
}
SHAPES = ("ROUND", "SQUARE", "CRESTED", "STRIPED", "RINGED")


def species_names(n: int) -> list[str]:
    names = [f"{c} {s} WARBLER" for s in SHAPES for c in COLORS]
    if n > len(names):
        raise ValueError(f"synthetic data has at most {len(names)} species, asked for {n}")
    return sorted(names[:n])


def _draw(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    color_name, shape = name.split()[:2]
    bg = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    arr = np.clip(bg + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    color = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLORS[color_name])
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = rng.uniform(r, size - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "ROUND":
        draw.ellipse(box, fill=color)
    elif shape == "SQUARE":
        draw.rectangle(box, fill=color)
    elif shape == "CRESTED":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "STRIPED":
        for k in range(-2, 3):
            y = cy + k * r / 2.5
            draw.line([(cx - r, y), (cx + r, y)], fill=color, width=max(1, size // 20))
    else:  # RINGED
        draw.ellipse(box, outline=color, width=max(2, size // 12))
    return img


def generate(
    out: Path,
    num_classes: int,
    per_split: dict[str, int],
    image_size: int,
    seed: int,
    on_image: Callable[[], None] | None = None,
) -> int:
    """Write the dataset under `out`; returns the number of images. Fully determined by the arguments."""
    rng = np.random.default_rng(seed)
    names = species_names(num_classes)
    rows, count = [], 0
    for split in SPLITS:
        for class_id, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_split[split]):
                rel = f"{split}/{name}/{i + 1:03d}.jpg"
                _draw(name, image_size, rng).save(out / rel, quality=92)
                rows.append(CsvRow(float(class_id), rel, name, split, f"AVIS SYNTHETICA {class_id}"))
                count += 1
                if on_image is not None:
                    on_image()
    write_csv(out, rows)
    return count
