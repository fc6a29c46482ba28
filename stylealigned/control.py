"""ControlNet-guided sets: control images per set position, a reference generated without control, depth maps.

A set on a ControlNet pipeline (`StableDiffusionControlNetPipeline`, `StableDiffusionXLControlNetPipeline`,
`FluxControlNetPipeline`) gives each target a control image: one for all targets or one per target. The references
are generated without control, as in the paper's demo: they get a placeholder image, and a "stylealigned" hook on
the ControlNet zeroes what it adds for their rows, so they come out exactly as the plain pipeline makes them. A
reference given a control image of its own (the list then holds one per set position) keeps it. The hook is
installed through the set's `StyleAlignedHandle` for the set's calls only; it also runs the ControlNet
`handle.run.controlnet_chunk` images of each guidance group at a time, so its memory is bounded as the denoiser's
is, and the denoiser's chunked forward slices the residuals with their images.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from diffusers.hooks import ModelHook
from PIL import Image, ImageOps

from .apply import chunk_inputs
from .errors import UserError
from .io import load_image, to_rgb
from .models import HUB_ID, hub_call
from .prompts import untagged

DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"  # transformers depth-estimation model (Apache-2.0)


def control_argument(pipe) -> str:
    """The pipeline call's argument for control images: `control_image` where the call has one (FLUX, and the
    image-to-image ControlNet pipelines, whose `image` is the init image), else `image`."""
    return "control_image" if "control_image" in inspect.signature(type(pipe).__call__).parameters else "image"


def control_inputs(pipe, control_images, count: int, height: int, width: int,
                   references: int = 1) -> tuple[dict, list[int] | None]:
    """(per-image pipeline inputs, the uncontrolled reference slots for `guided`; None without control images)
    for `control_images` on a set of `count` positions whose first `references` are references.

    `control_images`: one image (a path or a PIL image) for every target; a list with one per target; or a list
    with one per position, references first, where a reference's entry may be None (no control). Images are fitted
    (center crop, resize) to width x height.
    """
    if control_images is None:
        return {}, None
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        raise UserError(f"control images need a ControlNet pipeline, not {type(pipe).__name__}; load the model "
                        "with a ControlNet (load_pipeline(..., controlnet=MODEL), --controlnet MODEL)")
    if hasattr(controlnet, "nets"):
        raise UserError("sets take one ControlNet at a time; load a single ControlNet model")
    images = position_images(control_images, count, references, height, width)
    free = [slot for slot in range(references) if images[slot] is None]
    blank = Image.new("RGB", (width, height))
    inputs = {control_argument(pipe): [blank if image is None else image for image in images]}
    return inputs, free


def position_images(control_images, count: int, references: int, height: int, width: int) -> list:
    """One fitted control image (None: no control) per set position, from the forms `control_inputs` takes."""
    targets = count - references
    if isinstance(control_images, (str, Path, Image.Image)):
        entries = [None] * references + [control_images] * targets
    elif isinstance(control_images, Sequence) and len(control_images) in (targets, count):
        entries = [None] * (count - len(control_images)) + list(control_images)
    else:
        given = len(control_images) if isinstance(control_images, Sequence) else type(control_images).__name__
        raise UserError(f"control_images holds {given} for {targets} targets; give one image for all targets, one "
                        f"per target ({targets}) or one per image, references first ({count})")
    if any(entry is None for entry in entries[references:]):
        raise UserError("every target needs a control image; only references may go without one (None)")
    fitted: dict[int, Image.Image] = {}  # each distinct image once, however many targets share it
    return [None if entry is None else fitted.setdefault(id(entry), fit(entry, height, width)) for entry in entries]


def fit(image, height: int, width: int) -> Image.Image:
    """A control image (path or PIL image) as RGB, center-cropped and resized to width x height."""
    if isinstance(image, Image.Image):
        return ImageOps.fit(to_rgb(image), (width, height), Image.Resampling.LANCZOS)
    if isinstance(image, (str, Path)):
        return load_image(image, width, height)
    raise UserError(f"a control image must be a file path or a PIL image, not {type(image).__name__}")


class ControlNetHook(ModelHook):
    """Runs the ControlNet `handle.run.controlnet_chunk` images per guidance group at a time (as the denoiser runs in
    chunks), and zeroes the residuals it returns for the uncontrolled reference `slots` of each group."""

    def __init__(self, handle, slots: list[int]):
        super().__init__()
        self.handle, self.slots = handle, slots

    def new_forward(self, module, *args, **kwargs):
        backbone, run, forward = self.handle.backbone, self.handle.run, self.fn_ref.original_forward
        sample = args[0] if args else kwargs[backbone.sample_name]
        batch = sample.shape[0]
        # guess mode with guidance runs the ControlNet on the conditional half alone: one group
        groups = 1 if kwargs.get("guess_mode") else backbone.guidance_groups()
        size = batch if run.controlnet_chunk is None else run.controlnet_chunk * groups
        if size >= batch:
            output = forward(*args, **untagged(run.prompt_rows, kwargs))
        else:
            pieces = []
            for index in torch.arange(batch, device=sample.device).split(size):
                chunk_args, chunk_kwargs = chunk_inputs(args, kwargs, index, batch, backbone.unbatched_inputs)
                pieces.append(forward(*chunk_args, **untagged(run.prompt_rows, chunk_kwargs)))
            output = cat_rows(pieces)
        rows = [group * (batch // groups) + slot for group in range(groups) for slot in self.slots]
        return zero_rows(output, torch.tensor(rows, device=sample.device), batch) if rows else output


def cat_rows(pieces: list):
    """The outputs of consecutive row chunks joined into one (tensors inside tuples, lists and outputs)."""
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces)
    if isinstance(first, dict):  # a diffusers BaseOutput is a dict of its fields
        return type(first)(**{key: cat_rows([piece[key] for piece in pieces]) for key in first})
    if isinstance(first, (list, tuple)):
        return type(first)(cat_rows(list(items)) for items in zip(*pieces))
    return first


def zero_rows(value, rows: torch.Tensor, batch: int):
    """`value` with rows `rows` of every tensor with `batch` rows (inside tuples, lists and outputs) set to 0."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value.index_fill(0, rows, 0)
    if isinstance(value, dict):
        return type(value)(**{key: zero_rows(item, rows, batch) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(zero_rows(item, rows, batch) for item in value)
    return value


def guided(handle, slots: list[int] | None) -> contextlib.AbstractContextManager:
    """Within this block the ControlNet of the handle's pipeline adds nothing to the reference `slots` and runs in
    chunks (`ControlNetHook`); None (no control images): nothing changes."""
    if slots is None:
        return contextlib.nullcontext()
    return handle.hooked(handle.pipe.controlnet, ControlNetHook(handle, slots))


def depth_maps(images: Sequence, height: int, width: int, model: str = DEPTH_MODEL,
               device: torch.device | str | None = None) -> list[Image.Image]:
    """Depth maps of `images` (paths or PIL images) as 3-channel control images of width x height, near bright
    (as depth ControlNets take them), from a transformers depth-estimation model: a hub id or a local folder."""
    estimate = depth_estimator(model, device)
    return [estimate(fit(image, height, width))["depth"].convert("RGB").resize((width, height)) for image in images]


def depth_estimator(model: str, device=None):
    """A transformers depth-estimation pipeline; a model that cannot be loaded is a UserError naming it."""
    from transformers import pipeline

    load = partial(pipeline, "depth-estimation", model=model, device=device)
    folder = Path(model).expanduser().is_dir()
    if not folder and not HUB_ID.match(model):
        raise UserError(f"no such depth model folder: {model}; pass --depth-model a hub id or a local folder")
    if folder:
        try:
            return load()
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"{model} is not a transformers depth-estimation model folder "
                            f"({str(error).splitlines()[0]})") from None
    fix = f"download it once with network (`hf download {model}`) or pass --depth-model a local folder"
    return hub_call(f"the depth model {model}", fix, load)
