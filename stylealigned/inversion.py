"""Real image -> reference latent trajectory: the sampler run backwards, or the cheaper forward-noising mode.

On eps / v models (UNets) that is DDIM inversion; on flow-matching transformers (FLUX.1/.2, SD3, Qwen-Image, Z-Image,
Wan) the flow ODE's Euler step run backwards, and the noise mode is the rectified-flow interpolation
(1 - sigma) z_0 + sigma eps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .apply import applied
from .backbones import Backbone, backbone_for
from .errors import UserError
from .io import write_atomic

MODES = ("ddim", "noise")
_METADATA_KEY = "stylealigned.trajectory"


@dataclass
class Trajectory:
    """Latents of one reference image at every sampling step: z_T first (index 0), z_0 last.

    `latents` is [steps + 1, ...] in the pipeline's latent layout ([C, h, w], or FLUX's packed [tokens, C]), fp32,
    on the CPU; `latents[i]` is the latent at `timesteps[i]` (integers on UNets, sigma x 1000 on flow models).
    """

    latents: torch.Tensor
    timesteps: list[float]
    prompt: str
    guidance_scale: float
    model: str
    width: int
    height: int
    mode: str

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write one .safetensors file: the latents, and every other field as JSON metadata."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(f"{path} already exists; choose another file name or allow overwriting it")
        metadata = {name: value for name, value in asdict(self).items() if name != "latents"}
        data = save({"latents": self.latents.contiguous()}, metadata={_METADATA_KEY: json.dumps(metadata)})
        write_atomic(path, lambda file: file.write(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trajectory:
        """Read a file written by `save`; a missing, corrupt or foreign file is a UserError."""
        if Path(path).is_dir():
            raise UserError(f"trajectory {path} is a folder; pass the .safetensors file that --save-trajectory wrote")
        if not Path(path).is_file():
            raise UserError(f"trajectory file {path} not found; check the path or invert the reference again")
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = json.loads((file.metadata() or {})[_METADATA_KEY])
                trajectory = cls(latents=file.get_tensor("latents"), **metadata)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
            raise UserError(
                f"{path} is not a readable stylealigned trajectory ({error}); invert the reference again"
            ) from error
        shape_ok = trajectory.latents.ndim in (3, 4, 5) and len(trajectory.latents) == len(trajectory.timesteps) + 1
        if not shape_ok or trajectory.mode not in MODES:
            raise UserError(f"{path} holds an inconsistent trajectory; invert the reference again")
        return trajectory

    def check_compatible(self, pipe, num_inference_steps: int, width: int, height: int,
                         backbone: Backbone | None = None) -> None:
        """Raise a UserError naming the first mismatch between this trajectory and a generation request (on
        `backbone`, the pipeline's, with the request's settings read)."""
        model = model_id(pipe)
        if model != self.model:
            raise UserError(
                f"the trajectory was inverted with model '{self.model}' but the pipeline is '{model}'; "
                f"load '{self.model}' or invert the reference again with this model"
            )
        if (width, height) != (self.width, self.height):
            raise UserError(
                f"the trajectory is {self.width}x{self.height} but {width}x{height} images were requested; "
                f"generate at {self.width}x{self.height} or invert the reference again at {width}x{height}"
            )
        if num_inference_steps != len(self.timesteps):
            raise UserError(
                f"the trajectory has {len(self.timesteps)} steps but {num_inference_steps} were requested; "
                f"use {len(self.timesteps)} steps or invert the reference again with {num_inference_steps}"
            )
        backbone = backbone or backbone_for(pipe)
        shape = backbone.packed_shape(height, width)
        if tuple(self.latents.shape[1:]) != shape and not backbone.still_reference(self.latents.shape[1:], height,
                                                                                     width):
            raise UserError(f"the trajectory's latents are {tuple(self.latents.shape[1:])} but a {width}x{height} "
                            f"latent of this model is {shape}; invert the reference again")
        expected = sampling_timesteps(pipe, num_inference_steps, width, height)
        if not all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(expected, self.timesteps)):
            raise UserError(
                f"the trajectory's timesteps differ from this pipeline scheduler's for {num_inference_steps} steps "
                "(another scheduler or timestep spacing); use the scheduler it was inverted with "
                "or invert the reference again"
            )


def model_id(pipe) -> str:
    """The hub id or path the pipeline was loaded from ("" when built in memory)."""
    return str(pipe.name_or_path or "")


def sampling_timesteps(pipe, num_inference_steps: int, width: int, height: int) -> list[float]:
    """The timesteps the pipeline samples at, descending, without touching the pipeline's scheduler."""
    return [_number(t) for t in backbone_for(pipe).scheduled(num_inference_steps, height, width).timesteps]


def _number(t) -> float:
    t = float(t)
    return int(t) if t.is_integer() else t


def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """z_0 of an RGB image in the pipeline's latent layout, batch of 1, fp32 on the execution device."""
    return backbone_for(pipe).encode(image)[0]


def forward_noise(z_0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_0) at a fixed noise sample: sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
    return alpha_bar.sqrt() * z_0 + (1 - alpha_bar).sqrt() * noise


def ddim_inversion_step(
    z: torch.Tensor, eps: torch.Tensor, alpha_bar_from: torch.Tensor, alpha_bar_to: torch.Tensor
) -> torch.Tensor:
    """The deterministic DDIM update run backwards: from a less noisy latent to a noisier one."""
    z_0 = (z - (1 - alpha_bar_from).sqrt() * eps) / alpha_bar_from.sqrt()
    return forward_noise(z_0, eps, alpha_bar_to)


