"""Generate a style-aligned set of any size: one reference, targets in waves and chunks, images as they finish.

Set positions: 0 is the reference, 1..n the targets. Image i starts from noise seeded by `seed + i`. Waves are
fixed ranges of positions (`waves_of`) and a wave is always denoised and decoded whole, so an image depends only on
its position: any subset of positions (a resumed run, one process of several) reproduces the full set's images
bit for bit.

Each wave denoises up to `wave_size` targets together with the reference through the pipeline's own call; the
denoiser (UNet or transformer) runs the reference once per step and the targets `batch_size` at a time against its
stored keys, values and statistics (`StyleAlignedHandle.chunked`). Latents are decoded `batch_size` at a time at the
end of a wave, by the model family's backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from .apply import apply
from .backbones import backbone_for
from .config import StyleAlignedConfig
from .errors import UserError
from .inversion import Trajectory

WAVE_CHUNKS = 8  # chunks per wave by default: the reference is recomputed once per wave, so 1/(8 x batch) extra


def pin_reference(trajectory: Trajectory, offset: int) -> Callable:
    """A step-end callback that keeps the reference slot on the trajectory (the paper's release, with offset)."""

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        latents = tensors["latents"]
        latents[0] = trajectory.latents[max(offset + 1, step + 1)].to(latents.device, latents.dtype)
        return {"latents": latents}

    return callback


def generate_set(pipe, prompts: Sequence[str], config: StyleAlignedConfig | None = None,
                 reference: Trajectory | None = None, seed: int = 0, batch_size: int | None = None,
                 offset: int = 0, indices: Iterable[int] | None = None,
                 on_image: Callable[[int, Image.Image], None] | None = None, wave_size: int | None = None,
                 **pipeline_kwargs) -> list[Image.Image]:
    """Generate one style-aligned set and return its images, the reference first.

    Args:
        pipe: a diffusers text-to-image pipeline of a supported family (SD 1.x/2.x, SDXL, FLUX.1, SD3/3.5).
        prompts: with `reference=None`, prompts[0] is the reference; with a trajectory, every prompt is a target.
        config: the StyleAligned knobs (default: the paper's text-to-image setting).
        reference: a `Trajectory` from `invert` to take the style from a real image.
        seed: image i starts from noise seeded by `seed + i`.
        batch_size: targets per denoiser call (memory bound); None = all targets of a wave at once.
        offset: with a trajectory, the first `offset` steps keep the reference at `offset + 1`, as in the paper.
        indices: set positions to return (default all); the reference is always computed, returned if listed.
        on_image: called with (position, image) as soon as each image is decoded.
        wave_size: targets denoised together (default `8 x batch_size`, or all).
        pipeline_kwargs: passed to the pipeline call (num_inference_steps, guidance_scale, height, width, ...).
    """
    config = config or StyleAlignedConfig()
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError("give at least one prompt (text); the first one is the reference")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    set_prompts = ([reference.prompt] + prompts) if reference is not None else prompts
    wanted = sorted(set(range(len(set_prompts)) if indices is None else indices))
    if any(not 0 <= i < len(set_prompts) for i in wanted):
        raise UserError(f"indices must lie in 0..{len(set_prompts) - 1}")
    backbone = backbone_for(pipe)
    native_height, native_width = backbone.native_size()
    height = pipeline_kwargs.pop("height", None) or native_height
    width = pipeline_kwargs.pop("width", None) or native_width
    kwargs = dict(pipeline_kwargs, height=height, width=width, output_type="latent")
    if reference is not None:
        _check_reference(pipe, reference, offset, kwargs)
        kwargs["callback_on_step_end"] = pin_reference(reference, offset)

    waves = [wave for wave in waves_of(len(set_prompts), batch_size, wave_size) if set(wave) & set(wanted)]
    images: dict[int, Image.Image] = {}
    with apply(pipe, config) as handle, handle.chunked(batch_size):
        for wave in tqdm(waves, desc="waves", disable=len(waves) == 1):
            positions = [0] + [i for i in wave if i > 0]
            noise = backbone.initial_noise(positions, seed, height, width)
            if reference is not None:
                noise[0] = reference.latents[offset].to(noise.device, noise.dtype)
            latents = pipe([set_prompts[i] for i in positions], latents=noise, **kwargs).images
            rows = list(range(len(positions)) if wave.start == 0 else range(1, len(positions)))  # 0 from wave 0 only
            for start in range(0, len(rows), batch_size or len(rows)):
                part = rows[start:start + (batch_size or len(rows))]  # fixed chunks, so decoding matches too
                if not any(positions[k] in wanted for k in part):
                    continue
                for k, image in zip(part, backbone.decode(latents[part], height, width)):
                    if positions[k] in wanted:
                        images[positions[k]] = image
                        if on_image is not None:
                            on_image(positions[k], image)
    return [images[i] for i in wanted]


def waves_of(count: int, batch_size: int | None = None, wave_size: int | None = None) -> list[range]:
    """The fixed waves of a set of `count` images: ranges of set positions, the first one holding the reference."""
    size = wave_size or (WAVE_CHUNKS * batch_size if batch_size else max(count - 1, 1))
    return [range(0 if start == 1 else start, min(start + size, count)) for start in range(1, max(count, 2), size)]


def _check_reference(pipe, reference: Trajectory, offset: int, kwargs: dict) -> None:
    """The trajectory must match this generation and the scheduler must keep latents in its space."""
    steps = kwargs.setdefault("num_inference_steps", len(reference.timesteps))
    reference.check_compatible(pipe, steps, kwargs["width"], kwargs["height"])
    if not 0 <= offset < steps:
        raise UserError(f"offset must lie in 0..{steps - 1}, got {offset}")
    if float(getattr(pipe.scheduler, "init_noise_sigma", 1.0)) != 1.0:  # flow schedulers have none: sigma space
        raise UserError(f"{type(pipe.scheduler).__name__} keeps latents in another scale than the inverted "
                        "trajectory; use --scheduler ddim (or another variance-preserving scheduler)")
    if "callback_on_step_end" in kwargs:
        raise UserError("a trajectory reference uses the step-end callback itself; drop callback_on_step_end")
