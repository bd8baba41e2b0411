#!/usr/bin/env python3
"""Make the tiny SDXL-architecture reference model and its diffusers fixtures for popcon-worker's tests.

The SDXL counterpart of ``scripts/make_tiny_model.py`` (read that first: this script imports its
tokenizer trainer, noise tape, scheduler factories and helpers, and follows its conventions).

What it makes (paths relative to the repository root):

* ``models/tiny-xl/``: a randomly initialised, *architecturally real* SDXL model in the exact
  diffusers ``StableDiffusionXLPipeline`` folder layout, a few MB in all:
    - ``tokenizer/`` and ``tokenizer_2/``: the same CLIP byte-level BPE vocab/merges as
      ``models/tiny/tokenizer`` (byte-identical); ``tokenizer/`` pads with ``<|endoftext|>`` (as SDXL's
      CLIP-L tokenizer), ``tokenizer_2/`` pads with ``!`` (as SDXL's OpenCLIP-bigG tokenizer);
    - ``text_encoder/``: a 3-layer, 32-wide ``CLIPTextModel`` with ``quick_gelu`` (CLIP-L style),
      saved under the real checkpoints' ``text_model.…`` names;
    - ``text_encoder_2/``: a 3-layer, 32-wide ``CLIPTextModelWithProjection`` with ``gelu`` and a
      32→32 ``text_projection`` (bigG style), saved under ``text_model.…`` + ``text_projection.weight``;
    - ``unet/``: a 2-level ``UNet2DConditionModel`` with SDXL's shape pattern (first level without
      attention, linear-projection transformers with 1 / 2 layers, ``text_time`` added conditioning);
    - ``vae/``: tiny's 4-level ``AutoencoderKL`` shape, ``scaling_factor=0.13025``, ``force_upcast``;
    - ``scheduler/``: ``EulerAncestralDiscreteScheduler`` ("trailing"), as tiny.
* ``tests/fixtures/tiny-xl/``: ``reference.safetensors`` (float32 tensors, u8 pixels) and
  ``reference.json`` (manifest): tokenizer ids of both tokenizers, both text encoders' states and
  ``StableDiffusionXLPipeline.encode_prompt``'s outputs, ``add_time_ids``, one UNet call with the
  ``text_time`` embedding's intermediates, and two txt2img generations with every random draw captured.

Every generation case is computed by a hand-written loop mirroring ``StableDiffusionXLPipeline``
(what the fixtures record) and again by the real pipeline loaded from ``models/tiny-xl`` with the
same captured noise (once through the patched ``randn_tensor``, once via ``latents=``); the script
asserts they agree exactly.

Everything is deterministic (fixed seeds, CPU, float32, one thread, deterministic algorithms):
running the script twice gives byte-identical files.

How to rerun (from the repository root), in the same environment as make_tiny_model.py:

    .venv-ref/bin/python scripts/make_tiny_xl_model.py

Written against torch 2.15, diffusers 0.42.1, transformers 5.24, tokenizers 0.23.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import platform
import shutil
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # importing make_tiny_model must not leave scripts/__pycache__ behind
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_model as mt  # noqa: E402  (sets the env / torch determinism settings on import)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import diffusers  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

ROOT = mt.ROOT
MODEL_DIR = ROOT / "models" / "tiny-xl"
FIX_DIR = ROOT / "tests" / "fixtures" / "tiny-xl"
TINY_TOKENIZER_DIR = ROOT / "models" / "tiny" / "tokenizer"

DEVICE, DTYPE = mt.DEVICE, mt.DTYPE
IMAGE_SIZE, LATENT_SIZE, MAX_LEN = mt.IMAGE_SIZE, mt.LATENT_SIZE, mt.MAX_LEN
BOS, EOS, BANG = mt.BOS, mt.EOS, mt.PAD  # mt.PAD is "!"

# Seeds (distinct from tiny's 1001..1003 so that a mix-up of the two models shows).
SEED_TEXT_ENCODER = 2001
SEED_TEXT_ENCODER_2 = 2002
SEED_UNET = 2003
SEED_VAE = 2004

# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------


def write_tokenizers(out: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tokenizer_2/ is exactly what make_tiny_model writes (pad "!"); tokenizer/ has the same
    vocab/merges but pads with <|endoftext|>, as SDXL's first (CLIP ViT-L) tokenizer does."""
    vocab, merges = mt.write_tokenizer(out / "tokenizer_2")
    for f in ("vocab.json", "merges.txt"):
        if (TINY_TOKENIZER_DIR / f).exists():
            assert (TINY_TOKENIZER_DIR / f).read_bytes() == (out / "tokenizer_2" / f).read_bytes(), f
    t1 = out / "tokenizer"
    t1.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(out / "tokenizer_2" / f, t1 / f)
    cfg = json.loads((out / "tokenizer_2" / "tokenizer_config.json").read_text())
    cfg["pad_token"] = dict(cfg["eos_token"])  # same AddedToken as eos (as SDXL's tokenizer/)
    special = json.loads((out / "tokenizer_2" / "special_tokens_map.json").read_text())
    special["pad_token"] = dict(special["eos_token"])
    (t1 / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (t1 / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    return vocab, merges


def text_config(vocab: dict[str, int], hidden_act: str, arch: str, pad: str) -> CLIPTextConfig:
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[pad],
    )
    cfg.architectures = [arch]
    return cfg


def save_text_model(model, cfg: CLIPTextConfig, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    # transformers 5 names CLIPTextModel's tensors "embeddings.…"; the Hub checkpoints use "text_model.…".
    # CLIPTextModelWithProjection already gives "text_model.…" + "text_projection.weight".
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        name = k if (k.startswith("text_model.") or k.startswith("text_projection.")) else "text_model." + k
        sd[name] = v.detach().to(DTYPE).contiguous().clone()
    save_file(dict(sorted(sd.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    return sorted(sd)


def write_text_encoders(vocab):
    cfg1 = text_config(vocab, "quick_gelu", "CLIPTextModel", EOS)
    torch.manual_seed(SEED_TEXT_ENCODER)
    te1 = CLIPTextModel(cfg1).eval()
    keys1 = save_text_model(te1, cfg1, MODEL_DIR / "text_encoder")
    cfg2 = text_config(vocab, "gelu", "CLIPTextModelWithProjection", BANG)
    torch.manual_seed(SEED_TEXT_ENCODER_2)
    te2 = CLIPTextModelWithProjection(cfg2).eval()
    keys2 = save_text_model(te2, cfg2, MODEL_DIR / "text_encoder_2")
    assert all(k.startswith("text_model.") for k in keys1), keys1
    assert "text_projection.weight" in keys2 and all(
        k.startswith("text_model.") or k == "text_projection.weight" for k in keys2), keys2
    assert [k for k in keys2 if k != "text_projection.weight"] == keys1
    return te1, te2


UNET_KWARGS = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,
    use_linear_projection=True,
    norm_num_groups=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)

VAE_KWARGS = dict(mt.VAE_KWARGS, scaling_factor=0.13025, force_upcast=True)


def write_unet(out: Path) -> UNet2DConditionModel:
    torch.manual_seed(SEED_UNET)
    unet = UNet2DConditionModel(**UNET_KWARGS).eval()
    unet.save_pretrained(out, safe_serialization=True)
    return unet


def write_vae(out: Path) -> AutoencoderKL:
    torch.manual_seed(SEED_VAE)
    vae = AutoencoderKL(**VAE_KWARGS).eval()
    vae.save_pretrained(out, safe_serialization=True)
    return vae


def write_model_index(out: Path) -> None:
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Noise capture: make_tiny_model's tape, installed into the SDXL pipeline module
# ---------------------------------------------------------------------------------------------

XL_RANDN_MODULES = {
    "pipeline": ["diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"],
    "scheduler": ["diffusers.schedulers.scheduling_euler_ancestral_discrete"],
}


class XLNoiseTape(mt.NoiseTape):
    def install(self):
        for source, mods in XL_RANDN_MODULES.items():
            for name in mods:
                mod = importlib.import_module(name)
                assert getattr(mod, "randn_tensor") is self._orig, name
                self._saved[name] = mod.randn_tensor
                mod.randn_tensor = self._make(source)


TAPE = XLNoiseTape()


# ---------------------------------------------------------------------------------------------
# The SDXL loop, mirroring StableDiffusionXLPipeline
# ---------------------------------------------------------------------------------------------


class XLComponents:
    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae):
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.unet, self.vae = unet, vae


@torch.no_grad()
def encode_xl(c: XLComponents, prompts: list[str]) -> dict:
    """One prompt list through both encoders, as encode_prompt (clip_skip None, no attention mask)."""
    ids1 = mt.tokenize(c.tokenizer, prompts)
    ids2 = mt.tokenize(c.tokenizer_2, prompts)
    o1 = c.text_encoder(ids1, output_hidden_states=True)
    o2 = c.text_encoder_2(ids2, output_hidden_states=True)
    return {
        "ids1": ids1, "ids2": ids2,
        "h1": o1.hidden_states[-2], "h2": o2.hidden_states[-2],
        "pooled": o2.text_embeds,  # [B, projection_dim]
        "embeds": torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1),
        "o1": o1, "o2": o2,
    }


def add_time_ids(h: int, w: int, crop=(0, 0)) -> torch.Tensor:
    # original_size + crops_coords_top_left + target_size, float32 (= prompt_embeds.dtype), [1, 6]
    return torch.tensor([list((h, w) + tuple(crop) + (h, w))], dtype=DTYPE)


@torch.no_grad()
def run_manual_xl(c: XLComponents, case: dict, scheduler) -> dict:
    prompts, guidance = case["prompts"], case["guidance_scale"]
    B = len(prompts)
    cfg = guidance > 1.0 and c.unet.config.time_cond_proj_dim is None
    enc = encode_xl(c, prompts)
    embeds, pooled = enc["embeds"], enc["pooled"]
    case["prompt_input_ids"] = enc["ids1"].tolist()
    case["prompt_input_ids_2"] = enc["ids2"].tolist()
    tids = add_time_ids(case["height"], case["width"])
    if cfg:
        assert case.get("negative_prompts") is None, "cases here use negative_prompt=None (zeros)"
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
        pooled = torch.cat([torch.zeros_like(pooled), pooled])
        tids = torch.cat([tids, tids])
    tids = tids.repeat(B, 1)
    out = {"prompt_embeds": embeds.clone(), "add_text_embeds": pooled.clone(), "add_time_ids": tids.clone()}
    scheduler.set_timesteps(case["num_inference_steps"], device=DEVICE)
    sf = c.vae.config.scaling_factor
    timesteps = scheduler.timesteps
    init_noise = TAPE.draw("pipeline", (B, 4, case["height"] // 8, case["width"] // 8))
    out["init_noise"] = init_noise.clone()
    latents = init_noise * scheduler.init_noise_sigma
    case["cfg"] = cfg
    case["timesteps"] = [t.item() for t in timesteps]
    case["timestep_dtype"] = str(timesteps.dtype).replace("torch.", "")
    case["init_noise_sigma"] = float(scheduler.init_noise_sigma)
    case["sigmas_dtype"] = str(scheduler.sigmas.dtype).replace("torch.", "")
    case["sigmas"] = [float(s) for s in scheduler.sigmas]
    scheduler.set_begin_index(0)  # as the SDXL pipeline does
    step_noise, step_latents, noise_preds, per_step = [], [], [], []
    added = {"text_embeds": pooled, "time_ids": tids}
    for i, t in enumerate(timesteps):
        per_step.append(mt.step_info(scheduler, case, i, t))
        inp = torch.cat([latents] * 2) if cfg else latents
        inp = scheduler.scale_model_input(inp, t)
        assert scheduler.step_index == i
        noise_pred = c.unet(inp, t, encoder_hidden_states=embeds, timestep_cond=None,
                            added_cond_kwargs=added, return_dict=False)[0]
        if cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (text - uncond)
        noise_preds.append(noise_pred.clone())
        n_before = len(TAPE.log)
        latents = scheduler.step(noise_pred, t, latents, generator=torch.Generator("cpu").manual_seed(0),
                                 return_dict=False)[0]
        new = TAPE.log[n_before:]
        assert len(new) == 1 and new[0][0] == "scheduler"
        step_noise.append(new[0][1].clone())
        step_latents.append(latents.clone())
    case["per_step"] = per_step
    out["step_noise"] = torch.stack(step_noise)
    out["noise_pred"] = torch.stack(noise_preds)
    out["step_latents"] = torch.stack(step_latents)
    out["final_latents"] = latents.clone()
    assert c.vae.config.latents_mean is None and c.vae.config.latents_std is None
    decoded = c.vae.decode(latents / sf, return_dict=False)[0]
    out["decoded"] = decoded.clone()
    img_f, pixels = mt.postprocess(decoded)
    out["image_float"] = img_f
    out["pixels"] = pixels
    return out


@torch.no_grad()
def run_pipeline_xl(pipe, case: dict, log, via_latents: bool, output_type: str):
    kw = dict(prompt=case["prompts"], negative_prompt=case.get("negative_prompts"),
              num_inference_steps=case["num_inference_steps"], guidance_scale=case["guidance_scale"],
              height=case["height"], width=case["width"], generator=torch.Generator("cpu").manual_seed(0),
              output_type=output_type, return_dict=True)
    if via_latents:
        assert log[0][0] == "pipeline"
        kw["latents"] = log[0][1].clone()
        log = log[1:]
    pipe.scheduler = mt.make_euler_a()
    TAPE.replay(log)
    r = pipe(**kw)
    TAPE.stop()
    return r.images


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

TOKENIZER_PROMPTS = [
    "a cheerful cat, sticker",
    "hello, world!",
    "wow!? great!! ok! <3",
    "!!!",
    "",
    "a red fox",
    " ".join(["a very long prompt that keeps going with many words to make sure it gets truncated"] * 8),
]


def sinusoid(x: np.ndarray, dim: int) -> np.ndarray:
    """diffusers get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0) re-derived in numpy:
    [cos(x*f_k) for k<dim/2] ++ [sin(x*f_k)], f_k = exp(-ln(10000)*k/(dim/2)). As in diffusers, the
    exponent, exp and product x*f_k are float32; sin/cos are then evaluated in float64."""
    half = dim // 2
    exponent = (np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float32)).astype(np.float32)
    arg = (x.astype(np.float32)[:, None] * freqs[None]).astype(np.float64)
    return np.concatenate([np.cos(arg), np.sin(arg)], axis=-1)


def main() -> None:
    for d in (MODEL_DIR, FIX_DIR):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    # ---- model files ----------------------------------------------------------------------
    vocab, merges = write_tokenizers(MODEL_DIR)
    te1_mem, te2_mem = write_text_encoders(vocab)
    unet_mem = write_unet(MODEL_DIR / "unet")
    vae_mem = write_vae(MODEL_DIR / "vae")
    mt.make_euler_a().save_pretrained(MODEL_DIR / "scheduler")
    write_model_index(MODEL_DIR)

    # ---- load back from disk ---------------------------------------------------------------
    tok1 = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer_2")
    assert tok1.pad_token == EOS and tok1.pad_token_id == vocab[EOS]
    assert tok2.pad_token == BANG and tok2.pad_token_id == vocab[BANG]
    loaded = {}
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        m, info = cls.from_pretrained(MODEL_DIR / name, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (name, info)
        loaded[name] = m.eval()
    te1, te2 = loaded["text_encoder"], loaded["text_encoder_2"]
    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet").eval()
    vae = AutoencoderKL.from_pretrained(MODEL_DIR / "vae").eval()
    for mem, disk in ((te1_mem, te1), (te2_mem, te2), (unet_mem, unet), (vae_mem, vae)):
        a, b = mem.state_dict(), disk.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), type(mem).__name__
    assert te1.config.hidden_act == "quick_gelu" and te2.config.hidden_act == "gelu"
    c = XLComponents(tok1, tok2, te1, te2, unet, vae)
    te_keys = {n: list(load_file(str(MODEL_DIR / n / "model.safetensors")).keys())
               for n in ("text_encoder", "text_encoder_2")}

    tensors: dict[str, np.ndarray] = {}
    cases: dict[str, dict] = {}

    def put(name: str, x):
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32)
        mt.check_finite(name, arr)
        tensors[name] = np.ascontiguousarray(arr)
        return name

    # ---- 0. schedule tables (same as tiny's) ---------------------------------------------
    s = mt.make_euler_a()
    put("schedule.betas", s.betas)
    put("schedule.alphas_cumprod", s.alphas_cumprod)
    put("schedule.train_sigmas", ((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5)

    # ---- 1. tokenizers --------------------------------------------------------------------
    ref = mt.OpenAIClipReferenceTokenizer(vocab, merges)

    def ref_ids(text: str, pad: str) -> list[int]:
        ids = [vocab[BOS]] + ref.encode(text)[: MAX_LEN - 2] + [vocab[EOS]]
        return ids + [vocab[pad]] * (MAX_LEN - len(ids))

    tok_rows, tok_disagreements = [], []
    for p in TOKENIZER_PROMPTS:
        ids1 = tok1(p, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        ids2 = tok2(p, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        assert len(ids1) == len(ids2) == MAX_LEN
        n1, n2 = ids1.index(vocab[EOS]) + 1, ids2.index(vocab[EOS]) + 1
        row = {"prompt": p, "ids": ids1, "ids_2": ids2,
               "tokens": tok1.convert_ids_to_tokens(ids1[:n1]), "tokens_2": tok2.convert_ids_to_tokens(ids2[:n2])}
        for which, ids, pad in (("tokenizer", ids1, EOS), ("tokenizer_2", ids2, BANG)):
            r = ref_ids(p, pad)
            if r != ids:
                tok_disagreements.append({"tokenizer": which, "prompt": p, "openai_reference_ids": r,
                                          "transformers_ids": ids})
        # everything after the first eos is the pad id
        assert all(i == vocab[EOS] for i in ids1[n1:]) and all(i == vocab[BANG] for i in ids2[n2:])
        tok_rows.append(row)
    # tokenizer/ (pad = eos) tokenises "!" by plain BPE; tokenizer_2/ (pad "!") cuts "!" out as a special token
    bang_row = tok_rows[1]
    assert bang_row["ids"] != bang_row["ids_2"], "expected the two tokenizers to differ on '!'"
    cases["tokenizer"] = tok_rows
    tokenizer_info = {
        "cases": "top-level key 'tokenizer': list of {prompt, ids (tokenizer/), ids_2 (tokenizer_2/), tokens, "
                 "tokens_2}; tokens = ids up to the first eos, as strings",
        "call": 'tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids',
        "tokenizer_class": f"{type(tok1).__module__}.{type(tok1).__name__}",
        "pad": {"tokenizer": [EOS, vocab[EOS]], "tokenizer_2": [BANG, vocab[BANG]]},
        "reference": "a port of OpenAI CLIP's simple_tokenizer (no ftfy) over the same vocab.json/merges.txt, padded "
                     "with each tokenizer's pad id",
        "disagreements_with_reference": tok_disagreements,
        "special_ids": {BOS: vocab[BOS], EOS: vocab[EOS], BANG: vocab[BANG], "!</w>": vocab["!</w>"]},
        "vocab_size": len(vocab),
        "num_merges": len(merges),
        "same_files_as": "models/tiny/tokenizer/vocab.json and merges.txt (byte-identical)",
    }

    # ---- 2. text encoders and encode_prompt ---------------------------------------------------
    text_prompts = ["a cheerful cat, sticker", "a red fox"]
    enc = encode_xl(c, text_prompts)
    o1, o2 = enc["o1"], enc["o2"]
    # hidden_states = (embeddings, layer0, layer1, layer2): check against forward hooks on the layers
    for name, model, o, ids in (("te1", te1, o1, enc["ids1"]), ("te2", te2.text_model, o2, enc["ids2"])):
        assert len(o.hidden_states) == 4, (name, len(o.hidden_states))
        caught = []
        hooks = [layer.register_forward_hook(lambda m, a, r: caught.append(r[0] if isinstance(r, tuple) else r))
                 for layer in model.encoder.layers]
        with torch.no_grad():
            emb = model.embeddings(input_ids=ids)
            model(ids)
        for h in hooks:
            h.remove()
        assert torch.equal(o.hidden_states[0], emb), name
        assert len(caught) == 3 and all(torch.equal(o.hidden_states[i + 1], caught[i]) for i in range(3)), name
        with torch.no_grad():
            assert torch.equal(model.final_layer_norm(o.hidden_states[-1]), o.last_hidden_state), name
    eos2 = (enc["ids2"] == vocab[EOS]).int().argmax(-1)
    assert torch.equal(eos2, enc["ids2"].argmax(-1)), "eos is the largest id: argmax = first-eos position"
    with torch.no_grad():
        pooled_manual = te2.text_projection(o2.last_hidden_state[torch.arange(2), eos2])
    assert torch.equal(pooled_manual, o2.text_embeds)
    assert o2.text_embeds.shape == (2, 32)

    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL_DIR, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.watermark is None
    assert pipe.config.force_zeros_for_empty_prompt is True
    for name, mod in (("text_encoder", te1), ("text_encoder_2", te2), ("unet", unet), ("vae", vae)):
        a, b = getattr(pipe, name).state_dict(), mod.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert type(pipe.scheduler) is EulerAncestralDiscreteScheduler
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert pipe.tokenizer.pad_token == EOS and pipe.tokenizer_2.pad_token == BANG
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(prompt=text_prompts, device=DEVICE, num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, negative_prompt=None)
        pe_e, npe_e, pp_e, npp_e = pipe.encode_prompt(prompt=text_prompts, device=DEVICE, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt="")
    assert pe.shape == (2, MAX_LEN, 64) and pp.shape == (2, 32)
    assert torch.equal(pe, enc["embeds"]) and torch.equal(pp, enc["pooled"]), "encode_prompt != manual"
    assert torch.equal(pe[..., :32], o1.hidden_states[-2]) and torch.equal(pe[..., 32:], o2.hidden_states[-2])
    assert torch.count_nonzero(npe) == 0 and torch.count_nonzero(npp) == 0 and npe.shape == pe.shape
    enc_empty = encode_xl(c, ["", ""])
    assert torch.equal(pe_e, pe) and torch.equal(npe_e, enc_empty["embeds"]) and torch.equal(npp_e, enc_empty["pooled"])
    assert torch.count_nonzero(npe_e) > 0
    cases["text"] = {
        "prompts": text_prompts,
        "input_ids": enc["ids1"].tolist(),
        "input_ids_2": enc["ids2"].tolist(),
        "eos_positions_2": eos2.tolist(),
        "encode_prompt_call": "pipe.encode_prompt(prompt=prompts, num_images_per_prompt=1, "
                              "do_classifier_free_guidance=True, negative_prompt=None | \"\"), clip_skip=None",
        "tensors": {
            put("text.te1_penultimate", o1.hidden_states[-2]):
                "text_encoder hidden_states[-2]: output of encoder layer 1 of 0..2 (no final LN) [2,77,32]",
            put("text.te2_penultimate", o2.hidden_states[-2]):
                "text_encoder_2 hidden_states[-2]: output of encoder layer 1 of 0..2 (no final LN) [2,77,32]",
            put("text.te2_last", o2.last_hidden_state):
                "text_encoder_2 last_hidden_state = final_layer_norm(layer 2 output) [2,77,32] (not used by SDXL "
                "except through the pooled vector)",
            put("text.te2_pooled_unprojected", o2.last_hidden_state[torch.arange(2), eos2]):
                "text_encoder_2 last_hidden_state at the first eos position [2,32]",
            put("text.te2_text_embeds", o2.text_embeds):
                "text_encoder_2 text_embeds = text_projection(pooled) (Linear 32->32, no bias) [2,32] = "
                "pooled_prompt_embeds",
            put("text.prompt_embeds", pe):
                "encode_prompt prompt_embeds = cat([te1_penultimate, te2_penultimate], -1) [2,77,64]",
            put("text.pooled_prompt_embeds", pp): "encode_prompt pooled_prompt_embeds (= te2_text_embeds) [2,32]",
            put("text.negative_prompt_embeds_empty", npe_e):
                "encode_prompt negative_prompt_embeds for negative_prompt=\"\" (NOT zeros: \"\" is encoded by "
                "both encoders; both rows identical) [2,77,64]",
            put("text.negative_pooled_prompt_embeds_empty", npp_e):
                "encode_prompt negative_pooled_prompt_embeds for negative_prompt=\"\" [2,32]",
        },
        "negative_prompt_none": "negative_prompt_embeds and negative_pooled_prompt_embeds are exact zeros "
                                "(torch.zeros_like) of shapes [2,77,64] and [2,32] (force_zeros_for_empty_prompt=true)",
    }

    # ---- 3. add_time_ids ---------------------------------------------------------------------
    tids = pipe._get_add_time_ids((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE), dtype=pe.dtype,
                                  text_encoder_projection_dim=te2.config.projection_dim)
    assert torch.equal(tids, add_time_ids(IMAGE_SIZE, IMAGE_SIZE)) and tids.dtype == torch.float32
    cases["add_time_ids"] = {
        "original_size": [IMAGE_SIZE, IMAGE_SIZE], "crops_coords_top_left": [0, 0],
        "target_size": [IMAGE_SIZE, IMAGE_SIZE],
        "values": tids[0].tolist(),
        "tensors": {put("add_time_ids.time_ids", tids):
                    "[1,6] float32 = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]"},
    }

    # ---- 4. single UNet call with the text_time intermediates ---------------------------------
    g = torch.Generator("cpu").manual_seed(3003)
    sample = torch.randn((2, 4, LATENT_SIZE, LATENT_SIZE), generator=g)
    time_ids2 = tids.repeat(2, 1)
    added = {"text_embeds": pp, "time_ids": time_ids2}
    caught: dict[str, torch.Tensor] = {}

    def grab(out_key=None, in_key=None, in_index=0):
        def hook(module, args, result):  # returns None: the module's output is left unchanged
            if out_key is not None:
                caught[out_key] = result.detach().clone()
            if in_key is not None:
                caught[in_key] = args[in_index].detach().clone()
        return hook

    hooks = [
        unet.time_proj.register_forward_hook(grab("t_sin")),
        unet.time_embedding.register_forward_hook(grab("t_emb")),
        unet.add_time_proj.register_forward_hook(grab("time_ids_sin")),
        unet.add_embedding.register_forward_hook(grab("aug_emb", "add_embeds")),
        unet.down_blocks[0].resnets[0].register_forward_hook(grab(in_key="emb", in_index=1)),
    ]
    with torch.no_grad():
        u_out = unet(sample, torch.tensor(500), encoder_hidden_states=pe, added_cond_kwargs=added).sample
        u_out_f = unet(sample, torch.tensor(500.0), encoder_hidden_states=pe, added_cond_kwargs=added).sample
    for h in hooks:
        h.remove()
    assert torch.equal(u_out, u_out_f)
    assert 0.05 < u_out.std().item() < 20, u_out.std()
    assert caught["time_ids_sin"].shape == (12, 8) and caught["add_embeds"].shape == (2, 80)
    time_embeds = caught["time_ids_sin"].reshape(2, -1)
    assert torch.equal(caught["add_embeds"], torch.cat([pp, time_embeds], -1)), "add_embeds = cat([text_embeds, time])"
    assert torch.equal(caught["emb"], caught["t_emb"] + caught["aug_emb"])
    assert unet.time_embed_act is None and unet.config.class_embed_type is None
    # independent float64 check of both sinusoidal embeddings
    d_sin = np.abs(sinusoid(time_ids2.flatten().numpy(), 8).reshape(2, 48) - time_embeds.numpy()).max()
    d_tsin = np.abs(sinusoid(np.array([500.0, 500.0]), 32) - caught["t_sin"].numpy()).max()
    # numpy's and torch's float32 exp differ by 1 ulp for some k; times t=500 that is ~1e-5 in the argument
    assert d_sin < 1e-6 and d_tsin < 2e-5, (d_sin, d_tsin)
    cases["unet_single"] = {
        "timestep": 500,
        "note": "tensor(500) and tensor(500.0) give bit-identical outputs",
        "added_cond_kwargs": "{text_embeds: text.pooled_prompt_embeds [2,32], time_ids: add_time_ids repeated [2,6]}",
        "max_abs_diff_numpy_sinusoid": {"time_ids": float(f"{d_sin:.3g}"), "timestep": float(f"{d_tsin:.3g}")},
        "tensors": {
            put("unet_single.sample", sample): "input latents [2,4,8,8] (torch.randn, Generator seed 3003)",
            "text.prompt_embeds": "encoder_hidden_states [2,77,64] (shared with the text case)",
            "text.pooled_prompt_embeds": "added_cond_kwargs.text_embeds [2,32] (shared with the text case)",
            put("unet_single.time_ids", time_ids2): "added_cond_kwargs.time_ids [2,6]",
            put("unet_single.t_sinusoid", caught["t_sin"]): "time_proj(500) sinusoid [2,32] (cos half first)",
            put("unet_single.t_emb", caught["t_emb"]): "time_embedding(t_sinusoid): linear_1, SiLU, linear_2 [2,128]",
            put("unet_single.time_ids_sinusoid", time_embeds):
                "add_time_proj(time_ids.flatten()) [12,8] reshaped to [2,48] (per row: 6 ids x 8 channels, "
                "each id's [cos4, sin4])",
            put("unet_single.add_embeds", caught["add_embeds"]): "cat([text_embeds, time_ids_sinusoid], -1) [2,80]",
            put("unet_single.aug_emb", caught["aug_emb"]): "add_embedding(add_embeds): linear_1, SiLU, linear_2 [2,128]",
            put("unet_single.emb", caught["emb"]): "t_emb + aug_emb, the embedding the resnets get [2,128]",
            put("unet_single.out", u_out): "UNet output (predicted noise) [2,4,8,8]",
        },
    }

    # ---- 5. generation cases ---------------------------------------------------------------
    TAPE.install()
    c_pipe = XLComponents(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae)
    gen_cases = [
        dict(name="t2i_cfg", seed=6001, prompts=["a cheerful cat, sticker", "a red fox, head-to-toe shot, feet visible"],
             negative_prompts=None, guidance_scale=3.0, num_inference_steps=4),
        dict(name="t2i_nocfg", seed=6002, prompts=["a happy dog waving, sticker"], negative_prompts=None,
             guidance_scale=0.0, num_inference_steps=2),
    ]
    descr = {
        "prompt_embeds": "encoder_hidden_states fed to the UNet: cat([zeros, cond]) with CFG, else cond [(2)B,77,64]",
        "add_text_embeds": "added_cond_kwargs.text_embeds: cat([zeros, pooled]) with CFG, else pooled [(2)B,32]",
        "add_time_ids": "added_cond_kwargs.time_ids [(2)B,6], every row [64,64,0,0,64,64]",
        "init_noise": "unit-variance initial noise, BEFORE * init_noise_sigma [B,4,8,8]",
        "step_noise": "noise drawn inside scheduler.step, one per step (also the last) [S,B,4,8,8]",
        "noise_pred": "guided noise prediction fed to scheduler.step at each step [S,B,4,8,8]",
        "step_latents": "latents after each scheduler.step [S,B,4,8,8]",
        "final_latents": "latents after the loop, before / scaling_factor [B,4,8,8]",
        "decoded": "vae.decode(final_latents / 0.13025).sample, raw [B,3,64,64]",
        "pixels": "uint8 HWC: round(clamp(decoded/2+0.5,0,1)*255) [B,64,64,3]",
    }
    pipeline_checks = {}
    for spec in gen_cases:
        name = spec["name"]
        case = {k: v for k, v in spec.items() if k not in ("name", "seed")}
        case.update(kind="txt2img", height=IMAGE_SIZE, width=IMAGE_SIZE)
        sched = mt.make_euler_a()
        case["scheduler_class"] = type(sched).__name__
        case["scheduler_config"] = mt.sched_config(sched)
        case["noise_seed"] = spec["seed"]
        TAPE.record(spec["seed"])
        out = run_manual_xl(c, case, sched)
        log = list(TAPE.log)
        TAPE.stop()
        case["random_draws_in_order"] = [f"{s}:{list(t.shape)}" for s, t in log]

        checks = {}
        for via_latents in (False, True):
            img_np = run_pipeline_xl(pipe, case, log, via_latents, "np")
            lat = run_pipeline_xl(pipe, case, log, via_latents, "latent")
            d_lat = (lat - out["final_latents"]).abs().max().item()
            d_img = float(np.abs(img_np - out["image_float"]).max())
            pix = (img_np * 255).round().astype(np.uint8)
            d_pix = int(np.abs(pix.astype(np.int32) - out["pixels"].astype(np.int32)).max())
            assert d_lat == 0 and d_img == 0 and d_pix == 0, (name, via_latents, d_lat, d_img, d_pix)
            key = "latents_kwarg" if via_latents else "patched_randn"
            checks[key] = {"max_abs_diff_final_latents": d_lat, "max_abs_diff_image_float": d_img,
                           "max_abs_diff_pixels": d_pix}
        TAPE.replay(log)
        out_b = run_manual_xl(c_pipe, dict(case), mt.make_euler_a())
        TAPE.stop()
        assert torch.equal(out_b["final_latents"], out["final_latents"])

        assert 0.05 < out["noise_pred"].std().item() < 50
        np_out = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        rel = mt.independent_replay(case, np_out, tensors["schedule.alphas_cumprod"])
        assert rel < 1e-5, (name, rel)
        checks["independent_float64_replay_max_rel_err"] = float(f"{rel:.3g}")
        pipeline_checks[name] = checks
        case["tensors"] = {put(f"{name}.{k}", out[k]): d for k, d in descr.items() if k in out}
        case["num_unet_calls"] = len(case["timesteps"])
        cases[name] = case
        print(f"  {name:10s} timesteps={case['timesteps']} final {mt.stats(out['final_latents'])}")
    TAPE.mode = None

    # ---- write fixtures ----------------------------------------------------------------
    st = {k: torch.from_numpy(v.copy()) for k, v in sorted(tensors.items())}
    save_file(st, str(FIX_DIR / "reference.safetensors"), metadata={"format": "pt"})
    manifest = {
        "generated_by": "scripts/make_tiny_xl_model.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "pillow": Image.__version__,
        },
        "settings": {"device": "cpu", "dtype": "float32", "torch_threads": 1, "deterministic_algorithms": True},
        "model_dir": "models/tiny-xl",
        "seeds": {"text_encoder_init": SEED_TEXT_ENCODER, "text_encoder_2_init": SEED_TEXT_ENCODER_2,
                  "unet_init": SEED_UNET, "vae_init": SEED_VAE},
        "model_summary": {
            "text_encoder": "CLIPTextModel hidden 32, intermediate 64, 3 layers, 4 heads, quick_gelu, max pos 77, "
                            f"vocab {len(vocab)}, eos_token_id {vocab[EOS]}",
            "text_encoder_2": "CLIPTextModelWithProjection, same sizes, gelu, projection_dim 32 (text_projection "
                              "Linear 32->32 without bias)",
            "text_encoder_tensor_names": te_keys["text_encoder"],
            "text_encoder_2_tensor_names": te_keys["text_encoder_2"],
            "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in UNET_KWARGS.items()},
            "unet_derived": "time_embed_dim 128 (4*32); down block 0 DownBlock2D (no attention), down block 1 "
                            "CrossAttnDownBlock2D 4 heads x 16 dims, 2 transformer blocks; mid block 2 transformer "
                            "blocks, 4 heads; up block 0 CrossAttnUpBlock2D (2 resnets, 2 transformer blocks each), "
                            "up block 1 UpBlock2D; cross_attention_dim 64 = 32 + 32",
            "vae": {k: (list(v) if isinstance(v, tuple) else v) for k, v in VAE_KWARGS.items()},
        },
        "case_names": list(cases),
        "tensor_naming": "reference.safetensors holds '<case>.<name>' (float32, except '<case>.pixels' u8) "
                         "and 'schedule.*'; each case lists its tensors under 'tensors'.",
        "tokenizer_info": tokenizer_info,
        "schedule_tensors": {
            "schedule.betas": "betas [1000] f32: torch.linspace(sqrt(0.00085), sqrt(0.012), 1000, f32)**2",
            "schedule.alphas_cumprod": "torch.cumprod(1 - betas) in f32 [1000]",
            "schedule.train_sigmas": "((1-alphas_cumprod)/alphas_cumprod)**0.5 in f32 [1000], index = timestep",
        },
        "notes": NOTES,
        "pipeline_equivalence": pipeline_checks,
        **cases,
    }
    (FIX_DIR / "reference.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---- summary ---------------------------------------------------------------------------
    print("versions:", json.dumps(manifest["versions"]))
    print(f"tokenizer disagreements with the OpenAI reference: {len(tok_disagreements)}")
    print(f"prompt_embeds {mt.stats(pe)}; pooled {mt.stats(pp)}")
    print(f"unet_single.out {mt.stats(u_out)}")
    print("pipeline equivalence:", json.dumps(pipeline_checks))
    total = 0
    for d in (MODEL_DIR, FIX_DIR):
        for f in sorted(d.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                total += len(data)
                print(f"{len(data):>10}  {hashlib.sha256(data).hexdigest()[:16]}  {f.relative_to(ROOT)}")
    print(f"{total:>10}  total")


NOTES = {
    "encode_prompt": (
        "clip_skip=None: each encoder is called with input_ids only (no attention mask: causal mask only, pad tokens "
        "are ordinary tokens) and output_hidden_states=True. prompt_embeds = cat([te1.hidden_states[-2], "
        "te2.hidden_states[-2]], dim=-1): the output of the second-to-last encoder layer, BEFORE final_layer_norm "
        "(hidden_states = (embeddings, layer_0, ..., layer_{n-1}); [-2] = layer_{n-2} output). For the real SDXL: "
        "CLIP-L layer 11 of 12 (768) ++ bigG layer 31 of 32 (1280) = 2048. The same prompt goes to both tokenizers "
        "(prompt_2 defaults to prompt)."
    ),
    "pooled": (
        "pooled_prompt_embeds comes ONLY from text_encoder_2: text_embeds = text_projection(final_layer_norm(last "
        "layer)[b, eos_pos]) (Linear without bias). diffusers takes output[0] of each encoder when it is 2-D: "
        "encoder 1 (CLIPTextModel) gives last_hidden_state (3-D, skipped), encoder 2 (WithProjection) gives "
        "text_embeds. eos_pos: eos_token_id in the config here is the real eos id, so transformers uses the first "
        "position where input_ids == eos; real SDXL configs say eos_token_id=2, which makes transformers use "
        "argmax(input_ids) instead. Both give the same position here and in the real model (eos is the largest id)."
    ),
    "negative_zeros": (
        "force_zeros_for_empty_prompt=true and negative_prompt=None (and no negative embeds): negative_prompt_embeds "
        "= zeros_like(prompt_embeds) and negative_pooled_prompt_embeds = zeros_like(pooled); the encoders are not "
        "run for the negative. negative_prompt=\"\" (an empty STRING) is NOT None: then \"\" is tokenised and encoded "
        "by both encoders (see text.negative_prompt_embeds_empty). With CFG: encoder_hidden_states = cat([neg, pos]), "
        "text_embeds = cat([neg_pooled, pooled]), time_ids = cat([neg_time_ids, time_ids]).repeat(B, 1)."
    ),
    "cfg": (
        "do_classifier_free_guidance = guidance_scale > 1 (and unet.config.time_cond_proj_dim is None). UNet batch = "
        "cat([uncond(B), cond(B)]); noise = u + g*(c-u). guidance_rescale = 0 (not applied)."
    ),
    "add_time_ids": (
        "add_time_ids = torch.tensor([original_size + crops_coords_top_left + target_size], dtype=prompt_embeds.dtype) "
        "= [[h, w, 0, 0, h, w]] float32 with original_size = target_size = (height, width) by default. negative "
        "time ids = the same tensor unless negative_original_size/target_size are given. With CFG it is "
        "cat([neg, pos]) ([2,6]) and then .repeat(B, 1) -> [2B,6] (row order neg,pos,neg,pos,...; all rows equal "
        "here). Without CFG: .repeat(B, 1) -> [B,6]."
    ),
    "text_time_embedding": (
        "UNet (addition_embed_type='text_time'): t_emb = time_embedding(time_proj(t)) [b,128]; time_embeds = "
        "add_time_proj(time_ids.flatten()) -> [b*6, 8] (Timesteps(8, flip_sin_to_cos=True, freq_shift=0): per value "
        "[cos(v*f_k) k<4] ++ [sin(v*f_k)], f_k = exp(-ln(10000)*k/4)), reshaped to [b, 6*8] (id-major: ids 0..5, "
        "each 8 channels); add_embeds = cat([text_embeds, time_embeds], -1) [b, 32+48] (text FIRST); aug_emb = "
        "add_embedding(add_embeds) (TimestepEmbedding: linear_1, SiLU, linear_2); emb = t_emb + aug_emb (no "
        "time_embed_act, no class embedding), then used by every resnet. Real SDXL: addition_time_embed_dim 256, "
        "add_embeds = 1280 + 6*256 = 2816 (= projection_class_embeddings_input_dim), add_embedding 2816 -> 1280 -> "
        "1280, time_embed_dim 1280 (4*320)."
    ),
    "unet_timestep": (
        "The UNet gets the scheduler's timestep element as a 0-d float32 tensor (e.g. 999.0), broadcast to the batch; "
        "time_proj = Timesteps(32, flip_sin_to_cos=True, freq_shift=0). diffusers computes exponent = "
        "-ln(10000)*arange(half, f32)/half, freqs = exp(exponent), arg = t*freqs all in float32, so a 1-ulp "
        "difference in an f32 exp (numpy vs torch already differ for some k) moves sin/cos by ~t*6e-8 (~6e-6 at "
        "t=500, see unet_single.max_abs_diff_numpy_sinusoid); compare t_sinusoid with atol ~1e-4."
    ),
    "noise_order": (
        "All noise is unit normal float32 drawn on CPU, batch-shaped: init_noise [B,4,8,8] (prepare_latents), then one "
        "step_noise per scheduler.step (EulerAncestral draws even on the last step, where sigma_up = 0). "
        "latents = init_noise * init_noise_sigma (= sigmas.max() for trailing)."
    ),
    "euler_a_trailing": (
        "As tiny: trailing timesteps = round(arange(1000, 0, -1000/n)) - 1 (n=4 -> [999,749,499,249], n=2 -> "
        "[999,499]); scale_model_input divides by sqrt(sigma^2+1); EulerA step: x0 = x - sigma*eps; sigma_up = "
        "sqrt(s_to^2*(s_from^2-s_to^2)/s_from^2); sigma_down = sqrt(s_to^2-sigma_up^2); x = x + (x-x0)/sigma*"
        "(sigma_down-sigma) + noise*sigma_up. The SDXL pipeline calls scheduler.set_begin_index(0) before the loop."
    ),
    "decode": (
        "vae.config.latents_mean / latents_std are null here (as in the real SDXL VAE), so the pipeline decodes "
        "latents / scaling_factor = latents / 0.13025 (with both set it would use latents*std/sf + mean). "
        "force_upcast only matters for a float16 VAE (it is upcast to f32 for decode); everything is float32 here. "
        "No watermark (add_watermarker=False; invisible-watermark is not installed). pixels = round(clamp(decoded/2+"
        "0.5, 0, 1)*255) u8 HWC."
    ),
    "tokenizers": (
        "tokenizer/ pads with <|endoftext|> (its pad id is the eos id) and tokenises '!' by plain BPE ('!</w>'); "
        "tokenizer_2/ pads with '!' (id 0) and, because transformers registers the pad token as a special token, "
        "cuts every '!' out of the text BEFORE BPE, giving id 0 and splitting the text around it (see "
        "tokenizer_info.disagreements_with_reference, all on tokenizer_2). Both: [bos] + first 75 BPE ids + [eos] + "
        "pad to 77. tokenizer/ agrees with the OpenAI simple_tokenizer port on every prompt here."
    ),
    "latent_magnitudes": (
        "The UNet is random and does not denoise: final latents stay large; compare noise_pred / step_latents with a "
        "relative tolerance."
    ),
    "pipeline_equivalence": (
        "Each generation case was also run through diffusers' StableDiffusionXLPipeline loaded from models/tiny-xl "
        "(output_type 'np' and 'latent'), fed the recorded noise twice: via the patched randn_tensor, and with "
        "latents=init_noise plus patched scheduler noise; final latents, float image and u8 pixels were identical."
    ),
}


if __name__ == "__main__":
    main()