def flow_inversion_step(z: torch.Tensor, velocity: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The flow sampler's Euler step run backwards: from sigma_from up to the noisier sigma_to."""
    return z + (sigma_to - sigma_from) * velocity


def as_eps(output: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise a UNet's output stands for: eps itself, or eps from a v prediction."""
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * z
    if prediction_type != "epsilon":
        raise UserError(f"cannot invert a model that predicts {prediction_type!r}; use an eps, v or flow model")
    return output


@torch.no_grad()
def invert(
    pipe,
    image: Image.Image,
    prompt: str,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    mode: str = "ddim",
    seed: int = 0,
    max_sequence_length: int | None = None,
) -> Trajectory:
    """Invert a real image (on a video model also a clip: a list of frames) into the reference trajectory that
    StyleAligned shares attention with.

    `mode="ddim"` runs the pipeline's sampler backwards with its denoiser and text encoders (DDIM on UNets, the
    Euler flow step on FLUX/SD3; classifier-free guidance when `guidance_scale > 1` on models that batch it,
    FLUX.1-dev's embedded guidance otherwise); `mode="noise"` forward-noises z_0 with one noise sample seeded by
    `seed`, with no denoiser calls. The trajectory holds the latents at the pipeline's timesteps for
    `num_inference_steps`. `max_sequence_length` (T5 families: FLUX, Chroma, SD3) must match the generation's.
    """
    backbone = backbone_for(pipe)
    if mode not in MODES:
        raise UserError(f"unknown inversion mode '{mode}'; choose one of: {', '.join(MODES)}")
    handle = applied(pipe)  # an applied StyleAligned must not touch the inversion
    with handle.suspended() if handle is not None else contextlib.nullcontext():
        return _invert(backbone, image, prompt, num_inference_steps, guidance_scale, mode, seed, max_sequence_length)


def _invert(backbone: Backbone, image, prompt, num_inference_steps, guidance_scale, mode, seed,
            max_sequence_length) -> Trajectory:
    z_0, height, width = backbone.encode(image)
    scheduler = backbone.scheduled(num_inference_steps, height, width)
    timesteps = [_number(t) for t in scheduler.timesteps]
    if mode == "noise":
        noise = torch.randn(z_0.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(z_0.device)
        if backbone.flow:
            noisy = [(1 - sigma) * z_0 + sigma * noise for sigma in scheduler.sigmas[:-1].tolist()]
        else:
            alphas_cumprod = scheduler.alphas_cumprod.to(z_0.device)
            noisy = [forward_noise(z_0, noise, alphas_cumprod[t]) for t in timesteps]
    else:
        conditioning = backbone.conditioning(prompt, guidance_scale, height, width, max_sequence_length)
        run = _flow_inversion if backbone.flow else _ddim_inversion
        noisy = run(backbone, scheduler, z_0, conditioning, guidance_scale)
    return Trajectory(
        latents=torch.cat(noisy + [z_0]).float().cpu(),
        timesteps=timesteps,
        prompt=prompt,
        guidance_scale=float(guidance_scale),
        model=model_id(backbone.pipe),
        width=width,
        height=height,
        mode=mode,
    )


def _ddim_inversion(backbone, scheduler, z_0, conditioning, guidance_scale) -> list[torch.Tensor]:
    """Latents at the scheduler's timesteps (descending), reached from z_0 by DDIM inversion; fp32 update.

    Each step predicts eps at the noisier target timestep from the current latent (the usual approximation
    eps(z_t, t) ~ eps(z_{t-1}, t)), so it mirrors the sampler's step from that timestep.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(z_0.device)
    alpha_bar_from = getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)).to(z_0.device)
    prediction_type = backbone.prediction_type()
    latents, noisy = z_0, []
    with backbone.pipe.progress_bar(total=len(scheduler.timesteps)) as progress:
        for t in reversed(scheduler.timesteps.tolist()):
            output = backbone.predict(latents, t, conditioning, guidance_scale)
            eps = as_eps(output, latents, alphas_cumprod[t], prediction_type)
            latents = ddim_inversion_step(latents, eps, alpha_bar_from, alphas_cumprod[t])
            alpha_bar_from = alphas_cumprod[t]
            noisy.append(latents)
            progress.update()
    return noisy[::-1]


def _flow_inversion(backbone, scheduler, z_0, conditioning, guidance_scale) -> list[torch.Tensor]:
    """Latents at the scheduler's timesteps (descending), reached from z_0 by the flow sampler run backwards.

    Each step evaluates the velocity at the noisier target timestep from the current latent, mirroring the
    sampler's Euler step from that timestep (as DDIM inversion does).
    """
    sigmas = scheduler.sigmas.tolist()  # one per timestep, then the final 0
    latents, noisy = z_0, []
    with backbone.pipe.progress_bar(total=len(scheduler.timesteps)) as progress:
        for i in reversed(range(len(scheduler.timesteps))):
            velocity = backbone.predict(latents, scheduler.timesteps[i], conditioning, guidance_scale)
            latents = flow_inversion_step(latents, velocity, sigmas[i + 1], sigmas[i])
            noisy.append(latents)
            progress.update()
    return noisy[::-1]
