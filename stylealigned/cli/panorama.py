"""`stylealigned panorama`: a wide image whose every window attends to one reference of the model's size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from .common import (DEFAULT_MODEL, Device, Dtype, Guidance, Interrupted, Model, NoShare, Overwrite, Preset,
                     RunFolder, Scheduler, Steps, Style, build_config, check_numbers, fit_to_family, load,
                     read_prompts, with_knob_options, write_failure)

Pixels = Optional[int]


class PanoramaFolder(RunFolder):
    """A run folder holding the reference (00), the panorama (01) and run.json; no grid, no --resume."""

    resumable = False

    @property
    def outputs(self) -> list[str]:
        return [file.name for file in self.files.values()]


@app.command()
@with_knob_options
def panorama(
    prompt: Annotated[str, typer.Argument(help="What the panorama shows.")],
    reference_prompt: Annotated[Optional[str], typer.Option(
        help="The reference image's prompt (default: PROMPT); --style is appended to it too.")] = None,
    style: Style = None, model: Model = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output folder (the reference, the panorama, run.json).")] = Path(
        "stylealigned-panorama"),
    seed: Annotated[int, typer.Option(help="The reference starts from noise seeded SEED, the panorama SEED + 1.")] = 0,
    steps: Steps = 50, guidance: Guidance = None,
    width: Annotated[Pixels, typer.Option(help="Panorama width in pixels (default: 4 windows).")] = None,
    height: Annotated[Pixels, typer.Option(help="Panorama height in pixels (default: one window).")] = None,
    window: Annotated[Pixels, typer.Option(
        help="Side of the square windows and of the reference, in pixels (default: the model's native size).")] = None,
    stride: Annotated[Pixels, typer.Option(help="Pixels between neighbouring windows (default: window / 8).")] = None,
    circular: Annotated[bool, typer.Option(help="Wrap the windows around the edge: a 360-degree panorama.")] = False,
    view_batch_size: Annotated[int, typer.Option(help="Windows per denoiser call; bounds memory.")] = 4,
    device: Device = "auto", dtype: Dtype = None, scheduler: Scheduler = "auto", overwrite: Overwrite = False,
    no_share: NoShare = False, preset: Preset = "text-to-image", knobs: dict = None,
) -> None:
    """Generate a panorama (MultiDiffusion) in the style of one reference image: 00 the reference, 01 the panorama."""
    from ..backbones import backbone_for
    from ..panorama import check_options, generate_panorama, plan_panorama

    check_numbers(seed=seed, window=window, stride=stride)
    config = build_config(preset, no_share, **knobs)
    check_options(config, view_batch_size, steps)
    (panorama_prompt,) = read_prompts([prompt], None, style)
    (reference,) = read_prompts([reference_prompt or prompt], None, style)
    pipe, settings = load(model, device, dtype, scheduler, steps, guidance, width, height, None)
    config = fit_to_family(config, knobs, pipe, None)
    plan = plan_panorama(pipe, width, height, window, stride, circular)
    guidance = settings.get("guidance_scale", backbone_for(pipe).default_guidance())
    folder = PanoramaFolder(out, [reference, panorama_prompt], {
        "command": "panorama", "model": model, "style": style, "seed": seed, "scheduler": scheduler,
        "dtype": str(pipe.dtype), "num_inference_steps": steps, "guidance_scale": guidance,
        "width": plan.width, "height": plan.height, "window": plan.window, "stride": plan.stride,
        "circular": circular, "view_batch_size": view_batch_size, "config": config.to_dict()})
    folder.open(resume=False, overwrite=overwrite)
    try:
        with folder.restoring():
            folder.write_record(complete=False)
            result = generate_panorama(pipe, panorama_prompt, config, reference_prompt=reference, width=plan.width,
                                       height=plan.height, window=plan.window, stride=plan.stride, circular=circular,
                                       view_batch_size=view_batch_size, seed=seed, num_inference_steps=steps,
                                       guidance_scale=guidance)
            folder.save(0, result.reference)
            folder.save(1, result.image)
            folder.write_record(complete=True)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {out} holds no panorama; rerun the same command with --overwrite") from None
    except OSError as error:
        raise write_failure(error, out, "rerun the same command with --overwrite") from None
    typer.echo(f"wrote the reference, the {plan.width}x{plan.height} panorama and run.json to {out}")
