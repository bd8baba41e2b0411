#!/usr/bin/env python3
"""Make the init-image resize fixtures: what diffusers' image processor makes of a few images.

What it makes, in ``tests/fixtures/resize/`` (relative to the repository root):

* ``<case>.in.png``: a deterministic RGB input (a formula, plus seeded numpy noise where a
  photo-like texture is wanted);
* ``<case>.pil.png``: that input resized by diffusers' ``VaeImageProcessor.resize`` — the call
  the img2img pipelines make on a PIL init image, i.e. ``PIL.Image.resize(..., LANCZOS)``
  (the script asserts the two are the same bytes);
* ``manifest.json``: the cases (input, output size, expected file) and the versions used.

Why: ``src/engine/resize.rs`` reimplements Pillow's antialiased Lanczos so that an init image of
another size starts from the latents diffusers would encode; ``tests/resize.rs`` holds it to
within 2/255 of these files. The cases cover a downscale (200×150 → 128², the one the
``image`` crate's Lanczos3 misses by 35/255), an upscale, different ratios per axis, odd sizes,
one axis only, a height-dominant shrink (Pillow 13 then runs its vertical pass first, which
moves the intermediate rounding), and sharp saturated edges (Lanczos ringing clipped at 0/255).

Everything is deterministic: running the script twice gives byte-identical files.

How to rerun (from the repository root, in a venv with diffusers and Pillow):

    .venv-bench/bin/python scripts/make_resize_fixture.py

Written against Pillow 13.0.0, diffusers 0.42.1, numpy 2.4. Pillow before 13 ordered the two
passes differently for height-dominant shrinks (always horizontal first), which changes the
``tall`` case by up to 15/255; the other cases come out the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures" / "resize"


def photo_like(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth colour fields, a few soft blobs, thin lines and fine stripes, mild seeded noise: the
    content of a real init image, compressible enough to keep the PNG small."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    r = 200 * u + 40 * np.sin(6.0 * v)
    g = 60 + 150 * v * (1 - u) + 30 * np.cos(9.0 * u * v)
    b = 120 + 100 * np.sin(3.0 * (u + v))
    img = np.stack([r, g, b], axis=-1)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rad = rng.uniform(0.08, 0.25) * min(w, h)
        colour = rng.uniform(0, 255, size=3)
        mask = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * rad**2)))[..., None]
        img = img * (1 - mask) + colour * mask
    # Some detail a resampler must handle: a thin dark diagonal, a bright ring, fine stripes.
    line = np.abs(v - (0.2 + 0.6 * u)) * h < 0.8
    img[line] = (20, 20, 30)
    ring = np.abs(np.hypot(x - 0.7 * w, y - 0.35 * h) - 0.18 * min(w, h)) < 1.0
    img[ring] = (250, 250, 240)
    fine = (y > 0.75 * h) & (x < 0.3 * w) & ((x.astype(int) % 4) < 2)
    img[fine] = img[fine] * 0.4
    img += rng.normal(0, 2.5, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sharp_edges(w: int, h: int) -> np.ndarray:
    """Hard-edged saturated shapes on white: black/white stripes of several widths, a red
    square, a 1-px checkerboard corner. Lanczos overshoots at every edge, and the overshoot is
    clipped to [0, 255] in each pass — the case where pass order and clipping show."""
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    x = np.arange(w)
    stripes = ((x // 3) % 2 == 0) & (x < w // 2)
    img[: h // 3, stripes] = 0
    img[h // 3 : h // 2, (x % 2 == 0) & (x >= w // 4)] = (0, 0, 255)
    img[h // 2 :, : w // 3] = (255, 0, 0)
    img[h // 2 + 2 : h - 3, w // 2 : w - 4] = (0, 255, 0)
    yy, xx = np.mgrid[0 : h // 4, 0 : w // 4]
    img[h - h // 4 :, w - w // 4 :][(xx + yy) % 2 == 0] = 0
    return img


# (name, input (w, h), kind, seed, output (w, h))
CASES = [
    ("down", (200, 150), "photo", 1, (128, 128)),
    ("up", (50, 40), "photo", 2, (128, 96)),
    ("aspect", (160, 90), "photo", 3, (64, 72)),
    ("odd", (101, 37), "photo", 4, (33, 59)),
    ("width_only", (120, 80), "photo", 5, (72, 80)),
    ("height_only", (120, 80), "photo", 6, (120, 48)),
    ("tall", (96, 240), "photo", 7, (80, 64)),
    ("edges_down", (64, 64), "edges", 0, (40, 24)),
    ("edges_up", (24, 24), "edges", 0, (80, 56)),
]


def main() -> None:
    from diffusers.image_processor import VaeImageProcessor

    import diffusers

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    processor = VaeImageProcessor(vae_scale_factor=8)  # the pipelines' defaults: resample="lanczos"
    cases = []
    for name, (w, h), kind, seed, (ow, oh) in CASES:
        arr = photo_like(w, h, seed) if kind == "photo" else sharp_edges(w, h)
        src = Image.fromarray(arr, "RGB")
        out = processor.resize(src, height=oh, width=ow)
        direct = src.resize((ow, oh), resample=Image.Resampling.LANCZOS)
        assert out.mode == "RGB" and out.size == (ow, oh), (name, out.mode, out.size)
        assert out.tobytes() == direct.tobytes(), f"{name}: diffusers' resize is not PIL's Lanczos"
        src.save(OUT_DIR / f"{name}.in.png", format="PNG", optimize=True)
        out.save(OUT_DIR / f"{name}.pil.png", format="PNG", optimize=True)
        cases.append(
            {
                "name": name,
                "input": f"{name}.in.png",
                "input_size": [w, h],
                "output_size": [ow, oh],
                "expected": f"{name}.pil.png",
            }
        )
        print(f"{name}: {w}×{h} → {ow}×{oh}")
    manifest = {
        "generated_by": "scripts/make_resize_fixture.py",
        "what": "diffusers VaeImageProcessor.resize (PIL Image.resize, LANCZOS, no reducing_gap) of RGB8 PNGs",
        "versions": {"pillow": PIL.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__},
        "tolerance_255": 2,
        "cases": cases,
    }
    (OUT_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
