"""`stylealigned generate`: a style-aligned set from prompts; the first prompt's image is the reference."""

from __future__ import annotations

from pathlib import Path

import typer

from ..control import DEPTH_MODEL
from . import app
from .common import (DEFAULT_MODEL, BatchSize, Device, Dtype, Fps, Frames, Guidance, Loras, Model, Negative,
                     NoShare, Out, Overwrite, Preset, Prompts, PromptsFile, ReferencePrompts, ReferenceWeights, Resume,
                     RunFolder, Scheduler, Seed, Size, Steps, Style, build_config, check_not_empty, check_numbers,
                     fit_to_family, fit_to_references, generate_into, load, read_prompts, reference_weights,
                     video_settings, with_knob_options)
from .control import ControlImage, ControlNet, ControlOptions, ControlScale, DepthFrom, DepthModel
from .images import ImageOptions, InitImage, MaskImage, Strength


@app.command()
@with_knob_options
def generate(
    prompts: Prompts = None, prompts_file: PromptsFile = None, style: Style = None, model: Model = DEFAULT_MODEL,
    out: Out = Path("stylealigned-out"), seed: Seed = 0, steps: Steps = 50, guidance: Guidance = None,
    width: Size = None, height: Size = None, device: Device = "auto", dtype: Dtype = None,
    scheduler: Scheduler = "auto", negative_prompt: Negative = None, batch_size: BatchSize = None,
    init_image: InitImage = None, mask_image: MaskImage = None, strength: Strength = None,
    reference_prompt: ReferencePrompts = None, reference_weight: ReferenceWeights = None, lora: Loras = None,
    controlnet: ControlNet = None, control_image: ControlImage = None, control_scale: ControlScale = None,
    depth_from: DepthFrom = None, depth_model: DepthModel = DEPTH_MODEL, frames: Frames = None, fps: Fps = None,
    resume: Resume = False, overwrite: Overwrite = False, no_share: NoShare = False, preset: Preset = "text-to-image",
    knobs: dict = None,
) -> None:
    """Generate a set of images in one style: one PNG per prompt (00 is the reference), grid.png, run.json.

    With --reference-prompt (repeatable) the references come first (00, 01, ...) and every prompt is a target.
    With --init-image each image starts from its init image (an img2img set; with --mask-image, inpainting).
    On a video model (Wan) each prompt makes a clip, NN-<slug>.mp4, and grid.png is a contact sheet.
    """
    check_numbers(seed=seed, batch_size=batch_size)
    config = build_config(preset, no_share, **knobs)
    set_prompts = read_prompts(prompts, prompts_file, style)
    references = list(reference_prompt or [])
    check_not_empty(references, "a --reference-prompt")
    weights = reference_weights(reference_weight, len(references) or 1)
    config = fit_to_references(config, knobs, len(references) or 1)
    images = ImageOptions.check(init_image, mask_image, strength, len(references) + len(set_prompts))
    control = ControlOptions.check(controlnet, control_image, depth_from, depth_model, control_scale,
                                   len(set_prompts) - (0 if references else 1), len(references) + len(set_prompts))
    pipe, settings = load(model, device, dtype, scheduler, steps, guidance, width, height, negative_prompt, lora)
    fps = video_settings(pipe, settings, frames, fps)
    pipe, control_images = control.setup(pipe, settings)
    pipe, image_inputs = images.setup(pipe, settings)
    config = fit_to_family(config, knobs, pipe, batch_size)
    folder = RunFolder(out, references + set_prompts, {
        "command": "generate", "model": model, "style": style, "seed": seed, "scheduler": scheduler,
        "dtype": str(pipe.dtype), **settings, "batch_size": batch_size, "config": config.to_dict(),
        **images.record(), "reference_weights": weights, "lora": lora, **control.record(),
        **({} if fps is None else {"fps": fps})}, fps=fps)
    todo = folder.open(resume, overwrite)
    if len(folder.prompts) == 1:
        typer.echo("note: only one prompt, so there is nothing to align; generating the reference alone", err=True)

    def produce(positions, on_image):
        from ..sets import generate_set

        generate_set(pipe, set_prompts, config, seed=seed, batch_size=batch_size, indices=positions,
                     on_image=on_image, references=references or None, weights=weights,
                     control_images=control_images, **settings, **image_inputs)

    if generate_into(folder, todo, produce, batch_size, references=len(references) or 1):
        made = "images" if fps is None else "clips"
        typer.echo(f"wrote {len(folder.prompts)} {made}, grid.png and run.json to {out}")
