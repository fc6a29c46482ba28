"""Per-image strength on one image-to-image (or inpainting) call: each image starts where it would start alone.

The call runs at the largest strength. An image with a smaller strength starts later: the pipeline's own
`prepare_latents` is run once per strength, with each image's generator seeded as generate_set seeds it, and each
image takes its initial latent (and its noise and image latents, where the pipeline returns them) from the run at
its own strength, its generator left as that run leaves it (`prepare_latents` replaced for the call through the
set's `StyleAlignedHandle`). A step-end callback holds the image on that latent until its first step, as
`pin_reference` holds a trajectory reference (the call runs both, and the caller's own: `apply.with_step_ends`). Since nothing a target computes reaches
another image, each image comes out as in a set of the reference and itself alone, each at its own strength.
This needs a deterministic one-step sampler (DDIM, Euler, flow Euler): a multistep solver (DPM-Solver++, UniPC,
PNDM) would carry its history across the held steps and a stochastic one (Euler ancestral) draw noise during them,
so an image would depend on the strengths of the others in its wave; different strengths are refused there.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator, Sequence

import torch

from .errors import UserError

ONE_STEP = ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")  # no history, no noise


def check_strengths(pipe, strengths: Sequence, kwargs: dict) -> list[float]:
    """Per-image strengths as floats in (0, 1], on a pipeline whose call takes a strength, with a sampler that
    lets images start at different steps (`kwargs`: the call's other arguments)."""
    if "strength" not in inspect.signature(type(pipe).__call__).parameters:
        raise UserError(f"{type(pipe).__name__} takes no strength; per-image strengths need an image-to-image or "
                        "inpainting pipeline")
    if not all(isinstance(s, (int, float)) and 0 < s <= 1 for s in strengths):
        raise UserError(f"every strength must lie in (0, 1], got {list(strengths)}")
    scheduler, eta = pipe.scheduler, kwargs.get("eta")
    if len(set(strengths)) > 1 and (type(scheduler).__name__ not in ONE_STEP or eta
                                    or scheduler.config.get("stochastic_sampling")):
        sampler = type(scheduler).__name__ + (f" with eta={eta}" if eta else "")
        raise UserError(f"images with different strengths need a deterministic one-step sampler (DDIM, Euler, "
                        f"flow Euler), not {sampler}; use --scheduler ddim, or one strength for all")
    return [float(s) for s in strengths]


def check_steps_left(pipe, strengths: Sequence[float], num_inference_steps: int, height: int, width: int) -> None:
    """Every strength must leave at least one denoising step of `num_inference_steps` (strength x steps >= 1 on
    most samplers); `strengths` empty: the pipeline's default strength."""
    from .backbones import backbone_for

    default = inspect.signature(type(pipe).__call__).parameters["strength"].default
    scheduled = types.SimpleNamespace(scheduler=backbone_for(pipe).scheduled(num_inference_steps, height, width))
    for strength in strengths or [default]:
        if not len(type(pipe).get_timesteps(scheduled, num_inference_steps, strength, "cpu")[0]):
            raise UserError(f"--strength {strength} leaves no denoising step of {num_inference_steps}; pass a larger "
                            f"--strength or more --steps (strength x steps must reach 1)")


@contextlib.contextmanager
def wave_strengths(handle, strengths: Sequence[float] | None, seeds: Sequence[int],
                   kwargs: dict) -> Iterator[tuple[dict, Callable | None]]:
    """(the call arguments `kwargs` for a wave whose images have these strengths (None: as given), the step-end
    callback the call must run too, or None), valid inside; `handle`: the set's `StyleAlignedHandle`."""
    if strengths is None or len(set(strengths)) == 1:
        yield (kwargs if strengths is None else dict(kwargs, strength=strengths[0])), None
        return
    steps = kwargs.get("num_inference_steps",
                       inspect.signature(type(handle.pipe).__call__).parameters["num_inference_steps"].default)
    with staggered_starts(handle, strengths, seeds, steps) as hold:
        yield dict(kwargs, strength=max(strengths)), hold


@contextlib.contextmanager
def staggered_starts(handle, strengths: Sequence[float], seeds: Sequence[int],
                     num_inference_steps: int) -> Iterator[Callable]:
    """Within this block the call of the handle's pipeline, run at `max(strengths)` with one generator per image,
    starts image k at `strengths[k]`; yields the step-end callback that the call must run."""
    pipe = handle.pipe
    prepare = pipe.prepare_latents
    signature = inspect.signature(prepare)
    held: dict = {}

    def prepare_latents(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        runs = {level: _prepared_at(pipe, prepare, bound.arguments, level, seeds, num_inference_steps)
                for level in sorted(set(strengths))}
        pipe.get_timesteps(num_inference_steps, max(strengths), bound.arguments["device"])  # the call's own start
        for k, level in enumerate(strengths):
            bound.arguments["generator"][k].set_state(runs[level][2][k].get_state())
        merged = tuple(_rows(parts, [runs[level][0][j] for level in strengths])
                       for j, parts in enumerate(runs[max(strengths)][0]))
        longest = runs[max(strengths)][1]  # loop steps of the call; image k joins after longest - its own
        held.update(latents=merged[0].clone(), delays=[longest - runs[level][1] for level in strengths])
        return merged if len(merged) > 1 else merged[0]

    def hold(pipe, step: int, timestep, tensors: dict) -> dict:
        latents = tensors["latents"]
        for k, delay in enumerate(held["delays"]):
            if step < delay:  # the next step is still before image k's own first step
                latents[k] = held["latents"][k]
        return {"latents": latents}

    with handle.replaced("prepare_latents", prepare_latents):
        yield hold


def _prepared_at(pipe, prepare: Callable, arguments: dict, strength: float, seeds: Sequence[int],
                 num_inference_steps: int) -> tuple[tuple, int, list[torch.Generator]]:
    """(outputs, loop steps, generators) of the pipeline's prepare_latents as a call at `strength` runs it."""
    timesteps, _ = pipe.get_timesteps(num_inference_steps, strength, arguments["device"])
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    level = dict(arguments, generator=generators, timestep=timesteps[:1].repeat(len(arguments["timestep"])))
    if "is_strength_max" in level:
        level["is_strength_max"] = strength == 1.0
    outputs = prepare(**level)
    return (outputs if isinstance(outputs, tuple) else (outputs,)), len(timesteps), generators


def _rows(like, per_image: list):
    """Row k from per_image[k] where `like` has a row per image; else `like` itself."""
    if not isinstance(like, torch.Tensor) or like.shape[0] != len(per_image):
        return like
    return torch.stack([part[k] for k, part in enumerate(per_image)])
