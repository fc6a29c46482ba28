"""Style-aligned panoramas: MultiDiffusion whose every window attends to one reference image of normal size.

A panorama wider than the model's images is denoised as overlapping windows of the model's size; at every step each
window's prediction is computed and the overlaps are averaged (Bar-Tal et al. 2023, MultiDiffusion, Eq. 5). The
reference, a normal image, runs through the denoiser once per step (RECORD: every shared layer stores its keys,
values and statistics); the windows then run `view_batch_size` at a time against it (REPLAY), so memory depends on
the window batch, not on the panorama's width. The paper's release runs the reference again with every window batch.
With `circular=True` the windows wrap around the right edge, for 360-degree panoramas. UNets only (SD 1.x/2.x, SDXL).

The reference starts from noise seeded `seed`, the panorama from noise seeded `seed + 1`, as positions 0 and 1 of a
set: a panorama of one window is the target of the set [reference, panorama prompt].
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from PIL import Image

from .apply import apply
from .backbones import Backbone, Conditioning, backbone_for
from .config import StyleAlignedConfig
from .errors import UserError
from .processors import RECORD, REPLAY

Outputs = Callable[[torch.Tensor | None, torch.Tensor, object], tuple[torch.Tensor | None, torch.Tensor]]


class Panorama(NamedTuple):
    image: Image.Image
    reference: Image.Image


@dataclass(frozen=True)
class Plan:
    """Where the windows of a panorama lie; sizes in pixels, `factor` pixels per latent cell.

    Windows are squares of `side` latent cells. Circular windows run past the right edge: they are cut from the
    latents with their first `side` columns appended (`extended`), and what lands past the edge is folded back.
    """

    height: int
    width: int
    window: int
    stride: int
    circular: bool
    factor: int

    @property
    def side(self) -> int:
        return self.window // self.factor

    @property
    def wraps(self) -> bool:
        return self.circular and self.width > self.window

    @cached_property
    def windows(self) -> list[tuple[int, int]]:
        """(top, left) of every window in latent cells, row by row."""
        rows, cols, stride = self.height // self.factor, self.width // self.factor, self.stride // self.factor
        lefts = range(0, cols, stride) if self.wraps else _starts(cols, self.side, stride)
        return [(top, left) for top in _starts(rows, self.side, stride) for left in lefts]

    @cached_property
    def count(self) -> torch.Tensor:
        """How many windows cover each latent cell, as (1, 1, rows, cols)."""
        count = torch.zeros(1, 1, self.height // self.factor, self.width // self.factor)
        count = self.extended(count)
        for top, left in self.windows:
            count[..., top:top + self.side, left:left + self.side] += 1
        return self.folded(count)

    def extended(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents with their first `side` columns appended when windows wrap."""
        return torch.cat([latents, latents[..., :self.side]], dim=-1) if self.wraps else latents

    def folded(self, extended: torch.Tensor) -> torch.Tensor:
        """Sums over the extended columns put back: what lies past the right edge added onto the left edge."""
        if not self.wraps:
            return extended
        cols = self.width // self.factor
        extended[..., :self.side] += extended[..., cols:]
        return extended[..., :cols]


def _starts(length: int, side: int, stride: int) -> list[int]:
    """Window starts every `stride` cells, the last one flush with the end."""
    starts = list(range(0, length - side + 1, stride))
    return starts if starts[-1] == length - side else starts + [length - side]


