#!/usr/bin/env python3
"""The diffusers side of the engine benchmark (scripts/bench_engine.sh runs both sides).

Builds the production architectures with random weights in their real shapes — the same
shapes as popcon-worker's ``ModelSpecs::reference`` (the Hub configs of sd-turbo / SD 2.1,
SD 1.5 and SDXL) — and runs one generation through diffusers' own pipeline, in float32 on the
CPU, timing each stage and reading the process's peak resident set at the end. One case per
process, so each peak is that case's own. Prints one JSON line.

Stages are timed inside the real pipeline call with hooks: the text encoder(s), every UNet
forward (the table reports one step: the mean), and the VAE decode. ``per_image_s`` is the
whole pipeline call (text, denoise, decode, post-processing to PIL) divided by the batch.

    python3 scripts/bench_diffusers.py --arch sd2 --size 512 --steps 1 --batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

PROMPT = "a friendly cartoon fox, head-to-toe shot of the subject, feet visible (not shoes)"

CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# SD 2.x checkpoints ship the OpenCLIP-H text tower with its last layer already removed.
CLIP_H23 = dict(
    CLIP_L,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
CLIP_BIGG = dict(
    CLIP_L,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)

SD_BLOCKS = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    sample_size=64,
)
UNETS = {
    "sd15": dict(SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768),
    "sd2": dict(
        SD_BLOCKS,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    ),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    ),
}


def vae(arch: str) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size={"sd15": 512, "sd2": 768, "sdxl": 1024}[arch],
        scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
        force_upcast=arch == "sdxl",
    ).eval()


def scheduler(kind: str):
    common = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    if kind == "ddim":
        # SD 1.5's own DDIM settings (its repo config): no clipping, alpha_prod at 0 for the end.
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    return EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing")


class Timer:
    """Accumulates wall time of module forwards (and of the VAE decode) during the pipeline."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def hook(self, module: torch.nn.Module, name: str) -> None:
        start: list[float] = []
        module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *_: self.times.setdefault(name, []).append(time.perf_counter() - start.pop())
        )

    def wrap(self, obj, attr: str, name: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.times.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        setattr(obj, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("sd15", "sd2", "sdxl"), required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--scheduler", choices=("euler_ancestral", "ddim"), default="euler_ancestral")
    ap.add_argument("--tokenizer", default="models/tiny/tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tok = CLIPTokenizer.from_pretrained(args.tokenizer)
    unet = UNet2DConditionModel(**UNETS[args.arch]).eval()
    parts = dict(vae=vae(args.arch), unet=unet, scheduler=scheduler(args.scheduler), tokenizer=tok)
    if args.arch == "sdxl":
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)).eval()
        parts["tokenizer_2"] = tok
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        cfg = CLIP_L if args.arch == "sd15" else CLIP_H23
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    rss_weights_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    timer = Timer()
    timer.hook(pipe.text_encoder, "text")
    if args.arch == "sdxl":
        timer.hook(pipe.text_encoder_2, "text")
    timer.hook(pipe.unet, "unet")
    timer.wrap(pipe.vae, "decode", "vae_decode")
    generator = [torch.Generator().manual_seed(args.seed + i) for i in range(args.batch)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        images = pipe(
            [PROMPT] * args.batch,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
        ).images
    total_s = time.perf_counter() - t0
    assert len(images) == args.batch
    t = timer.times
    print(
        json.dumps(
            {
                "side": "diffusers",
                "arch": args.arch,
                "size": args.size,
                "steps": args.steps,
                "batch": args.batch,
                "guidance": args.guidance,
                "build_s": round(build_s, 3),
                "text_s": round(sum(t.get("text", [])), 4),
                "unet_step_s": round(sum(t["unet"]) / len(t["unet"]), 4),
                "unet_calls": len(t["unet"]),
                "vae_decode_s": round(sum(t["vae_decode"]), 4),
                "total_s": round(total_s, 4),
                "per_image_s": round(total_s / args.batch, 4),
                "rss_weights_mib": round(rss_weights_kib / 1024, 1),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
