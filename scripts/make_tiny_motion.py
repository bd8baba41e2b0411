#!/usr/bin/env python3
"""Make the tiny AnimateDiff models and the diffusers fixtures for popcon-worker's animation tests.

What it makes (paths relative to the repository root):

* ``models/tiny-sd15/``: a tiny Stable Diffusion **1.5-layout** model (a UNet with convolutional
  transformer projections and two layers per block, as SD 1.5 has), sharing the tokenizer, text
  encoder and VAE of ``models/tiny`` (copied), with an ``EulerDiscreteScheduler`` config
  ("linear" betas, "trailing" spacing: what AnimateDiff-Lightning's model card prescribes).
* ``models/tiny-motion-adapter/``: a randomly initialised diffusers ``MotionAdapter`` for that
  UNet (2 levels, 2 motion layers per level, a motion mid block), saved by ``save_pretrained``
  under the real tensor names (``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1…``).
* ``tests/fixtures/tiny-motion/``: ``init.png`` (a copy of the tiny fixture's 64×64 image),
  ``reference.safetensors`` and ``reference.json``: one forward of diffusers' ``UNetMotionModel``
  (built by ``UNetMotionModel.from_unet2d`` from the two), and complete
  ``AnimateDiffVideoToVideoPipeline`` runs on the still repeated over the frames, with every
  random draw captured (the VAE sample's noise, ``add_noise``'s noise, each ancestral step's
  noise) so that the Rust engine, whose RNG differs, can replay them.

Noise layouts: the pipeline draws ``add_noise`` noise as ``[batch, frames, c, h, w]`` and step
noise as ``[batch, c, frames, h, w]``; the fixtures store every draw per clip as
``[frames, c, h, w]`` (the engine's layout), so step noise is permuted before it is saved.

Everything is deterministic (fixed seeds, CPU, float32, one thread, deterministic algorithms).

How to rerun (from the repository root; ``models/tiny`` must exist, see make_tiny_model.py):

    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch diffusers transformers safetensors numpy \
        && .venv-ref/bin/python scripts/make_tiny_motion.py

Written against torch 2.15, diffusers 0.42.1, transformers 5.24.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AnimateDiffVideoToVideoPipeline,
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
)
from diffusers.utils import torch_utils as diffusers_torch_utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny"
BASE_DIR = ROOT / "models" / "tiny-sd15"
ADAPTER_DIR = ROOT / "models" / "tiny-motion-adapter"
FIX_DIR = ROOT / "tests" / "fixtures" / "tiny-motion"

transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)

SEED_UNET = 2002
SEED_ADAPTER = 2003
SIZE = 64
LATENT = SIZE // 8

UNET_KWARGS = dict(
    sample_size=LATENT,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    use_linear_projection=False,
    norm_num_groups=32,
)

ADAPTER_KWARGS = dict(
    block_out_channels=(32, 64),
    motion_layers_per_block=2,
    motion_transformer_layers_per_block=1,
    motion_mid_block_layers_per_block=1,
    motion_transformer_layers_per_mid_block=1,
    motion_num_attention_heads=2,
    motion_norm_num_groups=32,
    motion_max_seq_length=32,
    use_motion_mid_block=True,
)

SCHED = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="trailing",
)

RANDN_MODULES = [
    ("pipeline", "diffusers.pipelines.animatediff.pipeline_animatediff_video2video"),
    ("vae", "diffusers.models.autoencoders.vae"),
    ("scheduler", "diffusers.schedulers.scheduling_euler_ancestral_discrete"),
    ("scheduler", "diffusers.schedulers.scheduling_euler_discrete"),
]


class NoiseTape:
    """Replaces diffusers' randn_tensor in the modules above: draws from its own seeded generator
    and logs (source, tensor), or replays a log, checking source and shape."""

    def __init__(self):
        import importlib

        self.mode, self.gen, self.log, self.queue = None, None, [], []
        orig = diffusers_torch_utils.randn_tensor
        for source, name in RANDN_MODULES:
            mod = importlib.import_module(name)
            assert mod.randn_tensor is orig, name
            mod.randn_tensor = self._make(source)

    def _make(self, source):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            shape = tuple(shape)
            if self.mode == "record":
                t = torch.randn(shape, generator=self.gen, dtype=torch.float32)
                self.log.append((source, t.clone()))
                return t
            assert self.mode == "replay" and self.queue, f"unexpected draw {source} {shape}"
            src, t = self.queue.pop(0)
            assert src == source and tuple(t.shape) == shape, (src, source, t.shape, shape)
            return t.clone()

        return randn_tensor

    def record(self, seed):
        self.mode, self.gen, self.log = "record", torch.Generator("cpu").manual_seed(seed), []

    def replay(self, log):
        self.mode, self.queue = "replay", list(log)

    def stop(self):
        assert self.mode != "replay" or not self.queue, "recorded draws left over"
        self.mode = None


TAPE = NoiseTape()


def write_models():
    for d in (BASE_DIR, ADAPTER_DIR, FIX_DIR):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    for part in ("tokenizer", "text_encoder", "vae"):
        shutil.copytree(TINY / part, BASE_DIR / part)
    torch.manual_seed(SEED_UNET)
    UNet2DConditionModel(**UNET_KWARGS).eval().save_pretrained(BASE_DIR / "unet", safe_serialization=True)
    EulerDiscreteScheduler(**SCHED).save_pretrained(BASE_DIR / "scheduler")
    index = json.loads((TINY / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (BASE_DIR / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    torch.manual_seed(SEED_ADAPTER)
    MotionAdapter(**ADAPTER_KWARGS).eval().save_pretrained(ADAPTER_DIR, safe_serialization=True)
    shutil.copy(ROOT / "tests" / "fixtures" / "tiny" / "init.png", FIX_DIR / "init.png")


def main():
    write_models()
    tokenizer = CLIPTokenizer.from_pretrained(BASE_DIR / "tokenizer")
    te = CLIPTextModel.from_pretrained(BASE_DIR / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(BASE_DIR / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(BASE_DIR / "unet").eval()
    adapter = MotionAdapter.from_pretrained(ADAPTER_DIR).eval()
    names = sorted(load_file(str(ADAPTER_DIR / "diffusion_pytorch_model.safetensors")).keys())
    assert any(".motion_modules.0.transformer_blocks.0.attn1.to_q.weight" in n for n in names), names[:5]

    tensors: dict[str, np.ndarray] = {}
    manifest: dict = {
        "generator": f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}",
        "layout": "every per-clip draw and result is [frames, c, h, w] (engine layout)",
    }

    def put(name, x):
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32)
        assert np.isfinite(arr.astype(np.float64)).all(), name
        tensors[name] = np.ascontiguousarray(arr)

    prompt = "a cheerful cat, sticker"
    with torch.no_grad():
        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        context = te(ids.input_ids)[0]
        put("motion_unet.context", context)

        # One UNetMotionModel forward: two clips of 6 frames, [b, c, f, h, w] in diffusers' layout.
        motion = UNetMotionModel.from_unet2d(unet, adapter).eval()
        g = torch.Generator("cpu").manual_seed(7)
        frames = 6
        sample = torch.randn((2, 4, frames, LATENT, LATENT), generator=g)
        # UNetMotionModel takes one context row per frame (the pipeline repeats them).
        ctx = torch.cat([context, context * 0.5]).repeat_interleave(frames, dim=0)
        out = motion(sample, 500, encoder_hidden_states=ctx).sample
        put("motion_unet.sample", sample.permute(0, 2, 1, 3, 4))
        put("motion_unet.out", out.permute(0, 2, 1, 3, 4))
        manifest["motion_unet"] = {
            "frames": frames,
            "timestep": 500,
            "context": "clip 0: the prompt's states; clip 1: half of them",
            "sample": "[clips, frames, 4, 8, 8]",
        }

        init = Image.open(FIX_DIR / "init.png").convert("RGB")
        cases = {
            "v2v_euler_a": dict(
                scheduler=EulerAncestralDiscreteScheduler(**SCHED),
                frames=6, steps=5, strength=0.8, guidance=3.0, negative="blurry",
            ),
            "v2v_euler_lightning": dict(
                scheduler=EulerDiscreteScheduler(**SCHED),
                frames=8, steps=4, strength=0.75, guidance=1.0, negative=None,
            ),
        }
        for name, case in cases.items():
            pipe = AnimateDiffVideoToVideoPipeline(
                vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                motion_adapter=adapter, scheduler=case["scheduler"],
            )
            pipe.set_progress_bar_config(disable=True)
            seen = {}

            def keep(p, i, t, kw):
                seen["latents"] = kw["latents"].clone()
                return kw

            kwargs = dict(
                video=[init] * case["frames"], prompt=prompt, negative_prompt=case["negative"],
                num_inference_steps=case["steps"], strength=case["strength"],
                guidance_scale=case["guidance"], height=SIZE, width=SIZE, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0),
                callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"],
            )
            TAPE.record(1234)
            frames_np = pipe(**kwargs).frames[0]
            TAPE.stop()
            log = list(TAPE.log)
            # The same pipeline replaying its own draws gives the same frames: the tape is complete.
            TAPE.replay(log)
            again = pipe(**kwargs).frames[0]
            TAPE.stop()
            assert np.array_equal(frames_np, again), name

            sources = [s for s, _ in log]
            assert sources[0] == "vae" and sources[1] == "pipeline", sources
            put(f"{name}.encode_noise", log[0][1])  # [frames, 4, 8, 8]
            put(f"{name}.add_noise", log[1][1][0])  # [1, frames, …] -> [frames, …]
            steps = [t[0].permute(1, 0, 2, 3) for s, t in log[2:]]  # [1, c, f, …] -> [f, c, …]
            assert all(s == "scheduler" for s in sources[2:]), sources
            if steps:
                put(f"{name}.step_noise", torch.stack(steps))
            put(f"{name}.final_latents", seen["latents"][0].permute(1, 0, 2, 3))
            put(f"{name}.pixels", (frames_np * 255).round().astype(np.uint8))
            manifest[name] = {
                "prompt": prompt,
                "negative_prompt": case["negative"],
                "scheduler_class": type(case["scheduler"]).__name__,
                "scheduler_config": dict(case["scheduler"].config),
                "frames": case["frames"],
                "num_inference_steps": case["steps"],
                "strength": case["strength"],
                "guidance_scale": case["guidance"],
                "width": SIZE,
                "height": SIZE,
                "step_draws": len(steps),
            }

    save_file({k: torch.from_numpy(v) for k, v in sorted(tensors.items())},
              str(FIX_DIR / "reference.safetensors"))
    (FIX_DIR / "reference.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    print("wrote", BASE_DIR, ADAPTER_DIR, FIX_DIR)
    for k, v in sorted(tensors.items()):
        print(f"  {k}: {list(v.shape)} {v.dtype}")


if __name__ == "__main__":
    main()