def plan_panorama(pipe, width: int | None = None, height: int | None = None, window: int | None = None,
                  stride: int | None = None, circular: bool = False) -> Plan:
    """Check the panorama's sizes against the pipeline: defaults are the model's side for the window (and the
    height), 4 windows for the width, window / 8 for the stride. Bad sizes are one-line UserErrors."""
    backbone = _panorama_backbone(pipe)
    window = window or backbone.native_size()[1]
    height, width = height or window, width or 4 * window
    stride = stride or max(8, window // 64 * 8)
    for name, value in (("width", width), ("height", height), ("window", window), ("stride", stride)):
        if value < 8 or value % 8:
            raise UserError(f"panorama {name} must be a positive multiple of 8 pixels, got {value}")
    if width < window or height < window:
        raise UserError(f"the panorama ({width}x{height}) is smaller than its {window}-pixel window; make it at "
                        "least that wide and high, or pass a smaller window")
    if stride > window:
        raise UserError(f"stride {stride} is larger than the {window}-pixel window, which would leave gaps; "
                        "pass a stride up to the window")
    return Plan(height, width, window, stride, circular, pipe.vae_scale_factor)


def _panorama_backbone(pipe) -> Backbone:
    backbone = backbone_for(pipe)
    if not backbone.supports_panorama:
        raise UserError(f"panoramas need a UNet pipeline (SD 1.x/2.x or SDXL), not {type(pipe).__name__}; "
                        "load a Stable Diffusion or SDXL model")
    return backbone


def repeated(conditioning: Conditioning, count: int) -> Conditioning:
    """The conditioning for `count` images of one prompt: each guidance group's row repeated `count` times."""

    def repeat(value):
        if isinstance(value, torch.Tensor):
            return value.repeat_interleave(count, dim=0)
        return {key: repeat(item) for key, item in value.items()} if isinstance(value, dict) else value

    return Conditioning(repeat(conditioning.inputs), conditioning.guided)


def batch_sizes(plan: Plan, view_batch_size: int) -> set[int]:
    """How many windows the panorama's window batches hold: full batches, and the rest."""
    return {min(view_batch_size, len(plan.windows)), len(plan.windows) % view_batch_size} - {0}


def averaged(predict: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, plan: Plan,
             view_batch_size: int, coverage: torch.Tensor) -> torch.Tensor:
    """MultiDiffusion's step: `predict` every window of `latents` (1, C, rows, cols), `view_batch_size` windows per
    call, and average the predictions where windows overlap (`coverage`: `plan.count` on the latents' device)."""
    side, windows, latents = plan.side, plan.windows, plan.extended(latents)
    total = torch.zeros(latents.shape, device=latents.device)
    for start in range(0, len(windows), view_batch_size):
        batch = windows[start:start + view_batch_size]
        crops = torch.cat([latents[..., top:top + side, left:left + side] for top, left in batch])
        for (top, left), out in zip(batch, predict(crops)):
            total[..., top:top + side, left:left + side] += out
    return plan.folded(total) / coverage


def shared_outputs(handle, conditioning: Conditioning, reference_conditioning: Conditioning, guidance_scale: float,
                   plan: Plan, view_batch_size: int) -> Outputs:
    """Per step: the reference once (RECORD), then the windows `view_batch_size` at a time against it (REPLAY)."""
    backbone, groups = handle.backbone, 2 if conditioning.guided else 1
    batches = {count: repeated(conditioning, count) for count in batch_sizes(plan, view_batch_size)}
    coverage = plan.count.to(backbone.pipe._execution_device)  # moved once, not every step

    def outputs(reference, latents, t):
        with handle.layout(RECORD, groups):
            reference_out = backbone.predict(reference, t, reference_conditioning, guidance_scale)
        with handle.layout(REPLAY, groups):
            out = averaged(lambda crops: backbone.predict(crops, t, batches[len(crops)], guidance_scale), latents,
                           plan, view_batch_size, coverage)
        return reference_out, out

    return outputs


def denoise(backbone: Backbone, plan: Plan, latents: torch.Tensor, reference: torch.Tensor | None, steps: int,
            outputs: Outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample the panorama latents and the reference (None: no reference) with the pipeline's scheduler, one copy
    each; `outputs(reference input, panorama input, t)` gives both predictions of a step."""
    pipe = backbone.pipe
    schedulers = [copy.deepcopy(pipe.scheduler) for _ in range(2)]
    for scheduler in schedulers:
        backbone.set_timesteps(scheduler, steps, plan.window, plan.window)
    extra = pipe.prepare_extra_step_kwargs(None, 0.0)
    latents = latents.float() * schedulers[0].init_noise_sigma
    reference = None if reference is None else reference.float() * schedulers[1].init_noise_sigma
    with pipe.progress_bar(total=steps) as progress:
        for t in schedulers[0].timesteps:
            reference_in = None if reference is None else schedulers[1].scale_model_input(reference, t)
            reference_out, out = outputs(reference_in, schedulers[0].scale_model_input(latents, t), t)
            latents = schedulers[0].step(out, t, latents, **extra, return_dict=False)[0]
            if reference is not None:
                reference = schedulers[1].step(reference_out, t, reference, **extra, return_dict=False)[0]
            progress.update()
    return latents, reference


def decode(backbone: Backbone, latents: torch.Tensor, plan: Plan) -> Image.Image:
    """The panorama's image; a circular one is decoded with its far edges wrapped on, so its seam matches too."""
    if not plan.circular:
        return backbone.decode(latents, plan.height, plan.width)[0]
    pad = min(8, plan.window // plan.factor)  # latent columns, as diffusers' panorama pipeline
    wrapped = torch.cat([latents[..., -pad:], latents, latents[..., :pad]], dim=-1)
    image = backbone.decode(wrapped, plan.height, plan.width + 2 * pad * plan.factor)[0]
    return image.crop((pad * plan.factor, 0, pad * plan.factor + plan.width, plan.height))


def check_options(config: StyleAlignedConfig, view_batch_size: int, num_inference_steps: int) -> None:
    """Refuse settings a panorama cannot run with, in one line."""
    for name, value in (("view_batch_size", view_batch_size), ("num_inference_steps", num_inference_steps)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if config.full_attention_share:
        raise UserError("full_attention_share shares among all images at once, which a panorama's window batches "
                        "cannot; turn it off")


@torch.no_grad()
def generate_panorama(pipe, prompt: str, config: StyleAlignedConfig | None = None, reference_prompt: str | None = None,
                      width: int | None = None, height: int | None = None, window: int | None = None,
                      stride: int | None = None, circular: bool = False, view_batch_size: int = 4, seed: int = 0,
                      num_inference_steps: int = 50, guidance_scale: float | None = None) -> Panorama:
    """A panorama of `prompt` in the style of one reference image (of `reference_prompt`, default `prompt`).

    Args:
        pipe: an SD 1.x/2.x or SDXL text-to-image pipeline.
        config: the StyleAligned knobs (default: the paper's text-to-image setting).
        width: the panorama's width in pixels (default: 4 windows wide).
        height: its height in pixels (default: one window high).
        window: the side of the square windows and of the reference (default: the model's native size).
        stride: pixels between neighbouring windows (default: window / 8).
        circular: wrap the windows around the right edge, so the panorama closes into a 360-degree loop.
        view_batch_size: windows per denoiser call: the memory bound.
        seed: the reference starts from noise seeded `seed`, the panorama from `seed + 1`.
    Returns (image, reference).
    """
    config = config or StyleAlignedConfig()
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("give the panorama a prompt (text)")
    check_options(config, view_batch_size, num_inference_steps)
    plan = plan_panorama(pipe, width, height, window, stride, circular)
    backbone = _panorama_backbone(pipe)
    guidance_scale = backbone.default_guidance() if guidance_scale is None else guidance_scale
    side = plan.window
    conditioning = backbone.conditioning(prompt, guidance_scale, side, side)
    reference_conditioning = backbone.conditioning(reference_prompt or prompt, guidance_scale, side, side)
    reference = backbone.initial_noise([0], seed, side, side)
    latents = backbone.initial_noise([1], seed, plan.height, plan.width)
    with apply(pipe, config) as handle:
        outputs = shared_outputs(handle, conditioning, reference_conditioning, guidance_scale, plan, view_batch_size)
        latents, reference = denoise(backbone, plan, latents, reference, num_inference_steps, outputs)
    return Panorama(decode(backbone, latents, plan), backbone.decode(reference, side, side)[0])
