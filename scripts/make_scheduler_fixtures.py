#!/usr/bin/env python3
"""Writes tests/fixtures/schedulers/*.json: what diffusers' schedulers make of a set of
scheduler_config.json files, for tests/schedulers.rs to hold the engine's schedulers to.

Each case is a config file (as a repo ships it, `_class_name` included) and the class that runs
on it. The config is loaded the way a diffusers pipeline loads it — `from_pretrained` with the
file's own class, then `from_config` into the running class when they differ, as swapping a
pipeline's scheduler does — and the fixture records the timesteps, the sigmas (Euler family) or
the cumulative alphas at the timesteps (DDIM), the initial noise scale, and one chain of
`scale_model_input` + `step` calls on small inputs that are written into the fixture (they come
from closed formulas, not from an RNG). The ancestral sampler's per-step noise is fed in the
same way, by replacing the draw inside diffusers' step with the fixture's noise.

Run with the diffusers version the engine mirrors (0.42.1):
    .venv-bench/bin/python scripts/make_scheduler_fixtures.py
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "schedulers"
EXPECTED_DIFFUSERS = "0.42.1"

SHAPE = [1, 2, 2, 2]
NUMEL = math.prod(SHAPE)

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# The scheduler configs the engine's presets meet on the Hub, verbatim (keys some other class
# takes included: diffusers carries them along, and so must the reader).
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD_TURBO_EULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def small_trained_betas(n: int) -> list[float]:
    # A made-up increasing schedule; short so the fixture stays small.
    return [0.001 + 0.3 * (i / (n - 1)) ** 2 for i in range(n)]


# (name, running class, config file content, steps, what it pins down)
CASES = [
    ("ddim_class_defaults", "DDIMScheduler",
     {"_class_name": "DDIMScheduler", **SD_BETAS}, 5,
     "DDIM config silent on clip_sample / set_alpha_to_one: the class defaults (both true)"),
    ("ddim_clip_range_trailing", "DDIMScheduler",
     {"_class_name": "DDIMScheduler", **SD_BETAS, "clip_sample": True, "clip_sample_range": 2.5,
      "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing"}, 4,
     "clip_sample_range; trailing spacing ignores steps_offset"),
    ("ddim_on_sd15_pndm", "DDIMScheduler", SD15_PNDM, 6,
     "SD 1.5's PNDM file run as DDIM: its set_alpha_to_one / clip_sample carry over"),
    ("ddim_v_zero_snr", "DDIMScheduler",
     {"_class_name": "DDIMScheduler", **SD_BETAS, "prediction_type": "v_prediction",
      "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False,
      "set_alpha_to_one": False}, 4,
     "zero terminal SNR with v-prediction"),
    ("ddim_linspace_sample_linear_betas", "DDIMScheduler",
     {"_class_name": "DDIMScheduler", "prediction_type": "sample",
      "timestep_spacing": "linspace"}, 7,
     "class-default linear betas, sample prediction, linspace rounded to integers, clipping on"),
    ("ddim_cosine", "DDIMScheduler",
     {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "clip_sample": False},
     5, "squaredcos_cap_v2 betas"),
    ("ddim_trained_betas", "DDIMScheduler",
     {"_class_name": "DDIMScheduler", "num_train_timesteps": 50,
      "trained_betas": small_trained_betas(50), "set_alpha_to_one": False}, 5,
     "trained_betas replace the schedule"),
    ("euler_linspace_default", "EulerDiscreteScheduler",
     {"_class_name": "EulerDiscreteScheduler", **SD_BETAS}, 7,
     "Euler config silent on spacing: linspace, fractional f32 timesteps"),
    ("euler_karras_leading", "EulerDiscreteScheduler",
     {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "use_karras_sigmas": True,
      "timestep_spacing": "leading", "steps_offset": 1}, 6,
     "Karras sigmas and the timesteps mapped back from them"),
    ("euler_karras_bounds_trailing", "EulerDiscreteScheduler",
     {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "use_karras_sigmas": True,
      "sigma_min": 0.1, "sigma_max": 10.0, "timestep_spacing": "trailing"}, 5,
     "Karras sigmas between explicit sigma_min / sigma_max"),
    ("euler_exponential", "EulerDiscreteScheduler",
     {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "use_exponential_sigmas": True}, 5,
     "exponential sigmas"),
    ("euler_final_sigma_min_v", "EulerDiscreteScheduler",
     {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "final_sigmas_type": "sigma_min",
      "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 4,
     "final_sigmas_type sigma_min, v-prediction"),
    ("euler_continuous_v", "EulerDiscreteScheduler",
     {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "timestep_type": "continuous",
      "prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1}, 4,
     "continuous timesteps (0.25 ln sigma) for a v model"),
    ("euler_zero_snr_v", "EulerDiscreteScheduler",
     {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "rescale_betas_zero_snr": True,
      "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 4,
     "zero terminal SNR: the last alpha pinned to 2^-24"),
    ("euler_sample_prediction", "EulerDiscreteScheduler",
     {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "prediction_type": "sample",
      "timestep_spacing": "leading", "steps_offset": 1}, 3,
     "sample prediction"),
    ("euler_a_on_sd_turbo_euler", "EulerAncestralDiscreteScheduler", SD_TURBO_EULER, 4,
     "sd-turbo's Euler file run as Euler ancestral (the sd-turbo preset)"),
    ("euler_a_on_karras_euler_file", "EulerAncestralDiscreteScheduler",
     {**SD_TURBO_EULER, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 3,
     "Euler-only keys do not reach the ancestral sampler"),
    ("euler_a_zero_snr_v_linspace", "EulerAncestralDiscreteScheduler",
     {"_class_name": "EulerAncestralDiscreteScheduler", **SD_BETAS,
      "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 5,
     "ancestral with zero SNR, v-prediction, the class-default linspace spacing"),
    ("euler_a_linear_leading", "EulerAncestralDiscreteScheduler",
     {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "leading",
      "steps_offset": 1}, 3,
     "ancestral with the class-default linear betas, leading spacing"),
]

CLASSES = {
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
}


def formula(seed: float, scale: float) -> torch.Tensor:
    vals = [scale * math.sin(1.37 * k + seed) for k in range(NUMEL)]
    return torch.tensor(vals, dtype=torch.float32).reshape(SHAPE)


def flat(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.flatten().tolist()]


def load(run_name: str, config: dict):
    """The scheduler a pipeline ends up with: the file's class, then `from_config` if swapped."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "scheduler_config.json").write_text(json.dumps(config))
        file_cls = getattr(diffusers, config.get("_class_name", run_name))
        sched = file_cls.from_pretrained(d)
    run_cls = CLASSES[run_name]
    if type(sched) is not run_cls:
        sched = run_cls.from_config(sched.config)
    return sched


