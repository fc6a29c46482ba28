"""`stylealigned transfer`: a set in the style of a real image (DDIM-inverted, or forward-noised)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..backbones import backbone_for
from ..errors import UserError
from . import app
from .common import (DEFAULT_MODEL, BatchSize, Device, Dtype, Guidance, Model, Negative, NoShare, Out, Overwrite,
                     Preset, Prompts, PromptsFile, Resume, RunFolder, Scheduler, Seed, Size, Steps, Style,
                     build_config, check_numbers, file_digest, fit_to_family, generate_into, load, read_prompts,
                     with_knob_options)


@app.command()
@with_knob_options
def transfer(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Target prompts.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="The style image (PNG, JPEG or WebP).")] = None,
    reference_prompt: Annotated[Optional[str], typer.Option(help="Text describing the style image.")] = None,
    inversion: Annotated[str, typer.Option(help="ddim (faithful) or noise (no UNet calls, cheaper).")] = "ddim",
    inversion_guidance: Annotated[Optional[float], typer.Option(
        help="Guidance of the inversion (default: 2; on FLUX, whose guidance is embedded, the sampling guidance).",
        show_default=False)] = None,
    offset: Annotated[int, typer.Option(help="Steps during which the reference stays at its (offset+1)th latent.")] = 0,
    trajectory: Annotated[Optional[Path], typer.Option(help="Reuse a trajectory saved by --save-trajectory.")] = None,
    save_trajectory: Annotated[Optional[Path], typer.Option(help="Save the inverted trajectory to this file.")] = None,
    prompts_file: PromptsFile = None, style: Style = None, model: Model = DEFAULT_MODEL,
    out: Out = Path("stylealigned-out"), seed: Seed = 0, steps: Steps = 50, guidance: Guidance = None,
    width: Size = None, height: Size = None, device: Device = "auto", dtype: Dtype = None,
    scheduler: Scheduler = "auto", negative_prompt: Negative = None, batch_size: BatchSize = None,
    resume: Resume = False, overwrite: Overwrite = False, no_share: NoShare = False, preset: Preset = "transfer",
    knobs: dict = None,
) -> None:
    """Generate targets in the style of a real image; 00 is the reference's reconstruction."""
    from ..inversion import MODES, Trajectory, invert
    from ..io import load_image

    check_numbers(seed=seed, steps=steps, batch_size=batch_size, offset=offset, inversion_guidance=inversion_guidance)
    if offset >= steps:
        raise UserError(f"--offset must be below --steps ({steps}), got {offset}; pass a smaller --offset")
    config = build_config(preset, no_share, **knobs)
    targets = read_prompts(prompts, prompts_file, style)
    if inversion not in MODES:
        raise UserError(f"unknown --inversion {inversion!r}; choose one of: {', '.join(MODES)}")
    if trajectory is None and (reference is None or not (reference_prompt or "").strip()):
        raise UserError("pass --reference IMAGE and --reference-prompt TEXT, or --trajectory FILE")
    if save_trajectory is not None:
        _check_save_path(save_trajectory, overwrite)
    if reference is not None:
        load_image(reference, 64, 64)  # fail on a bad image before the model loads
    saved = Trajectory.load(trajectory) if trajectory is not None else None
    pipe, settings = load(model, device, dtype, scheduler, steps, guidance, width, height, negative_prompt)
    config = fit_to_family(config, knobs, pipe, batch_size)
    image = load_image(reference, settings["width"], settings["height"]) if reference is not None else None
    if saved is None:
        if inversion_guidance is None:
            backbone = backbone_for(pipe)
            embedded = backbone.embedded_guidance
            inversion_guidance = settings.get("guidance_scale", backbone.default_guidance()) if embedded else 2.0
        saved = invert(pipe, image, reference_prompt, steps, guidance_scale=inversion_guidance, mode=inversion,
                       seed=seed)
    saved.check_compatible(pipe, steps, settings["width"], settings["height"])
    folder = RunFolder(out, [saved.prompt] + targets, {
        "command": "transfer", "model": model, "style": style, "seed": seed, "scheduler": scheduler,
        "dtype": str(pipe.dtype), **settings, "batch_size": batch_size, "config": config.to_dict(),
        "reference": str(reference or trajectory), "reference_sha256": file_digest(reference or trajectory),
        "inversion": saved.mode, "inversion_guidance": saved.guidance_scale,
        "offset": offset})
    todo = folder.open(resume, overwrite)
    if save_trajectory is not None:
        try:
            saved.save(save_trajectory, overwrite=overwrite)
        except OSError as error:
            raise UserError(f"cannot write --save-trajectory {save_trajectory} ({error.strerror}); "
                            "free some space or choose another file") from None

    def produce(positions, on_image):
        from ..sets import generate_set

        generate_set(pipe, targets, config, reference=saved, seed=seed, batch_size=batch_size, offset=offset,
                     indices=positions, on_image=on_image, **settings)

    extra = [("reference (input)", image)] if image is not None else []
    if generate_into(folder, todo, produce, batch_size, grid_extra=extra):
        typer.echo(f"wrote the reconstruction, {len(targets)} images, grid.png and run.json to {out}")


def _check_save_path(path: Path, overwrite: bool) -> None:
    """--save-trajectory must name a file that can be created: not a folder, in an existing folder."""
    if path.is_dir():
        raise UserError(f"--save-trajectory {path} is a folder; name a file such as {path / 'reference.safetensors'}")
    if not path.parent.is_dir():
        raise UserError(f"--save-trajectory {path}: folder {path.parent} does not exist; create it or choose another")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another --save-trajectory or pass --overwrite")
