#!/usr/bin/env python3
"""Make the tiny Stable Diffusion reference model and the diffusers fixtures for popcon-worker's tests.

What it makes (paths relative to the repository root):

* ``models/tiny/``: a randomly initialised, *architecturally real* Stable Diffusion 1.x/2.x-style
  model in the exact diffusers folder layout (``model_index.json``, ``tokenizer/``,
  ``text_encoder/``, ``unet/``, ``vae/``, ``scheduler/``), a few MB in all:
    - a genuine CLIP byte-level BPE tokenizer (``vocab.json`` + ``merges.txt``, no
      ``tokenizer.json``) whose merges are learned here by a small BPE training loop on a built-in
      corpus of prompt words;
    - a 3-layer, 32-wide ``CLIPTextModel`` saved under the tensor names the real SD checkpoints on
      the Hub use (``text_model.…``);
    - a 2-level ``UNet2DConditionModel`` (32/64 channels, linear-projection transformers) and a
      4-level ``AutoencoderKL`` (×8 latent scale), saved by diffusers' ``save_pretrained``;
    - an ``EulerAncestralDiscreteScheduler`` config ("trailing" spacing).
* ``tests/fixtures/tiny/``: ``init.png`` (a synthetic 64×64 image), ``reference.safetensors``
  (float32 tensors, u8 pixels) and ``reference.json`` (manifest): what transformers/diffusers
  compute with that model (tokenizer ids, text-encoder states, one UNet call, VAE encode/decode,
  and complete txt2img / img2img generations with every random draw captured so that the Rust
  engine, whose RNG differs, can replay them).

Why: the Rust engine (candle) is tested against these numbers without downloading a real
multi-GB checkpoint; the tiny model is small enough to live in the repository and run in seconds.
Every generation case is computed twice: by a hand-written loop that mirrors diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` step by step (that loop is what
the fixtures record), and by the real diffusers pipeline classes fed the same captured noise;
the script asserts that both agree.

Everything is deterministic (fixed seeds, CPU, float32, one thread, deterministic algorithms):
running the script twice gives byte-identical files.

How to rerun (from the repository root):

    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch diffusers transformers safetensors numpy \
        && .venv-ref/bin/python scripts/make_tiny_model.py

(``accelerate`` is optional; ``pillow`` and ``regex`` come with diffusers/transformers.)
Written against torch 2.15, diffusers 0.42.1, transformers 5.24, tokenizers 0.23; other versions
may initialise weights differently (the files would change) or change scheduler details (the
script's own consistency checks would then fail loudly).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import platform
import shutil
from collections import Counter
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # force CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import regex  # noqa: E402  (installed with transformers)
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import diffusers  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import torch_utils as diffusers_torch_utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "tiny"
FIX_DIR = ROOT / "tests" / "fixtures" / "tiny"

transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)
DEVICE = torch.device("cpu")
DTYPE = torch.float32

IMAGE_SIZE = 64  # generation cases: 64×64 images, 8×8 latents
LATENT_SIZE = IMAGE_SIZE // 8
MAX_LEN = 77

# Seeds (torch.manual_seed before constructing each module; torch.Generator for every random draw).
SEED_TEXT_ENCODER = 1001
SEED_UNET = 1002
SEED_VAE = 1003

# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP byte-level BPE, trained here
# ---------------------------------------------------------------------------------------------

N_MERGES = 800
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PAD = "!"

# The same pre-tokenisation pattern as OpenAI CLIP's simple_tokenizer and HF's CLIPTokenizer.
CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

CORPUS = """
head-to-toe shot of the subject, feet visible (not shoes)
head-to-toe shot of the subject, full body, feet visible, standing
full body shot of the subject, whole figure in frame, shoes visible
sticker, bold outline, plain white background
sticker, bold outline, plain white background, flat colors, simple shading
die-cut sticker of a cute character, thick white border, vector art
emoji style sticker, bold black outline, plain white background, centered
a cute cat sticker, happy face, bold outline
a cheerful cat, sticker
a red fox, head-to-toe shot of the subject, feet visible (not shoes)
a cute dog sitting, looking at the viewer, smiling
a little girl waving her hand, cartoon style, pastel colors
a young man running in the park, dynamic pose, side view
a woman dancing, arms raised, front view, full body
a boy jumping with joy, both feet off the ground
a cute bear holding a red heart, love, blush
a panda eating bamboo, sitting, relaxed
a rabbit with long ears, sleeping, eyes closed
portrait of an old man with a beard, thinking, hand on chin
close-up of a face, crying, tears, sad expression
angry face, frowning, red cheeks, clenched fists
surprised face, open mouth, wide eyes, raised eyebrows
laughing out loud, eyes closed, big smile
happy sad angry surprised laughing crying love thinking
happy, sad, angry, surprised, laughing, crying, love, thinking, sleepy, shy, cool
excited, scared, bored, confused, proud, tired, sick, calm, hungry, nervous, embarrassed
thumbs up, peace sign, waving, clapping, pointing, shrug, facepalm, hug, kiss, wink
good morning, good night, thank you, hello, bye, sorry, congratulations, yes, no, ok
high quality, best quality, masterpiece, detailed, sharp focus, soft lighting
low quality, worst quality, blurry, jpeg artifacts, watermark, text, signature
bad anatomy, extra fingers, missing limbs, deformed hands, cropped, out of frame
digital art, illustration, anime style, chibi, kawaii, 3d render, watercolor, oil painting
photo of a person standing on a street, city background, daylight, bokeh
a man and a woman walking together on the beach at sunset
the quick brown fox jumps over the lazy dog
there is a small house with a blue door and a green tree next to it
she is holding an umbrella in the rain, wearing a yellow coat and boots
he is sitting on a chair, reading a book, wearing glasses
children playing with a ball in the garden on a sunny day
one two three four five six seven eight nine ten
zero 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024
first second third last next new old big small long short tall
red orange yellow green blue purple pink brown black white gray grey gold silver
cat dog fox bird fish horse cow pig sheep lion tiger bear wolf mouse frog duck owl
hair eyes nose mouth ears hands arms legs feet shoes shirt dress hat jacket pants
left right up down front back side top bottom inside outside center middle
very much many more most some any all every each other another same different
is are was were be been being have has had do does did will would can could should
i you he she it we they me him her us them my your his its our their this that these those
and or but if then than so because when while where what who how why which with without
in on at by for from to of off into onto over under above below between through after before
make made take took give gave get got go went come came see saw look looked find found
know knew think thought want wanted like liked use used work worked call called try tried
feel felt become became leave left put keep kept let begin began seem seemed help helped
show showed hear heard play played run ran move moved live lived believe held bring brought
happen write wrote sit sat stand stood lose lost pay paid meet met include continue set
learn change lead understand watch follow stop create speak read allow add spend grow open
walk win offer remember consider appear buy wait serve die send expect build stay fall cut
reach kill remain suggest raise pass sell require report decide pull smile laugh cry sleep
time year people way day thing man woman child world life hand part place case week company
system program question work government number night point home water room mother area money
story fact month lot right study book eye job word business issue side kind head house service
friend father power hour game line end member law car city community name president team
minute idea kid body information back parent face others level office door health person art
war history party result change morning reason research girl guy moment air teacher force
education light color colour picture image style background outline border shadow shot view
character subject figure pose emotion expression feeling mood smile tear heart star flower
sun moon sky cloud rain snow wind fire tree grass leaf mountain river sea ocean beach forest
it's don't can't isn't won't we'll they're i'm you've i'd she's he's that's there's let's
it's a sticker, it's cute, it's happy, don't cry, i'm happy, you're cool, we're friends
hello world, hello friend, well done, well known, see you, nice to meet you, welcome
a happy cat, a sad cat, an angry cat, a surprised cat, a laughing cat, a crying cat
a happy dog, a sad dog, an angry dog, a surprised dog, a laughing dog, a crying dog
the cat is happy, the dog is sad, the fox is angry, the bear is surprised, the girl is laughing
the boy is crying, the woman is in love, the man is thinking, the subject is standing
full body, whole body, upper body, head and shoulders, from head to toe, both feet on the floor
white background, simple background, transparent background, no background, clean lines
cartoon, sticker, emoji, icon, logo, mascot, character design, sticker sheet, cute sticker
""".strip()


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP / GPT-2's reversible byte → printable-unicode-character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


BYTE_ENCODER = bytes_to_unicode()


def clip_basic_clean(text: str) -> str:
    # OpenAI's basic_clean is ftfy.fix_text + html.unescape twice + strip; ftfy is not used here.
    text = html.unescape(html.unescape(text))
    return text.strip()


def clip_whitespace_clean(text: str) -> str:
    return regex.sub(r"\s+", " ", text).strip()


def clip_pretokenize(text: str) -> list[str]:
    """Words as CLIP's BPE sees them: cleaned, lowercased, split by CLIP_PAT, bytes → unicode chars."""
    text = clip_whitespace_clean(clip_basic_clean(text)).lower()
    return ["".join(BYTE_ENCODER[b] for b in tok.encode("utf-8")) for tok in CLIP_PAT.findall(text)]


