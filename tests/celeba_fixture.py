"""A small folder in CelebA's published layout, generated with Pillow: `img_align_celeba/000001.jpg
...` (RGB JPEGs at the aligned images' 178×218 aspect, halved) and `identity_CelebA.txt` with lines
`000001.jpg 17`. Each identity has its own background colour and shape, so a classifier can learn
them; position, size, brightness and noise vary per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = (89, 109)  # (width, height): the aligned images' 178 × 218, halved
COLOURS = [
    (200, 40, 40),
    (40, 160, 40),
    (40, 60, 200),
    (200, 180, 40),
    (160, 40, 170),
    (40, 170, 180),
    (230, 120, 30),
    (120, 120, 120),
]
SHAPES = ("ellipse", "rectangle", "triangle", "cross")


def _draw(draw: object, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "ellipse":
        draw.ellipse(box, fill=fill)  # type: ignore[attr-defined]
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)  # type: ignore[attr-defined]
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)  # type: ignore[attr-defined]
    else:
        w, h = (x1 - x0) // 3, (y1 - y0) // 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)  # type: ignore[attr-defined]
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=fill)  # type: ignore[attr-defined]


def make_celeba_folder(
    folder: Path, identities: int = 6, per_identity: int = 12, extra_rare: int = 2, seed: int = 0
) -> Path:
    """Write the fixture; identity ids are spread out (CelebA's run to 10,177) and shuffled
    across file numbers, as in the real file. `extra_rare` identities with a single image
    each are written too (CelebA has many)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    ids = [17 + 131 * k for k in range(identities)]
    labels = [i for i in ids for _ in range(per_identity)] + [9000 + k for k in range(extra_rare)]
    order = rng.permutation(len(labels))
    lines = []
    for number, j in enumerate(order, 1):
        ident = labels[j]
        k = ids.index(ident) if ident in ids else int(rng.integers(len(COLOURS)))
        base = np.array(COLOURS[k % len(COLOURS)], dtype=float) * rng.uniform(0.8, 1.1)
        im = Image.new("RGB", SIZE, tuple(int(v) for v in np.clip(base, 0, 255)))
        draw = ImageDraw.Draw(im)
        side = int(rng.integers(34, 50))
        cx, cy = SIZE[0] // 2 + int(rng.integers(-6, 7)), SIZE[1] // 2 + int(rng.integers(-6, 7))
        box = (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
        _draw(draw, SHAPES[k % len(SHAPES)], box, (250, 250, 250) if k % 2 else (15, 15, 15))
        pixels = np.asarray(im, dtype=float) + rng.normal(0, 8, (SIZE[1], SIZE[0], 3))
        name = f"{number:06d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images / name, quality=90)
        lines.append(f"{name} {ident}")
    (folder / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    return folder
