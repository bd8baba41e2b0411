#!/usr/bin/env python3
"""The diffusers side of the animation benchmark (scripts/bench_animate.sh runs both sides).

Builds SD 1.5 in its real shapes and diffusers' default ``MotionAdapter()`` (the shape of the
SD 1.5 adapters: v1-5-2, v1-5-3, AnimateDiff-Lightning) with random weights — the shapes of
popcon-worker's ``ModelSpecs::reference(sd15)`` and ``MotionSpec::sd15()`` — and animates one
still through ``AnimateDiffVideoToVideoPipeline`` (the still repeated over the frames), f32 on
the CPU, with the Lightning preset's scheduler (Euler, trailing, linear betas). Times the text
encoder, every UNet forward and the VAE decode with hooks, reads the peak resident set at the
end, prints one JSON line. One case per process, so each peak is that case's own.

    python3 scripts/bench_animate_diffusers.py --size 512 --frames 16 --steps 4 --strength 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AnimateDiffVideoToVideoPipeline,
    EulerDiscreteScheduler,
    MotionAdapter,
    UNet2DConditionModel,
)
from PIL import Image  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from bench_diffusers import CLIP_L, UNETS, Timer, vae  # noqa: E402

PROMPT = "a red fox, happy expression, cartoon style, sticker, bold outline, plain white background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--strength", type=float, default=0.75)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--image", required=True)
    ap.add_argument("--tokenizer", default="models/tiny/tokenizer")
    args = ap.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = AnimateDiffVideoToVideoPipeline(
        vae=vae("sd15"),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(args.tokenizer),
        unet=UNet2DConditionModel(**UNETS["sd15"]).eval(),
        motion_adapter=MotionAdapter().eval(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
            timestep_spacing="trailing",
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    timer = Timer()
    timer.hook(pipe.text_encoder, "text")
    timer.hook(pipe.unet, "unet")
    timer.wrap(pipe.vae, "decode", "vae_decode")
    still = Image.open(args.image).convert("RGB")
    t0 = time.perf_counter()
    with torch.inference_mode():
        frames = pipe(
            video=[still] * args.frames,
            prompt=PROMPT,
            num_inference_steps=args.steps,
            strength=args.strength,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(0),
            output_type="pil",
        ).frames[0]
    total_s = time.perf_counter() - t0
    assert len(frames) == args.frames
    t = timer.times
    print(json.dumps({
        "side": "diffusers",
        "size": args.size,
        "frames": args.frames,
        "steps_run": len(t["unet"]),
        "build_s": round(build_s, 3),
        "text_s": round(sum(t.get("text", [])), 4),
        "unet_step_s": round(sum(t["unet"]) / len(t["unet"]), 4),
        "vae_decode_s": round(sum(t["vae_decode"]), 4),
        "clip_s": round(total_s, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
