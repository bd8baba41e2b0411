#!/usr/bin/env python3
"""diffusers' tiled VAE decode on the tiny model: the reference for tests/vae_tiling.rs.

Loads models/tiny/vae with diffusers' AutoencoderKL (f32, CPU), decodes one seeded latent
whole and with ``enable_tiling()`` at a tile of 64 pixels (8 latents; the tiny VAE's own
``sample_size`` of 128 would need a larger latent than a test wants), and writes the latent
and both decodes to tests/fixtures/vae_tiling/tiny.safetensors.

    .venv-bench/bin/python scripts/make_vae_tiling_fixture.py
"""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 64


def main() -> None:
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, "models/tiny/vae")).eval()
    gen = torch.Generator().manual_seed(7)
    # 20 x 14 latents: three tile rows and two tile columns, the last ones partial.
    z = torch.randn((1, 4, 20, 14), generator=gen, dtype=torch.float32) * 2.0
    with torch.inference_mode():
        whole = vae.decode(z).sample
        vae.enable_tiling()
        vae.tile_sample_min_size = TILE
        vae.tile_latent_min_size = TILE // 8
        vae.tile_overlap_factor = 0.25
        tiled = vae.decode(z).sample
    out = os.path.join(ROOT, "tests/fixtures/vae_tiling/tiny.safetensors")
    save_file(
        {"latent": z.contiguous(), "whole": whole.contiguous(), "tiled": tiled.contiguous()},
        out,
        metadata={"tile_sample": str(TILE), "overlap": "0.25", "diffusers": __import__("diffusers").__version__},
    )
    diff = (whole - tiled).abs()
    print(f"wrote {out}: decode {tuple(whole.shape)}, tiled vs whole max {diff.max():.4f} mean {diff.mean():.5f}")


if __name__ == "__main__":
    main()