def train_bpe(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain greedy BPE: repeatedly merge the most frequent adjacent pair (ties: lexicographically
    smallest pair). Words end with a '</w>'-suffixed symbol, as in CLIP. A pair whose concatenation
    is already a token is never chosen, so every merge adds exactly one new vocabulary entry."""
    word_freq = Counter(clip_pretokenize(corpus))
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(word_freq)}
    known = set(BYTE_ENCODER.values()) | {c + "</w>" for c in BYTE_ENCODER.values()}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, syms in words.items():
            f = word_freq[w]
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += f
        candidates = [(-c, p) for p, c in pairs.items() if (p[0] + p[1]) not in known]
        if not candidates:
            break
        _, best = min(candidates)
        merged = best[0] + best[1]
        merges.append(best)
        known.add(merged)
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = tuple(out)
    if len(merges) < n_merges:
        raise RuntimeError(f"corpus too small: only {len(merges)} merges possible")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = list(BYTE_ENCODER.values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token"
    return vocab


class OpenAIClipReferenceTokenizer:
    """A direct port of OpenAI CLIP's simple_tokenizer.SimpleTokenizer (without ftfy), used as an
    independent check of transformers' tokenizers-backed CLIPTokenizer."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = vocab
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {BOS: BOS, EOS: EOS}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in clip_pretokenize(text):
            ids.extend(self.encoder[t] for t in self.bpe(tok).split(" "))
        return ids

    def __call__(self, text: str) -> list[int]:
        ids = [self.encoder[BOS]] + self.encode(text)[: MAX_LEN - 2] + [self.encoder[EOS]]
        return ids + [self.encoder[PAD]] * (MAX_LEN - len(ids))


def write_tokenizer(out: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = train_bpe(CORPUS, N_MERGES)
    vocab = build_vocab(merges)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )

    def added(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    # Same shape as stabilityai/stable-diffusion-2-1's tokenizer_config.json.
    tok_cfg = {
        "add_prefix_space": False,
        "bos_token": added(BOS),
        "do_lower_case": True,
        "eos_token": added(EOS),
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "pad_token": PAD,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added(EOS),
    }
    special = {
        "bos_token": {k: v for k, v in added(BOS).items() if k != "__type"},
        "eos_token": {k: v for k, v in added(EOS).items() if k != "__type"},
        "pad_token": PAD,
        "unk_token": {k: v for k, v in added(EOS).items() if k != "__type"},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    return vocab, merges


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def text_encoder_config(vocab: dict[str, int]) -> CLIPTextConfig:
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
    )
    cfg.architectures = ["CLIPTextModel"]
    return cfg


def write_text_encoder(out: Path, vocab: dict[str, int]) -> CLIPTextModel:
    cfg = text_encoder_config(vocab)
    torch.manual_seed(SEED_TEXT_ENCODER)
    model = CLIPTextModel(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    # transformers 5 would save "embeddings.…"; the SD checkpoints on the Hub use "text_model.…".
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        name = k if k.startswith("text_model.") else "text_model." + k
        sd[name] = v.detach().to(DTYPE).contiguous().clone()
    save_file(dict(sorted(sd.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    return model


UNET_KWARGS = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    use_linear_projection=True,
    norm_num_groups=32,
)

VAE_KWARGS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=128,
    scaling_factor=0.18215,
)

SCHED_BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


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


def make_euler_a() -> EulerAncestralDiscreteScheduler:
    return EulerAncestralDiscreteScheduler(**SCHED_BASE, timestep_spacing="trailing")


def make_euler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**SCHED_BASE, timestep_spacing="leading")


def make_ddim() -> DDIMScheduler:
    return DDIMScheduler(**SCHED_BASE, timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)


def write_model_index(out: Path) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Noise capture: every randn_tensor diffusers calls goes through a tape
# ---------------------------------------------------------------------------------------------

RANDN_MODULES = {
    "pipeline": [
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    ],
    "vae": ["diffusers.models.autoencoders.vae"],
    "scheduler": [
        "diffusers.schedulers.scheduling_euler_ancestral_discrete",
        "diffusers.schedulers.scheduling_euler_discrete",
        "diffusers.schedulers.scheduling_ddim",
    ],
}


class NoiseTape:
    """Replaces diffusers' randn_tensor in the modules above. In "record" mode it draws from its own
    seeded CPU torch.Generator (ignoring the caller's generator) and logs (source, tensor); in
    "replay" mode it hands back a previous recording in order, checking source and shape."""

    def __init__(self):
        self.mode = None
        self.gen = None
        self.log: list[tuple[str, torch.Tensor]] = []
        self.queue: list[tuple[str, torch.Tensor]] = []
        self._orig = diffusers_torch_utils.randn_tensor
        self._saved = {}

    def install(self):
        import importlib

        for source, mods in RANDN_MODULES.items():
            for name in mods:
                mod = importlib.import_module(name)
                assert getattr(mod, "randn_tensor") is self._orig, name
                self._saved[name] = mod.randn_tensor
                mod.randn_tensor = self._make(source)

    def _make(self, source: str):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            return self.draw(source, tuple(shape), dtype or DTYPE)

        return randn_tensor

    def draw(self, source: str, shape: tuple, dtype=DTYPE) -> torch.Tensor:
        if self.mode == "record":
            t = torch.randn(shape, generator=self.gen, dtype=dtype)
            self.log.append((source, t.clone()))
            return t
        if self.mode == "replay":
            assert self.queue, f"unexpected extra draw from {source} {shape}"
            src, t = self.queue.pop(0)
            assert src == source and tuple(t.shape) == shape, (src, source, t.shape, shape)
            self.log.append((source, t.clone()))
            return t.clone()
        raise RuntimeError(f"randn_tensor called outside a recorded case ({source}, {shape})")

    def record(self, seed: int):
        self.mode, self.gen, self.log = "record", torch.Generator("cpu").manual_seed(seed), []

    def replay(self, log):
        self.mode, self.log, self.queue = "replay", [], [(s, t.clone()) for s, t in log]

    def stop(self):
        left = len(self.queue) if self.mode == "replay" else 0
        self.mode, self.gen = None, None
        assert left == 0, f"{left} recorded draws were not used"


TAPE = NoiseTape()


# ---------------------------------------------------------------------------------------------
# The denoising loop, mirroring StableDiffusionPipeline / StableDiffusionImg2ImgPipeline
# ---------------------------------------------------------------------------------------------

class Components:
    def __init__(self, tokenizer, text_encoder, unet, vae):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(c: Components, prompts, negative, guidance):
    cond = c.text_encoder(tokenize(c.tokenizer, prompts), attention_mask=None)[0]
    if guidance > 1.0:
        negative = negative if negative is not None else [""] * len(prompts)
        uncond = c.text_encoder(tokenize(c.tokenizer, negative), attention_mask=None)[0]
        return torch.cat([uncond, cond]), True
    return cond, False


def preprocess_image(img: Image.Image) -> torch.Tensor:
    """As VaeImageProcessor.preprocess for a 64×64 RGB PIL image: [0,1] -> 2x-1, NCHW. Like diffusers,
    the result is a *non-contiguous* NCHW view of an NHWC array: the VAE encoder's convolutions then
    take another kernel path and round differently (~1e-5 relative) from a contiguous copy, so the
    layout is kept to make this loop bit-identical to the pipeline."""
    x = np.array(img.convert("RGB")).astype(np.float32) / 255.0  # HWC in [0,1]
    x = torch.from_numpy(x[None].transpose(0, 3, 1, 2))  # NCHW view, NHWC memory
    return 2.0 * x - 1.0


def postprocess(decoded: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = (decoded / 2 + 0.5).clamp(0, 1)
    x_np = x.cpu().permute(0, 2, 3, 1).float().numpy()  # NHWC float
    return x_np, (x_np * 255).round().astype(np.uint8)


def get_timesteps(scheduler, num_steps: int, strength: float):
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, t_start


def step_info(scheduler, case: dict, index: int, t: torch.Tensor) -> dict:
    """The scalars one scheduler step uses, computed the way diffusers does (0-d float32 tensors)."""
    info = {"t": t.item()}
    if hasattr(scheduler, "sigmas"):
        sig = scheduler.sigmas
        s_from, s_to = sig[index], sig[index + 1]
        info.update(step_index=index, sigma=float(s_from), sigma_next=float(s_to),
                    input_scale=float(1 / ((s_from**2 + 1) ** 0.5)))
        if isinstance(scheduler, EulerAncestralDiscreteScheduler):
            s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
            s_down = (s_to**2 - s_up**2) ** 0.5
            info.update(sigma_up=float(s_up), sigma_down=float(s_down))
    else:
        prev = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        acp = scheduler.alphas_cumprod
        info.update(prev_t=prev, alpha_cumprod_t=float(acp[int(t)]),
                    alpha_cumprod_prev=float(acp[prev] if prev >= 0 else scheduler.final_alpha_cumprod))
    return info


@torch.no_grad()
def run_manual(c: Components, case: dict, scheduler) -> dict:
    """The loop the fixtures record. Every random draw goes through TAPE (record mode)."""
    prompts, guidance = case["prompts"], case["guidance_scale"]
    B = len(prompts)
    embeds, cfg = encode_prompts(c, prompts, case.get("negative_prompts"), guidance)
    scheduler.set_timesteps(case["num_inference_steps"], device=DEVICE)
    sf = c.vae.config.scaling_factor
    out = {"prompt_embeds": embeds.clone()}
    case["prompt_input_ids"] = tokenize(c.tokenizer, prompts).tolist()
    if cfg:
        case["negative_input_ids"] = tokenize(c.tokenizer, case.get("negative_prompts") or [""] * B).tolist()
    t_start = 0
    latent_shape = (B, 4, case["height"] // 8, case["width"] // 8)
    if case["kind"] == "txt2img":
        timesteps = scheduler.timesteps
        init_noise = TAPE.draw("pipeline", latent_shape)
        out["init_noise"] = init_noise.clone()
        latents = init_noise * scheduler.init_noise_sigma
    else:
        timesteps, t_start = get_timesteps(scheduler, case["num_inference_steps"], case["strength"])
        case["t_start"] = t_start
        assert B == 1, "img2img cases use one prompt (diffusers would duplicate init_latents for B > 1)"
        image = preprocess_image(Image.open(FIX_DIR / "init.png"))
        n_before = len(TAPE.log)
        init_latents = c.vae.encode(image).latent_dist.sample(None)  # draws via the patched vae module
        assert len(TAPE.log) == n_before + 1 and TAPE.log[-1][0] == "vae"
        out["encode_noise"] = TAPE.log[-1][1].clone()
        init_latents = sf * init_latents
        out["init_latents"] = init_latents.clone()
        noise = TAPE.draw("pipeline", tuple(init_latents.shape))
        out["add_noise"] = noise.clone()
        latent_timestep = timesteps[:1].repeat(B)
        latents = scheduler.add_noise(init_latents, noise, latent_timestep)
        out["noisy_latents"] = latents.clone()
        case["begin_index"] = getattr(scheduler, "begin_index", None)
        if hasattr(scheduler, "sigmas"):
            case["add_noise_sigma"] = float(scheduler.sigmas[scheduler.begin_index])
        else:
            a = scheduler.alphas_cumprod[int(timesteps[0])]
            case["add_noise_alpha_cumprod"] = float(a)
    case["timesteps"] = [t.item() for t in timesteps]
    case["timestep_dtype"] = str(timesteps.dtype).replace("torch.", "")
    case["init_noise_sigma"] = float(scheduler.init_noise_sigma)
    if hasattr(scheduler, "sigmas"):
        case["sigmas_dtype"] = str(scheduler.sigmas.dtype).replace("torch.", "")
        case["sigmas"] = [float(s) for s in scheduler.sigmas]  # full schedule incl. the appended 0
    step_noise, step_latents, noise_preds, per_step = [], [], [], []
    for i, t in enumerate(timesteps):
        per_step.append(step_info(scheduler, case, t_start + i, t))
        inp = torch.cat([latents] * 2) if cfg else latents
        inp = scheduler.scale_model_input(inp, t)
        if hasattr(scheduler, "sigmas"):  # Euler types: step_index = begin_index (img2img) or 0, then +1 per step
            assert scheduler.step_index == t_start + i, (scheduler.step_index, t_start, i)
        noise_pred = c.unet(inp, t, encoder_hidden_states=embeds, timestep_cond=None, return_dict=False)[0]
        if cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (text - uncond)
        noise_preds.append(noise_pred.clone())
        n_before = len(TAPE.log)
        kwargs = {"generator": torch.Generator("cpu").manual_seed(0)}
        if isinstance(scheduler, DDIMScheduler):
            kwargs["eta"] = case["eta"]
        latents = scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[0]
        new = TAPE.log[n_before:]
        assert all(s == "scheduler" for s, _ in new) and len(new) <= 1
        if new:
            step_noise.append(new[0][1].clone())
        step_latents.append(latents.clone())
    case["per_step"] = per_step
    if step_noise:
        assert len(step_noise) == len(timesteps)
        out["step_noise"] = torch.stack(step_noise)
    out["noise_pred"] = torch.stack(noise_preds)
    out["step_latents"] = torch.stack(step_latents)
    out["final_latents"] = latents.clone()
    decoded = c.vae.decode(latents / sf, return_dict=False)[0]
    out["decoded"] = decoded.clone()
    img_f, pixels = postprocess(decoded)
    out["image_float"] = img_f
    out["pixels"] = pixels
    return out


@torch.no_grad()
def run_diffusers_pipeline(pipe_t2i, pipe_i2i, case: dict, scheduler, log) -> tuple[np.ndarray, torch.Tensor]:
    """The real diffusers pipeline on the same components, fed the recorded noise."""
    kw = dict(
        prompt=case["prompts"],
        negative_prompt=case.get("negative_prompts"),
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(0),
        return_dict=True,
    )
    if isinstance(scheduler, DDIMScheduler):
        kw["eta"] = case["eta"]
    results = []
    for output_type in ("np", "latent"):
        TAPE.replay(log)
        if case["kind"] == "txt2img":
            pipe_t2i.scheduler = scheduler
            r = pipe_t2i(height=case["height"], width=case["width"], output_type=output_type, **kw)
        else:
            pipe_i2i.scheduler = scheduler
            r = pipe_i2i(image=Image.open(FIX_DIR / "init.png"), strength=case["strength"], output_type=output_type, **kw)
        TAPE.stop()
        results.append(r.images)
    return results[0], results[1]


def independent_replay(case: dict, out: dict, alphas_cumprod: np.ndarray) -> float:
    """Re-derive the whole scheduler side of a case in float64 numpy from the formulas in NOTES only
    (timestep spacing, sigma table, init_noise_sigma, img2img start, add_noise, step updates), using the
    recorded noise and the recorded guided noise predictions. Returns the max relative error of the
    latents after each step vs diffusers; this checks that NOTES says all the Rust side needs."""
    cfg, n, T = case["scheduler_config"], case["num_inference_steps"], 1000
    if cfg["timestep_spacing"] == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        ts = (np.arange(n) * (T // n))[::-1] + cfg["steps_offset"]
    ts = ts.astype(np.int64)
    t_start = 0
    if case["kind"] == "img2img":
        t_start = n - min(int(n * case["strength"]), n)
    assert [int(t) for t in ts[t_start:]] == [int(t) for t in case["timesteps"]], (ts, case["timesteps"])
    acp = alphas_cumprod.astype(np.float32)
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    euler = case["scheduler_class"] != "DDIMScheduler"
    if euler:
        train_sigmas = np.sqrt((1 - acp) / acp).astype(np.float32)  # f32 table, as diffusers
        sig = np.concatenate([train_sigmas[ts], [0.0]]).astype(np.float32).astype(np.float64)
        assert np.array_equal(sig.astype(np.float32), np.array(case["sigmas"], dtype=np.float32))
    if case["kind"] == "txt2img":
        if euler:
            s_max = sig.max()
            init_sigma = s_max if cfg["timestep_spacing"] in ("trailing", "linspace") else np.sqrt(s_max**2 + 1)
        else:
            init_sigma = 1.0
        x = f(out["init_noise"]) * init_sigma
    else:
        x0, nz = f(out["init_latents"]), f(out["add_noise"])
        if euler:
            x = x0 + nz * sig[t_start]
        else:
            a = f(acp[ts[t_start]])
            x = np.sqrt(a) * x0 + np.sqrt(1 - a) * nz
    worst = 0.0
    for i in range(len(case["timesteps"])):
        eps = f(out["noise_pred"][i])
        k = t_start + i
        if euler:
            s, s_next = sig[k], sig[k + 1]
            pred_x0 = x - s * eps
            d = (x - pred_x0) / s
            if case["scheduler_class"] == "EulerAncestralDiscreteScheduler":
                s_up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
                s_down = np.sqrt(s_next**2 - s_up**2)
                x = x + d * (s_down - s) + f(out["step_noise"][i]) * s_up
            else:
                x = x + d * (s_next - s)
        else:
            t = int(ts[k])
            prev = t - T // n
            a_t = f(acp[t])
            a_prev = f(acp[prev]) if prev >= 0 else f(acp[0])
            pred_x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
            x = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev) * eps
        ref = f(out["step_latents"][i])
        worst = max(worst, float(np.abs(x - ref).max() / np.abs(ref).max()))
    return worst


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

TOKENIZER_PROMPTS = [
    "a cheerful cat, sticker",
    "A CHEERFUL CAT, STICKER",
    "hello, world! (really?) [yes] {no}; ok...",
    "it's a dog's life, isn't it? we'll see, they're here, I'd say you've won, I'm done",
    "1234 apples and 56.78 pears, 2024-01-31",
    "  multiple   spaces\tand\ttabs\nand\n\nnewlines  ",
    "head-to-toe, well-known, state-of-the-art",
    "café crème brûlée",
    "happy 😀 face ★ ✨ ♥",
    "",
    "a red fox, head-to-toe shot of the subject, feet visible (not shoes)",
    "sticker, bold outline, plain white background",
    "laughing crying love thinking surprised angry sad happy",
    "supercalifragilisticexpialidocious zyzzyva qwxj",
    "wow!? great!! ok! <3",
    " ".join(
        ["a very long prompt that keeps going with many words to make sure it gets truncated"] * 8
    ),  # 17 words × 8 = 136 words
]


def image_u8() -> np.ndarray:
    """Deterministic 64×64 RGB test image: near-white background with a faint gradient, an orange
    disc and a small blue square."""
    h = w = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), dtype=np.int32)
    img[..., 0] = 246 - xx // 16
    img[..., 1] = 244 - yy // 16
    img[..., 2] = 238
    disc = (xx - 28) ** 2 + (yy - 30) ** 2 <= 17**2
    img[disc] = (232, 118, 36)
    square = (xx >= 44) & (xx < 58) & (yy >= 42) & (yy < 56)
    img[square] = (40, 80, 200)
    return img.astype(np.uint8)


def sched_config(s) -> dict:
    # "_use_default_values" is diffusers bookkeeping built from a set (random order): dropped.
    cfg = dict(s.config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items()) if k != "_use_default_values"}


def stats(x) -> str:
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return f"mean={x.mean().item():+.4f} std={x.std().item():.4f} min={x.min().item():+.4f} max={x.max().item():+.4f}"


def check_finite(name, x):
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x
    assert torch.isfinite(x).all(), f"{name} has NaN/inf"


def main() -> None:
    for d in (MODEL_DIR, FIX_DIR):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    # ---- model files ----------------------------------------------------------------------
    vocab, merges = write_tokenizer(MODEL_DIR / "tokenizer")
    te_mem = write_text_encoder(MODEL_DIR / "text_encoder", vocab)
    unet_mem = write_unet(MODEL_DIR / "unet")
    vae_mem = write_vae(MODEL_DIR / "vae")
    make_euler_a().save_pretrained(MODEL_DIR / "scheduler")
    write_model_index(MODEL_DIR)
    Image.fromarray(image_u8(), "RGB").save(FIX_DIR / "init.png", format="PNG")

    # ---- load everything back from disk (this is what the fixtures are computed with) -------
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    assert "tokenizer.json" not in os.listdir(MODEL_DIR / "tokenizer")
    te, info = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    te = te.eval()
    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet").eval()
    vae = AutoencoderKL.from_pretrained(MODEL_DIR / "vae").eval()
    for mem, disk in ((te_mem, te), (unet_mem, unet), (vae_mem, vae)):
        a, b = mem.state_dict(), disk.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), type(mem).__name__
    te_keys = list(load_file(str(MODEL_DIR / "text_encoder" / "model.safetensors")).keys())
    assert all(k.startswith("text_model.") for k in te_keys)
    c = Components(tokenizer, te, unet, vae)

    tensors: dict[str, np.ndarray] = {}
    cases: dict[str, dict] = {}

    def put(name: str, x):
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32)
        check_finite(name, arr)
        tensors[name] = np.ascontiguousarray(arr)
        return name

    # ---- 0. schedule tables ---------------------------------------------------------------
    s = make_euler_a()
    put("schedule.betas", s.betas)
    put("schedule.alphas_cumprod", s.alphas_cumprod)
    put("schedule.train_sigmas", ((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5)

    # ---- 1. tokenizer ---------------------------------------------------------------------
    ref_tok = OpenAIClipReferenceTokenizer(vocab, merges)
    fast_cls = getattr(transformers, "CLIPTokenizerFast", None)
    fast_tok = fast_cls.from_pretrained(MODEL_DIR / "tokenizer") if fast_cls is not None else None
    tok_rows, tok_disagreements = [], []
    for p in TOKENIZER_PROMPTS:
        ids = tokenizer(p, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        assert len(ids) == MAX_LEN
        row = {"prompt": p, "ids": ids,
               "tokens": tokenizer.convert_ids_to_tokens(ids[: ids.index(vocab[EOS]) + 1])}
        ref_ids = ref_tok(p)
        if ref_ids != ids:
            tok_disagreements.append({"prompt": p, "openai_reference_ids": ref_ids, "transformers_ids": ids})
        if fast_tok is not None:
            fids = fast_tok(p, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
            if fids != ids:
                tok_disagreements.append({"prompt": p, "fast_ids": fids, "transformers_ids": ids})
        tok_rows.append(row)
    # the pose prompt must tokenize sensibly: common words are single tokens
    pose_tokens = tok_rows[10]["tokens"]
    assert tok_rows[10]["prompt"].startswith("a red fox")
    for w in ("head</w>", "shot</w>", "the</w>", "subject</w>", "feet</w>", "visible</w>", "shoes</w>"):
        assert w in pose_tokens, (w, pose_tokens)
    cases["tokenizer"] = tok_rows
    tokenizer_info = {
        "cases": "top-level key 'tokenizer': list of {prompt, ids, tokens}; tokens = ids up to eos, as strings",
        "call": 'tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids',
        "tokenizer_class": f"{type(tokenizer).__module__}.{type(tokenizer).__name__}",
        "fast_class": None if fast_tok is None else f"{type(fast_tok).__module__}.{type(fast_tok).__name__}",
        "reference": "a port of OpenAI CLIP's simple_tokenizer (no ftfy) over the same vocab.json/merges.txt",
        "disagreements_with_reference": tok_disagreements,
        "special_ids": {BOS: vocab[BOS], EOS: vocab[EOS], PAD: vocab[PAD]},
        "vocab_size": len(vocab),
        "num_merges": len(merges),
    }

    # ---- 2. text encoder ------------------------------------------------------------------
    te_prompts = ["a cheerful cat, sticker", ""]
    te_ids = tokenize(tokenizer, te_prompts)
    with torch.no_grad():
        o = te(te_ids, output_hidden_states=True)
        o_mem = te_mem(te_ids, output_hidden_states=True)
    assert torch.equal(o.last_hidden_state, o_mem.last_hidden_state)
    # hidden_states = (embeddings, layer0, layer1, layer2); last_hidden_state = final_layer_norm(layer2)
    assert len(o.hidden_states) == 4
    with torch.no_grad():
        assert torch.allclose(te.final_layer_norm(o.hidden_states[-1]), o.last_hidden_state, atol=1e-6)
    eos_pos = (te_ids == vocab[EOS]).int().argmax(-1)
    assert torch.equal(o.pooler_output, o.last_hidden_state[torch.arange(2), eos_pos])
    cases["text_encoder"] = {
        "prompts": te_prompts,
        "input_ids": te_ids.tolist(),
        "tensors": {
            put("text_encoder.text_last", o.last_hidden_state): "last_hidden_state (after final_layer_norm) [2,77,32]",
            put("text_encoder.text_penultimate", o.hidden_states[-2]): "hidden_states[-2]: output of encoder layer 1 of 0..2, no final LN [2,77,32]",
            put("text_encoder.text_pooled", o.pooler_output): "pooler_output: last_hidden_state at the first eos (= argmax id) position [2,32]",
        },
        "eos_positions": (te_ids == vocab[EOS]).int().argmax(-1).tolist(),
    }
    text_last = o.last_hidden_state

    # ---- 3. single UNet call ---------------------------------------------------------------
    g = torch.Generator("cpu").manual_seed(3003)
    sample = torch.randn((2, 4, LATENT_SIZE, LATENT_SIZE), generator=g)
    with torch.no_grad():
        u_out = unet(sample, torch.tensor(500), encoder_hidden_states=text_last).sample
        u_out_f = unet(sample, torch.tensor(500.0), encoder_hidden_states=text_last).sample
        u_out_i = unet(sample, 500, encoder_hidden_states=text_last).sample
    assert torch.equal(u_out, u_out_f) and torch.equal(u_out, u_out_i)
    assert 0.1 < u_out.std().item() < 10, u_out.std()
    cases["unet_single"] = {
        "timestep": 500,
        "note": "int 500, float 500.0 and tensor(500) give bit-identical outputs",
        "tensors": {
            put("unet_single.sample", sample): "input latents [2,4,8,8] (torch.randn, Generator seed 3003)",
            "text_encoder.text_last": "encoder_hidden_states [2,77,32] (shared with the text_encoder case)",
            put("unet_single.out", u_out): "UNet output (predicted noise) [2,4,8,8]",
        },
    }

    # ---- 4. VAE ---------------------------------------------------------------------------
    g = torch.Generator("cpu").manual_seed(4004)
    z = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=g)
    init_img = preprocess_image(Image.open(FIX_DIR / "init.png")).contiguous()
    with torch.no_grad():
        dec = vae.decode(z).sample
        dist = vae.encode(init_img).latent_dist
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8).preprocess(Image.open(FIX_DIR / "init.png"))
    mine = preprocess_image(Image.open(FIX_DIR / "init.png"))
    assert torch.equal(proc, mine) and proc.stride() == mine.stride(), "preprocessing differs from VaeImageProcessor"
    cases["vae"] = {
        "scaling_factor": vae.config.scaling_factor,
        "tensors": {
            put("vae.vae_decode_in", z): "latents fed to vae.decode as is (no scaling) [1,4,8,8], randn seed 4004",
            put("vae.vae_decode_out", dec): "vae.decode(z).sample, raw decoder output [1,3,64,64]",
            put("vae.vae_encode_in", init_img): "init.png as [0,1] -> x*2-1, NCHW [1,3,64,64] (encoded as a contiguous tensor)",
            put("vae.vae_encode_mean", dist.mean): "latent_dist.mean [1,4,8,8] (unscaled)",
            put("vae.vae_encode_std", dist.std): "latent_dist.std = exp(0.5*clamp(logvar,-30,20)) [1,4,8,8]",
        },
    }

    # ---- 5. generation cases ------------------------------------------------------------
    TAPE.install()
    pipe_t2i = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None, requires_safety_checker=False)
    pipe_t2i.set_progress_bar_config(disable=True)
    pipe_i2i = StableDiffusionImg2ImgPipeline(**pipe_t2i.components)
    pipe_i2i.set_progress_bar_config(disable=True)
    # the folder loads as a real pipeline; its components are bit-identical to the ones used above
    for name, mod in (("text_encoder", te), ("unet", unet), ("vae", vae)):
        a, b = getattr(pipe_t2i, name).state_dict(), mod.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert type(pipe_t2i.scheduler) is EulerAncestralDiscreteScheduler
    assert isinstance(pipe_t2i.tokenizer, CLIPTokenizer)
    c_pipe = Components(pipe_t2i.tokenizer, pipe_t2i.text_encoder, pipe_t2i.unet, pipe_t2i.vae)

    gen_cases = [
        dict(name="t2i_euler_a", kind="txt2img", make=make_euler_a, seed=5001,
             prompts=["a cheerful cat, sticker, bold outline, plain white background",
                      "a red fox, head-to-toe shot of the subject, feet visible (not shoes)"],
             negative_prompts=["", ""], guidance_scale=4.0, num_inference_steps=4),
        dict(name="t2i_euler", kind="txt2img", make=make_euler, seed=5002,
             prompts=["a happy dog waving, sticker"], negative_prompts=None,
             guidance_scale=1.0, num_inference_steps=5),
        dict(name="t2i_ddim", kind="txt2img", make=make_ddim, seed=5003,
             prompts=["a sad panda crying, emoji style"], negative_prompts=["blurry, low quality"],
             guidance_scale=3.0, num_inference_steps=5, eta=0.0),
        dict(name="i2i_euler_a", kind="img2img", make=make_euler_a, seed=5004,
             prompts=["an orange ball and a blue box, sticker"], negative_prompts=[""],
             guidance_scale=2.0, num_inference_steps=5, strength=0.6),
        dict(name="i2i_ddim", kind="img2img", make=make_ddim, seed=5005,
             prompts=["a surprised cat, laughing"], negative_prompts=None,
             guidance_scale=1.0, num_inference_steps=6, strength=0.5, eta=0.0),
    ]
    pipeline_checks = {}
    for spec in gen_cases:
        name = spec["name"]
        case = {k: v for k, v in spec.items() if k not in ("make", "name", "seed")}
        case.update(height=IMAGE_SIZE, width=IMAGE_SIZE)
        sched = spec["make"]()
        case["scheduler_class"] = type(sched).__name__
        case["scheduler_config"] = sched_config(sched)
        case["noise_seed"] = spec["seed"]
        TAPE.record(spec["seed"])
        out = run_manual(c, case, sched)
        log = list(TAPE.log)
        TAPE.stop()
        case["random_draws_in_order"] = [f"{s}:{list(t.shape)}" for s, t in log]

        # the real pipeline, same components loaded through StableDiffusionPipeline.from_pretrained
        img_np, lat = run_diffusers_pipeline(pipe_t2i, pipe_i2i, case, spec["make"](), log)
        d_lat = (lat - out["final_latents"]).abs().max().item()
        d_img = float(np.abs(img_np - out["image_float"]).max())
        pix_pipe = (img_np * 255).round().astype(np.uint8)
        d_pix = int(np.abs(pix_pipe.astype(np.int32) - out["pixels"].astype(np.int32)).max())
        assert d_lat <= 1e-5 and d_img <= 1e-5 and d_pix == 0, (name, d_lat, d_img, d_pix)
        # the manual loop on the pipeline's own component objects gives the same numbers too
        TAPE.replay(log)
        case_b = dict(case)
        out_b = run_manual(c_pipe, case_b, spec["make"]())
        TAPE.stop()
        assert torch.equal(out_b["final_latents"], out["final_latents"])
        pipeline_checks[name] = {"max_abs_diff_final_latents": d_lat, "max_abs_diff_image_float": d_img,
                                 "max_abs_diff_pixels": d_pix}

        assert 0.05 < out["noise_pred"].std().item() < 20
        rel = independent_replay(case, {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()},
                                 tensors["schedule.alphas_cumprod"])
        assert rel < 1e-5, (name, rel)
        pipeline_checks[name]["independent_float64_replay_max_rel_err"] = float(f"{rel:.3g}")
        names = {}
        descr = {
            "prompt_embeds": "text embeddings fed to the UNet: cat([uncond, cond]) with CFG, else cond [(2)B,77,32]",
            "init_noise": "unit-variance initial noise, BEFORE * init_noise_sigma [B,4,8,8]",
            "encode_noise": "unit noise used by latent_dist.sample: init = mean + std*noise [B,4,8,8]",
            "init_latents": "scaling_factor * latent_dist.sample() [B,4,8,8]",
            "add_noise": "unit noise passed to scheduler.add_noise [B,4,8,8]",
            "noisy_latents": "scheduler.add_noise(init_latents, add_noise, timesteps[:1]) = start latents [B,4,8,8]",
            "step_noise": "noise drawn inside scheduler.step, one per step (also the last) [S,B,4,8,8]",
            "noise_pred": "guided noise prediction fed to scheduler.step at each step [S,B,4,8,8]",
            "step_latents": "latents after each scheduler.step [S,B,4,8,8]",
            "final_latents": "latents after the loop, before / scaling_factor [B,4,8,8]",
            "decoded": "vae.decode(final_latents / scaling_factor).sample, raw [B,3,64,64]",
            "pixels": "uint8 HWC: round(clamp(decoded/2+0.5,0,1)*255) [B,64,64,3]",
        }
        for k, d in descr.items():
            if k in out:
                names[put(f"{name}.{k}", out[k])] = d
        case["tensors"] = names
        case["num_unet_calls"] = len(case["timesteps"])
        cases[name] = case
        print(f"  {name:12s} timesteps={case['timesteps']} final {stats(out['final_latents'])}")
    TAPE.mode = None

    # ---- write fixtures ----------------------------------------------------------------
    st = {k: torch.from_numpy(v.copy()) for k, v in sorted(tensors.items())}
    save_file(st, str(FIX_DIR / "reference.safetensors"), metadata={"format": "pt"})
    manifest = {
        "generated_by": "scripts/make_tiny_model.py",
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
        "model_dir": "models/tiny",
        "seeds": {"text_encoder_init": SEED_TEXT_ENCODER, "unet_init": SEED_UNET, "vae_init": SEED_VAE},
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
    print(f"tokenizer: vocab {len(vocab)}, merges {len(merges)}, bos={vocab[BOS]} eos={vocab[EOS]} pad={vocab[PAD]};"
          f" reference disagreements: {len(tok_disagreements)}")
    print(f"text_last {stats(text_last)}")
    print(f"unet_single.out {stats(u_out)}")
    print(f"vae decode {stats(dec)}; encode mean {stats(dist.mean)}; std {stats(dist.std)}")
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
    "noise_order": (
        "All noise is unit normal float32 drawn on CPU. diffusers draws batch-shaped tensors ([B,4,8,8]) at once; "
        "txt2img: init_noise, then one step_noise per scheduler.step (EulerAncestral only; Euler with s_churn=0 and "
        "DDIM with eta=0 draw nothing). img2img: encode_noise (latent_dist.sample), then add_noise, then step noise. "
        "EulerAncestral draws a step noise even on the last step, where sigma_up = 0 (it is multiplied by 0)."
    ),
    "cfg": "CFG only when guidance_scale > 1: UNet batch = cat([uncond(B), cond(B)]); noise = u + g*(c-u).",
    "unet_timestep": (
        "The UNet gets the scheduler's timestep element as a 0-d tensor: float32 for Euler/EulerAncestral "
        "(e.g. 999.0; always integral here), int64 for DDIM. The time projection casts to float32, so int vs "
        "float gives identical results. Sinusoidal embedding: flip_sin_to_cos=True, freq_shift=0."
    ),
    "euler_sigmas": (
        "sigma table = ((1-acp)/acp)**0.5 computed in torch float32 from f32 alphas_cumprod; np.interp at the "
        "(integral) timesteps in float64 (so an exact lookup), then cast to float32, and a final 0.0 appended. "
        "scheduler.sigmas is float32; step math happens on 0-d float32 tensors."
    ),
    "euler_a_trailing": (
        "trailing: timesteps = round(arange(1000, 0, -1000/n)) - 1, e.g. n=4 -> [999,749,499,249], n=5 -> "
        "[999,799,599,399,199]. init_noise_sigma = sigmas.max() for 'trailing'/'linspace' (NOT sqrt(max^2+1)), "
        "but sqrt(max^2+1) for 'leading' (EulerDiscrete case here). scale_model_input divides by sqrt(sigma^2+1). "
        "EulerA step: x0 = x - sigma*eps; sigma_up = sqrt(s_to^2*(s_from^2-s_to^2)/s_from^2); sigma_down = "
        "sqrt(s_to^2-sigma_up^2); x = x + (x-x0)/sigma*(sigma_down-sigma) + noise*sigma_up."
    ),
    "euler_leading": "leading: timesteps = arange(n)*(1000//n) reversed + steps_offset, e.g. n=5 -> [801,601,401,201,1].",
    "ddim": (
        "DDIM leading: timesteps int64 = arange(n)*(1000//n) reversed + 1. prev_t = t - 1000//n; "
        "alpha_prev = alphas_cumprod[prev_t] if prev_t >= 0 else alphas_cumprod[0] (set_alpha_to_one=False). "
        "x0 = (x - sqrt(1-a_t)*eps)/sqrt(a_t); x = sqrt(a_prev)*x0 + sqrt(1-a_prev)*eps (eta=0). "
        "init_noise_sigma = 1; scale_model_input is the identity. add_noise: sqrt(a_t)*x0 + sqrt(1-a_t)*noise with "
        "a_t = alphas_cumprod[timesteps[0]] (DDIM has no begin_index)."
    ),
    "img2img": (
        "init_timestep = min(int(n*strength), n) (Python float product truncated), t_start = n - init_timestep, "
        "timesteps = scheduler.timesteps[t_start:], scheduler.set_begin_index(t_start). Euler-type add_noise uses "
        "sigmas[begin_index]: latents = init + noise*sigma (no 1/sqrt(sigma^2+1) factor); step_index starts at "
        "begin_index. init_latents = scaling_factor * (mean + std*encode_noise), std = exp(0.5*clamp(logvar,-30,20))."
    ),
    "decode": "decoded = vae.decode(latents / scaling_factor); pixels = round(clamp(decoded/2+0.5, 0, 1)*255) as u8 HWC.",
    "tokenizer_bang": (
        "pad_token is '!' (SD 2.x style) and transformers registers it as a special/added token: a '!' anywhere in "
        "the text is cut out BEFORE pre-tokenisation and becomes id 0 ('!'), not 256 ('!</w>') as OpenAI's BPE "
        "would give, and the text on either side is tokenised separately ('!?' -> '!', '?</w>'). See "
        "tokenizer_info.disagreements_with_reference (transformers vs a port of OpenAI's simple_tokenizer)."
    ),
    "tokenizer_truncation": "ids = [bos] + first 75 BPE ids + [eos], then pad id 0 up to 77.",
    "vae_encode_layout": (
        "diffusers' VaeImageProcessor hands the VAE a non-contiguous NCHW view of an NHWC array; torch's conv "
        "then rounds differently from a contiguous input (~2e-5 relative on init_latents). The img2img cases "
        "mirror that exactly; the vae case encodes a contiguous copy. Compare with relative tolerance >= 1e-4."
    ),
    "latent_magnitudes": (
        "The UNet is random, so it does not denoise: txt2img final latents keep std ~5-17 (a trained model gives "
        "~1). Compare noise_pred / step_latents with a relative tolerance; decoded stays in about [-2, 2.5]."
    ),
    "pipeline_equivalence": (
        "Each generation case was also run through diffusers' StableDiffusionPipeline / "
        "StableDiffusionImg2ImgPipeline (loaded from models/tiny) with the recorded noise replayed in the same "
        "order; final latents, the float image and the u8 pixels were identical (max abs diff 0)."
    ),
}


if __name__ == "__main__":
    main()