def make_case(name, run_name, config, steps, about):
    sched = load(run_name, config)
    sched.set_timesteps(steps)
    ddim = run_name == "DDIMScheduler"
    case = {
        "about": about,
        "run_class": run_name,
        "config": config,
        "steps": steps,
        "timesteps": [float(t) for t in sched.timesteps.tolist()],
        "init_noise_sigma": float(sched.init_noise_sigma),
    }
    if len(case["timesteps"]) != steps:
        raise SystemExit(f"{name}: diffusers gave {len(case['timesteps'])} timesteps for {steps}")
    if ddim:
        acp = sched.alphas_cumprod
        case["alphas_cumprod_at_timesteps"] = [float(acp[int(t)]) for t in sched.timesteps]
        case["final_alpha_cumprod"] = float(sched.final_alpha_cumprod)
    else:
        case["sigmas"] = [float(s) for s in sched.sigmas.tolist()]
        # Index the steps as the engine does (and img2img pipelines do): from a begin index.
        sched.set_begin_index(0)

    sample = formula(0.3, 1.5 * float(sched.init_noise_sigma))
    case["shape"] = SHAPE
    case["sample"] = flat(sample)
    model_outputs, noises, model_inputs, prev_samples = [], [], [], []
    for i, t in enumerate(sched.timesteps):
        out = formula(0.5 + 0.9 * i, 0.9)
        noise = formula(2.0 + 1.7 * i, 1.0)
        model_inputs.append(flat(sched.scale_model_input(sample, t)))
        if run_name == "EulerAncestralDiscreteScheduler":
            euler_a_module.randn_tensor = lambda *a, _n=noise, **k: _n.clone()
            noises.append(flat(noise))
        prev = sched.step(out, t, sample).prev_sample
        model_outputs.append(flat(out))
        prev_samples.append(flat(prev))
        # The next step starts from diffusers' own result, so each step is checked alone.
        sample = prev
    case["model_inputs"] = model_inputs
    case["model_outputs"] = model_outputs
    if noises:
        case["step_noise"] = noises
    case["prev_samples"] = prev_samples
    return case


def main() -> None:
    if diffusers.__version__ != EXPECTED_DIFFUSERS:
        sys.exit(f"diffusers {diffusers.__version__}, expected {EXPECTED_DIFFUSERS}")
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    for name, run_name, config, steps, about in CASES:
        case = make_case(name, run_name, config, steps, about)
        case = {"name": name, "generated_by": "scripts/make_scheduler_fixtures.py",
                "diffusers": diffusers.__version__, **case}
        # One top-level key a line, each value compact: small files that still diff well.
        lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in case.items()]
        (OUT / f"{name}.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
        print(f"{name}: {case['timesteps']}")


if __name__ == "__main__":
    main()
