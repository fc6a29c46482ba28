"""Real image -> reference latent trajectory: DDIM inversion, or the cheaper forward-noising mode."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import UserError
from .io import write_atomic

MODES = ("ddim", "noise")
SD_PIPELINES = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)
SDXL_PIPELINES = (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)
_METADATA_KEY = "stylealigned.trajectory"
_SDXL_IMG2IMG_AESTHETIC_SCORES = (6.0, 2.5)  # the img2img pipeline's defaults (positive, negative)


@dataclass
class Trajectory:
    """Latents of one reference image at every sampling step: z_T first (index 0), z_0 last.

    `latents` is [steps + 1, C, h, w], fp32, on the CPU; `latents[i]` is the latent at `timesteps[i]`.
    """

    latents: torch.Tensor
    timesteps: list[int]
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
        shape_ok = trajectory.latents.ndim == 4 and len(trajectory.latents) == len(trajectory.timesteps) + 1
        if not shape_ok or trajectory.mode not in MODES:
            raise UserError(f"{path} holds an inconsistent trajectory; invert the reference again")
        return trajectory

    def check_compatible(self, pipe, num_inference_steps: int, width: int, height: int) -> None:
        """Raise a UserError naming the first mismatch between this trajectory and a generation request."""
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
        if sampling_timesteps(pipe, num_inference_steps) != self.timesteps:
            raise UserError(
                f"the trajectory's timesteps differ from this pipeline scheduler's for {num_inference_steps} steps "
                "(another scheduler or timestep spacing); use the scheduler it was inverted with "
                "or invert the reference again"
            )


def model_id(pipe) -> str:
    """The hub id or path the pipeline was loaded from ("" when built in memory)."""
    return str(pipe.name_or_path or "")


def sampling_timesteps(pipe, num_inference_steps: int) -> list[int]:
    """The timesteps the pipeline's scheduler samples at, descending, without touching the pipeline's scheduler."""
    if num_inference_steps < 1:
        raise UserError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    if not hasattr(scheduler, "alphas_cumprod") or not torch.equal(timesteps, timesteps.round()):
        raise UserError(
            f"{type(scheduler).__name__} has no discrete noise schedule to invert; "
            "use a DDIM, PNDM, Euler or DPM-Solver scheduler without Karras sigmas"
        )
    return [int(t) for t in timesteps]


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """z_0 of an RGB image: the mean of the VAE's latent distribution, scaled as the pipeline decodes it.

    The VAE runs in fp32 (SDXL's VAE overflows in fp16) and is put back in its own dtype afterwards.
    Returns [1, C, h, w] fp32 on the pipeline's execution device.
    """
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image).to(pipe._execution_device, torch.float32)
    vae_dtype = vae.dtype
    if vae_dtype != torch.float32:
        vae.to(torch.float32)
    try:
        latents = vae.encode(pixels).latent_dist.mean
    finally:
        if vae_dtype != torch.float32:
            vae.to(vae_dtype)
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1)
        return (latents - mean) * config.scaling_factor / std
    return latents * config.scaling_factor


def forward_noise(z_0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_0) at a fixed noise sample: sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
    return alpha_bar.sqrt() * z_0 + (1 - alpha_bar).sqrt() * noise


def ddim_inversion_step(
    z: torch.Tensor, eps: torch.Tensor, alpha_bar_from: torch.Tensor, alpha_bar_to: torch.Tensor
) -> torch.Tensor:
    """The deterministic DDIM update run backwards: from a less noisy latent to a noisier one."""
    z_0 = (z - (1 - alpha_bar_from).sqrt() * eps) / alpha_bar_from.sqrt()
    return forward_noise(z_0, eps, alpha_bar_to)


@torch.no_grad()
def invert(
    pipe,
    image: Image.Image,
    prompt: str,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    mode: str = "ddim",
    seed: int = 0,
) -> Trajectory:
    """Invert a real image into the reference trajectory that StyleAligned shares attention with.

    `mode="ddim"` runs DDIM inversion with the pipeline's UNet and text encoders (classifier-free guidance when
    `guidance_scale > 1`); `mode="noise"` forward-noises z_0 with one noise sample seeded by `seed`, with no UNet
    calls. The trajectory holds the latents at the pipeline scheduler's timesteps for `num_inference_steps`.
    """
    if not isinstance(pipe, SD_PIPELINES + SDXL_PIPELINES):
        raise UserError(
            f"cannot invert with a {type(pipe).__name__}; use a Stable Diffusion 1.x/2.x or SDXL pipeline"
        )
    if mode not in MODES:
        raise UserError(f"unknown inversion mode '{mode}'; choose one of: {', '.join(MODES)}")
    handle = getattr(pipe, "_stylealigned_handle", None)  # an applied StyleAligned must not touch the inversion
    with handle.suspended() if handle is not None else contextlib.nullcontext():
        return _invert(pipe, image, prompt, num_inference_steps, guidance_scale, mode, seed)


def _invert(pipe, image, prompt, num_inference_steps, guidance_scale, mode, seed) -> Trajectory:
    timesteps = sampling_timesteps(pipe, num_inference_steps)
    z_0 = encode_image(pipe, image)
    height, width = (size * pipe.vae_scale_factor for size in z_0.shape[-2:])
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(z_0.device)
    if mode == "noise":
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(z_0.shape, generator=generator).to(z_0.device)
        noisy = [forward_noise(z_0, noise, alphas_cumprod[t]) for t in timesteps]
    else:
        conditioning = _text_conditioning(pipe, prompt, guidance_scale > 1, width, height)
        noisy = _ddim_inversion(pipe, z_0, conditioning, guidance_scale, timesteps, alphas_cumprod)
    return Trajectory(
        latents=torch.cat(noisy + [z_0]).float().cpu(),
        timesteps=timesteps,
        prompt=prompt,
        guidance_scale=float(guidance_scale),
        model=model_id(pipe),
        width=width,
        height=height,
        mode=mode,
    )


def _ddim_inversion(pipe, z_0, conditioning, guidance_scale, timesteps, alphas_cumprod) -> list[torch.Tensor]:
    """Latents at `timesteps` (descending), reached from z_0 by DDIM inversion; fp32 update, UNet in its dtype.

    Each step predicts eps at the noisier target timestep from the current latent (the usual approximation
    eps(z_t, t) ~ eps(z_{t-1}, t)), so it mirrors the sampler's step from that timestep.
    """
    guided = guidance_scale > 1
    embeddings, added_cond_kwargs = conditioning
    final_alpha_bar = getattr(pipe.scheduler, "final_alpha_cumprod", torch.tensor(1.0))
    alpha_bar_from = final_alpha_bar.to(z_0.device)
    latents, noisy = z_0, []
    with pipe.progress_bar(total=len(timesteps)) as progress:
        for t in reversed(timesteps):
            unet_input = torch.cat([latents] * 2 if guided else [latents]).to(pipe.unet.dtype)
            eps = pipe.unet(
                unet_input, t, encoder_hidden_states=embeddings, added_cond_kwargs=added_cond_kwargs, return_dict=False
            )[0].float()
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = ddim_inversion_step(latents, eps, alpha_bar_from, alphas_cumprod[t])
            alpha_bar_from = alphas_cumprod[t]
            noisy.append(latents)
            progress.update()
    return noisy[::-1]


def _text_conditioning(pipe, prompt, guided, width, height):
    """Text embeddings for the UNet (batch [uncond, cond] when guided) and SDXL's added conditioning."""
    device = pipe._execution_device
    if isinstance(pipe, SD_PIPELINES):
        cond, uncond = pipe.encode_prompt(prompt, device, 1, guided)
        return (torch.cat([uncond, cond]) if guided else cond), None
    cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
        prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided
    )
    time_ids_uncond, time_ids = _sdxl_time_ids(pipe, width, height, cond.dtype, pooled.shape[-1])
    if guided:
        cond, pooled, time_ids = (
            torch.cat([uncond, cond]),
            torch.cat([pooled_uncond, pooled]),
            torch.cat([time_ids_uncond, time_ids]),
        )
    return cond, {"text_embeds": pooled, "time_ids": time_ids.to(device)}


def _sdxl_time_ids(pipe, width, height, dtype, pooled_dim):
    """SDXL's (uncond, cond) added time ids for an uncropped image, as the pipeline's own `__call__` builds them."""
    size, crop = (height, width), (0, 0)
    projection_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled_dim
    if isinstance(pipe, StableDiffusionXLImg2ImgPipeline):
        time_ids, time_ids_uncond = pipe._get_add_time_ids(
            size, crop, size, *_SDXL_IMG2IMG_AESTHETIC_SCORES, size, crop, size, dtype, projection_dim
        )
        return time_ids_uncond, time_ids
    time_ids = pipe._get_add_time_ids(size, crop, size, dtype=dtype, text_encoder_projection_dim=projection_dim)
    return time_ids, time_ids
