"""Generate a style-aligned set of any size: one reference, targets in waves and chunks, images as they finish.

Set positions: 0 is the reference, 1..n the targets (with K references, 0..K-1 are the references in the order
given and K..K+n-1 the targets; every wave holds all K). Image i starts from noise seeded by `seed + i`. Waves are
fixed ranges of positions (`waves_of`) and a wave is always denoised and decoded whole, so an image depends only on
its position: any subset of positions (a resumed run, one process of several) reproduces the full set's images
bit for bit.

One `batch_size` (the memory bound) sets four sizes, each named where it applies: the wave (`wave_size`, default
`WAVE_CHUNKS x batch_size` targets denoised together with the references through one pipeline call), the denoiser
chunk (the denoiser runs the references once per step and then the targets that many at a time against what that
pass kept: `StyleAlignedHandle.chunked`), the ControlNet chunk (images of each guidance group per ControlNet call:
`control.py`) and the decode chunk (latents per VAE decode at the end of a wave, by the model family's backbone).
Each call keeps each distinct prompt embedding once (`prompts.py`).

Per-image pipeline inputs (an init image, a mask, a control image, a strength: any argument listed once per set
position) are split with the prompts, so each wave's call gets its positions' entries; inside the denoiser every
tensor derived from them has a row per image and is chunked with its image.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .apply import apply, with_step_ends
from .backbones import backbone_for
from .config import StyleAlignedConfig
from .control import control_inputs, guided
from .errors import UserError
from .inversion import Trajectory
from .prompts import tagged_prompts
from .strengths import check_strengths, wave_strengths

PER_IMAGE_INPUTS = ("image", "mask_image", "control_image", "strength")  # a list of these must match the set
SHARED_LISTS = ("timesteps", "sigmas", "callback_on_step_end_tensor_inputs", "control_guidance_start",
                "control_guidance_end")  # lists that are never per image, whatever their length
WAVE_CHUNKS = 8  # chunks per wave by default: the reference is recomputed once per wave, so 1/(8 x batch) extra


def pin_reference(trajectory: Trajectory, offset: int) -> Callable:
    """A step-end callback that keeps the reference slot on the trajectory (the paper's release, with offset)."""

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        latents = tensors["latents"]
        latents[0] = trajectory.latents[max(offset + 1, step + 1)].to(latents.device, latents.dtype)
        return {"latents": latents}

    return callback


def pin_references(trajectories: dict[int, Trajectory], offset: int) -> Callable:
    """A step-end callback that keeps each given reference slot on its trajectory (`pin_reference` per slot)."""
    pins = [(slot, pin_reference(trajectory, offset)) for slot, trajectory in trajectories.items()]

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        latents = tensors["latents"]
        for slot, pin in pins:
            latents[slot:slot + 1] = pin(pipe, step, timestep, {"latents": latents[slot:slot + 1]})["latents"]
        return {"latents": latents}

    return callback


def generate_set(pipe, prompts: Sequence[str], config: StyleAlignedConfig | None = None,
                 reference: Trajectory | None = None, seed: int = 0, batch_size: int | None = None,
                 offset: int = 0, indices: Iterable[int] | None = None,
                 on_image: Callable[[int, Image.Image], None] | None = None, wave_size: int | None = None,
                 references: Sequence[str | Trajectory] | None = None, weights: Sequence[float] | None = None,
                 control_images=None, **pipeline_kwargs) -> list[Image.Image]:
    """Generate one style-aligned set and return its images, the reference first (on a video pipeline, its clips:
    each a list of PIL frames, `num_frames` long).

    Args:
        pipe: a diffusers pipeline of a supported family (`backbones.SUPPORTED`): text-to-image (or video), or
            image-to-image / inpainting with an init image (and mask) per image, see `pipeline_kwargs`.
        prompts: with `reference=None`, prompts[0] is the reference; with a trajectory, every prompt is a target.
        config: the StyleAligned knobs (default: the paper's text-to-image setting).
        reference: a `Trajectory` from `invert` to take the style from a real image.
        references: several references instead (prompts or trajectories, set positions 0..K-1, every prompt a
            target); targets take from reference k in proportion to `weights[k]` (>= 0, default equal).
        control_images: on a ControlNet pipeline, one control image (path or PIL image) for every target, a list
            with one per target, or one per position (references first, None for no control); references
            without one are generated without control (`control.control_inputs`).
        seed: image i starts from noise seeded by `seed + i`.
        batch_size: the memory bound (None: none): targets per denoiser call after the references' pass, images
            of each guidance group per ControlNet call and latents per VAE decode; waves default to 8 x as many.
        offset: with a trajectory, the first `offset` steps keep the reference at `offset + 1`, as in the paper.
        indices: set positions to return (default all); the reference is always computed, returned if listed.
        on_image: called with (position, image) as soon as each image is decoded.
        wave_size: targets denoised together by one pipeline call (default `8 x batch_size`, or all).
        pipeline_kwargs: passed to the pipeline call (num_inference_steps, guidance_scale, height, width, ...).
            One given as a list or tuple with one entry per set position (reference first, counting a trajectory
            reference's slot) is per image: each wave's call receives the list of the entries for that wave's
            positions, in the order of its prompts (e.g. `image=[init_0, init_1, ...]`, `mask_image=[...]`).
            Anything else (and the lists in `SHARED_LISTS`) is passed to every call as it is. A list of
            another length for one of `PER_IMAGE_INPUTS` is a UserError. `height`, `width` and the starting
            `latents` are passed only where the pipeline's call takes them; `generator` is generate_set's own (one
            per image, seeded `seed + position`). On an image-to-image or inpainting pipeline the reference is an
            image like the others (entry 0: its own init image, mask, strength), and `strength` may be per image:
            each image then starts at its own strength (`strengths.py`). A trajectory cannot lead such a set.
            On WanImageToVideoPipeline `image` is one first frame, for every clip of the set.
            A `callback_on_step_end` of yours runs after the set's own (a trajectory's pin, staggered strengths).
    """
    config = config or StyleAlignedConfig()
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError("give at least one prompt (text); the first one is the reference")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    leads, targets = _references(reference, references, prompts)
    count = len(leads)  # references at positions 0..count-1
    set_prompts = [lead if isinstance(lead, str) else lead.prompt for lead in leads] + targets
    trajectories = {slot: lead for slot, lead in enumerate(leads) if isinstance(lead, Trajectory)}
    if weights is not None and len(weights) != count:
        raise UserError(f"weights lists {len(weights)} numbers for {count} references; give one per reference")
    wanted = sorted(set(range(len(set_prompts)) if indices is None else indices))
    if any(not 0 <= i < len(set_prompts) for i in wanted):
        raise UserError(f"indices must lie in 0..{len(set_prompts) - 1}")
    backbone = backbone_for(pipe)
    backbone.read_settings(pipeline_kwargs)  # before the split: a family may refuse a per-image list
    per_image, pipeline_kwargs = split_per_image(pipeline_kwargs, len(set_prompts))
    strengths = check_strengths(pipe, per_image.pop("strength"), pipeline_kwargs) if "strength" in per_image else None
    native_height, native_width = backbone.native_size()
    height = pipeline_kwargs.pop("height", None) or native_height
    width = pipeline_kwargs.pop("width", None) or native_width
    controls, uncontrolled = control_inputs(pipe, control_images, len(set_prompts), height, width, count)
    per_image |= controls
    kwargs = backbone.pipeline_inputs(dict(pipeline_kwargs, output_type="latent") | _size_inputs(pipe, height, width))
    for trajectory in trajectories.values():
        _check_reference(pipe, backbone, trajectory, offset, kwargs)
    still = [backbone.still_reference(t.latents.shape[1:], height, width) for t in trajectories.values()]
    if any(still) and (not all(still) or len(trajectories) < count):
        raise UserError("a still image leads a set of clips only with every reference a still image")
    pins = pin_references(trajectories, offset) if trajectories else None
    denoiser_chunk = controlnet_chunk = decode_chunk = batch_size  # one memory bound where each model runs

    waves = [wave for wave in waves_of(len(set_prompts), denoiser_chunk, wave_size, count) if set(wave) & set(wanted)]
    images: dict[int, Image.Image] = {}
    with apply(pipe, config) as handle, handle.chunked(denoiser_chunk, controlnet_chunk), \
            guided(handle, uncontrolled):
        handle.set_weights([1.0] * count if weights is None else weights)
        handle.run.still_reference = any(still)
        for wave in tqdm(waves, desc="waves", disable=len(waves) == 1):
            positions = list(range(count)) + [i for i in wave if i >= count]
            starts = _start_inputs(pipe, backbone, positions, seed, height, width, trajectories, offset)
            wave_inputs = {key: [values[i] for i in positions] for key, values in per_image.items()}
            wave_strength = None if strengths is None else [strengths[i] for i in positions]
            with wave_strengths(handle, wave_strength, [seed + i for i in positions], kwargs) as (call_kwargs, hold), \
                    tagged_prompts(handle):
                output = pipe(prompt=[set_prompts[i] for i in positions], **starts, **wave_inputs,
                              **with_step_ends(call_kwargs, [pins, hold]))
                latents = output[0]  # its first field: images, or a video pipeline's frames
            rows = list(range(0 if wave.start == 0 else count, len(positions)))  # references from wave 0 only
            for start in range(0, len(rows), decode_chunk or len(rows)):
                part = rows[start:start + (decode_chunk or len(rows))]  # fixed chunks, so decoding matches too
                if not any(positions[k] in wanted for k in part):
                    continue
                for k, image in zip(part, backbone.decode(latents[part], height, width)):
                    if k < count and any(still):
                        image = _held_still(backbone, latents[k], height, width, len(image))
                    if positions[k] in wanted:
                        images[positions[k]] = image
                        if on_image is not None:
                            on_image(positions[k], image)
    return [images[i] for i in wanted]


def _held_still(backbone, latent: torch.Tensor, height: int, width: int, frames: int) -> list[Image.Image]:
    """A still reference's clip: its one frame decoded alone (a causal video VAE decodes a clip of copies as
    frames that differ), held for the clip's `frames`."""
    return backbone.decode(latent[None].narrow(backbone.frame_axis, 0, 1), height, width)[0] * frames


def split_per_image(kwargs: dict, count: int) -> tuple[dict, dict]:
    """(per-image, shared) pipeline arguments: a list or tuple of `count` entries (one per set position) is per
    image, anything else is shared; a PER_IMAGE_INPUTS list of another length is a UserError."""
    if "generator" in kwargs:
        raise UserError("generate_set seeds image i with seed + i itself; pass seed= instead of generator=")
    per_image = {key: list(value) for key, value in kwargs.items()
                 if isinstance(value, (list, tuple)) and len(value) == count and key not in SHARED_LISTS}
    for key in PER_IMAGE_INPUTS:
        value = kwargs.get(key)
        if isinstance(value, (list, tuple)) and key not in per_image:
            raise UserError(f"{key} lists {len(value)} entries for a set of {count} images; give one for all, or "
                            "one per image, the reference's first")
    return per_image, {key: value for key, value in kwargs.items() if key not in per_image}


def _call_parameters(pipe) -> Mapping:
    """The keyword arguments the pipeline's call takes."""
    return inspect.signature(type(pipe).__call__).parameters


def _size_inputs(pipe, height: int, width: int) -> dict:
    """height and width, where the pipeline's call takes them (img2img takes its size from the init image)."""
    return {"height": height, "width": width} if "height" in _call_parameters(pipe) else {}


def _start_inputs(pipe, backbone, positions: list[int], seed: int, height: int, width: int,
                  trajectories: dict[int, Trajectory], offset: int) -> dict:
    """How each image of a wave starts, from its own noise seeded `seed + position`: as `latents` where the
    pipeline starts from noise it is given; plus one generator per image for whatever the call draws itself (an
    init image's VAE sample, the noise added to it, a stochastic sampler's noise)."""
    starts = {"generator": [torch.Generator("cpu").manual_seed(seed + p) for p in positions]}
    parameters = _call_parameters(pipe)
    if "latents" in parameters and "strength" not in parameters:  # with strength, given latents mean pure noise
        noise = backbone.initial_noise(positions, seed, height, width)
        for slot, trajectory in trajectories.items():
            noise[slot] = trajectory.latents[offset].to(noise.device, noise.dtype)
        starts["latents"] = backbone.start_latents(noise, height, width)
    return starts


def waves_of(count: int, denoiser_chunk: int | None = None, wave_size: int | None = None,
             references: int = 1) -> list[range]:
    """The fixed waves of a set of `count` images: ranges of set positions, the first one holding the references
    (positions 0..references-1); `wave_size` targets each (default: `WAVE_CHUNKS` denoiser chunks, or all)."""
    size = wave_size or (WAVE_CHUNKS * denoiser_chunk if denoiser_chunk else max(count - references, 1))
    return [range(0 if start == references else start, min(start + size, count))
            for start in range(references, max(count, references + 1), size)]


def _references(reference: Trajectory | None, references: Sequence[str | Trajectory] | None,
                prompts: list[str]) -> tuple[list, list[str]]:
    """(the references, as prompts or trajectories; the target prompts) from generate_set's arguments."""
    if references is None:
        return ([reference], prompts) if reference is not None else (prompts[:1], prompts[1:])
    references = list(references)
    if reference is not None or not references or not all(isinstance(r, (str, Trajectory)) for r in references):
        raise UserError("references must be a non-empty list of prompts or trajectories, given instead of "
                        "reference=; pass one or the other")
    return references, prompts


def _check_reference(pipe, backbone, reference: Trajectory, offset: int, kwargs: dict) -> None:
    """The trajectory must match this generation and the scheduler must keep latents in its space."""
    if "strength" in _call_parameters(pipe):
        raise UserError(f"a real-image reference (trajectory) cannot lead an image-to-image set on "
                        f"{type(pipe).__name__}; give the reference's init image as the first image instead")
    steps = kwargs.setdefault("num_inference_steps", len(reference.timesteps))
    reference.check_compatible(pipe, steps, kwargs["width"], kwargs["height"], backbone)
    if not 0 <= offset < steps:
        raise UserError(f"offset must lie in 0..{steps - 1}, got {offset}")
    if float(getattr(pipe.scheduler, "init_noise_sigma", 1.0)) != 1.0:  # flow schedulers have none: sigma space
        raise UserError(f"{type(pipe.scheduler).__name__} keeps latents in another scale than the inverted "
                        "trajectory; use --scheduler ddim (or another variance-preserving scheduler)")
