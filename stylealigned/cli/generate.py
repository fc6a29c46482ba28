"""`stylealigned generate`: a style-aligned set from prompts; the first prompt's image is the reference."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import (DEFAULT_MODEL, BatchSize, Device, Dtype, Guidance, Model, Negative, NoShare, Out, Overwrite,
                     Preset, Prompts, PromptsFile, Resume, RunFolder, Scheduler, Seed, Size, Steps, Style,
                     build_config, check_numbers, fit_to_family, generate_into, load, read_prompts, with_knob_options)


@app.command()
@with_knob_options
def generate(
    prompts: Prompts = None, prompts_file: PromptsFile = None, style: Style = None, model: Model = DEFAULT_MODEL,
    out: Out = Path("stylealigned-out"), seed: Seed = 0, steps: Steps = 50, guidance: Guidance = None,
    width: Size = None, height: Size = None, device: Device = "auto", dtype: Dtype = None,
    scheduler: Scheduler = "auto", negative_prompt: Negative = None, batch_size: BatchSize = None,
    resume: Resume = False, overwrite: Overwrite = False, no_share: NoShare = False, preset: Preset = "text-to-image",
    knobs: dict = None,
) -> None:
    """Generate a set of images in one style: one PNG per prompt (00 is the reference), grid.png, run.json."""
    check_numbers(seed=seed, batch_size=batch_size)
    config = build_config(preset, no_share, **knobs)
    set_prompts = read_prompts(prompts, prompts_file, style)
    pipe, settings = load(model, device, dtype, scheduler, steps, guidance, width, height, negative_prompt)
    config = fit_to_family(config, knobs, pipe, batch_size)
    folder = RunFolder(out, set_prompts, {"command": "generate", "model": model, "style": style, "seed": seed,
                                          "scheduler": scheduler, "dtype": str(pipe.dtype), **settings,
                                          "batch_size": batch_size, "config": config.to_dict()})
    todo = folder.open(resume, overwrite)
    if len(set_prompts) == 1:
        typer.echo("note: only one prompt, so there is nothing to align; generating the reference alone", err=True)

    def produce(positions, on_image):
        from ..sets import generate_set

        generate_set(pipe, set_prompts, config, seed=seed, batch_size=batch_size, indices=positions,
                     on_image=on_image, **settings)

    if generate_into(folder, todo, produce, batch_size):
        typer.echo(f"wrote {len(set_prompts)} images, grid.png and run.json to {out}")
