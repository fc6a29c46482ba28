"""`stylealigned transfer`: a set in the style of a real image (DDIM-inverted, or forward-noised)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..backbones import backbone_for
from ..errors import UserError
from ..control import DEPTH_MODEL
from . import app
from .common import (DEFAULT_MODEL, BatchSize, Device, Dtype, Fps, Frames, Guidance, Loras, Model, Negative,
                     NoShare, Out, Overwrite, Preset, PromptsFile, ReferenceWeights, Resume, RunFolder, Scheduler,
                     Seed, Size, Steps, Style, build_config, check_numbers, file_digest, fit_to_family,
                     fit_to_references, generate_into, load, read_prompts, reference_weights, video_settings,
                     with_knob_options, write_failure)
from .control import ControlImage, ControlNet, ControlOptions, ControlScale, DepthFrom, DepthModel


@app.command()
@with_knob_options
def transfer(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Target prompts.")] = None,
    reference: Annotated[Optional[list[Path]], typer.Option(
        help="The style image (PNG, JPEG or WebP), or on a video model a clip (MP4, ...; its first --frames); "
             "repeatable, to mix several (--reference-weight).")] = None,
    reference_prompt: Annotated[Optional[list[str]], typer.Option(
        help="Text describing the style image; once per --reference, in their order.")] = None,
    reference_weight: ReferenceWeights = None, lora: Loras = None,
    inversion: Annotated[str, typer.Option(help="ddim (faithful) or noise (no UNet calls, cheaper).")] = "ddim",
    inversion_guidance: Annotated[Optional[float], typer.Option(
        help="Guidance of the inversion (default: 2; on FLUX, whose guidance is embedded, the sampling guidance).",
        show_default=False)] = None,
    offset: Annotated[int, typer.Option(help="Steps during which the reference stays at its (offset+1)th latent.")] = 0,
    trajectory: Annotated[Optional[Path], typer.Option(help="Reuse a trajectory saved by --save-trajectory.")] = None,
    save_trajectory: Annotated[Optional[Path], typer.Option(help="Save the inverted trajectory to this file.")] = None,
    controlnet: ControlNet = None, control_image: ControlImage = None, control_scale: ControlScale = None,
    depth_from: DepthFrom = None, depth_model: DepthModel = DEPTH_MODEL, frames: Frames = None, fps: Fps = None,
    prompts_file: PromptsFile = None, style: Style = None, model: Model = DEFAULT_MODEL,
    out: Out = Path("stylealigned-out"), seed: Seed = 0, steps: Steps = 50, guidance: Guidance = None,
    width: Size = None, height: Size = None, device: Device = "auto", dtype: Dtype = None,
    scheduler: Scheduler = "auto", negative_prompt: Negative = None, batch_size: BatchSize = None,
    resume: Resume = False, overwrite: Overwrite = False, no_share: NoShare = False, preset: Preset = "transfer",
    knobs: dict = None,
) -> None:
    """Generate targets in the style of a real image; 00 is the reference's reconstruction.

    On a video model (Wan) the image is inverted as a one-frame clip that every target clip attends to at every
    step (its keys at frame 0), and a clip as itself; each target is an MP4, 00 the reconstruction, grid.png a
    contact sheet.
    """
    from ..inversion import MODES, Trajectory, invert

    check_numbers(seed=seed, steps=steps, batch_size=batch_size, offset=offset, inversion_guidance=inversion_guidance)
    if offset >= steps:
        raise UserError(f"--offset must be below --steps ({steps}), got {offset}; pass a smaller --offset")
    config = build_config(preset, no_share, **knobs)
    targets = read_prompts(prompts, prompts_file, style)
    if inversion not in MODES:
        raise UserError(f"unknown --inversion {inversion!r}; choose one of: {', '.join(MODES)}")
    references, texts = list(reference or []), list(reference_prompt or [])
    if trajectory is None and (not references or len(texts) != len(references) or not all(t.strip() for t in texts)):
        raise UserError("pass --reference IMAGE and --reference-prompt TEXT (once per image), or --trajectory FILE")
    if trajectory is not None and len(references) > 1:
        raise UserError("--trajectory stands for one reference; drop it to invert several --reference images")
    count = 1 if trajectory is not None else len(references)
    weights = reference_weights(reference_weight, count)
    config = fit_to_references(config, knobs, count)
    if save_trajectory is not None:
        if count > 1:
            raise UserError("--save-trajectory saves one reference's trajectory; pass one --reference to save it")
        _check_save_path(save_trajectory, overwrite or resume)
    for path in references:
        _load_reference(path, 64, 64, 1)  # fail on a bad image or clip before the model loads
    control = ControlOptions.check(controlnet, control_image, depth_from, depth_model, control_scale, len(targets),
                                   len(targets) + count)
    pipe, settings = load(model, device, dtype, scheduler, steps, guidance, width, height, negative_prompt, lora)
    fps = video_settings(pipe, settings, frames, fps)
    pipe, control_images = control.setup(pipe, settings)
    config = fit_to_family(config, knobs, pipe, batch_size)
    images = [_load_reference(path, settings["width"], settings["height"], settings.get("num_frames"))
              for path in references]
    backbone = backbone_for(pipe)
    backbone.read_settings(settings)  # the clip length, for the trajectories' shape
    if trajectory is not None:
        trajectories = [Trajectory.load(trajectory)]
    else:
        if inversion_guidance is None:
            embedded = backbone.embedded_guidance
            inversion_guidance = settings.get("guidance_scale", backbone.default_guidance()) if embedded else 2.0
        trajectories = [invert(pipe, image, text, steps, guidance_scale=inversion_guidance, mode=inversion, seed=seed)
                        for image, text in zip(images, texts)]
    for each in trajectories:
        each.check_compatible(pipe, steps, settings["width"], settings["height"], backbone)
    saved, sources = trajectories[0], [trajectory] if trajectory is not None else references
    folder = RunFolder(out, [each.prompt for each in trajectories] + targets, {
        "command": "transfer", "model": model, "style": style, "seed": seed, "scheduler": scheduler,
        "dtype": str(pipe.dtype), **settings, "batch_size": batch_size, "config": config.to_dict(),
        **_one_or_all(reference=[str(path) for path in sources],
                      reference_sha256=[file_digest(path) for path in sources]),
        "inversion": saved.mode, "inversion_guidance": saved.guidance_scale,
        "offset": offset, **control.record(), "reference_weights": weights, "lora": lora,
        **({} if fps is None else {"fps": fps})}, fps=fps)
    todo = folder.open(resume, overwrite)
    if save_trajectory is not None:
        try:
            with folder.restoring():
                saved.save(save_trajectory, overwrite=True)  # _check_save_path: absent, or a trajectory of ours
        except OSError as error:
            raise write_failure(error, save_trajectory, "run the same command again") from None

    def produce(positions, on_image):
        from ..sets import generate_set

        generate_set(pipe, targets, config, references=trajectories, weights=weights, seed=seed,
                     batch_size=batch_size, offset=offset, indices=positions, on_image=on_image,
                     control_images=control_images, **settings)

    extra = [(f"reference{'' if count == 1 else f' {k}'} (input)", image) for k, image in enumerate(images)]
    if generate_into(folder, todo, produce, batch_size, grid_extra=extra, references=count):
        made = "images" if fps is None else "clips"
        typer.echo(f"wrote the reconstruction, {len(targets)} {made}, grid.png and run.json to {out}")


def _load_reference(path: Path, width: int, height: int, frames: int | None):
    """A --reference file: a clip's first `frames` frames (by its suffix; `frames` None: an image model, where a
    clip is a UserError), else a still image."""
    from ..io import is_video, load_clip, load_image

    if not is_video(path):
        return load_image(path, width, height)
    if frames is None:
        raise UserError(f"--reference {path} is a clip, which leads sets on video models only; pass an image")
    return load_clip(path, width, height, frames)


def _one_or_all(**lists: list) -> dict:
    """run.json's record of the references: each entry as it is for one reference, the list for several."""
    return {key: values[0] if len(values) == 1 else values for key, values in lists.items()}


def _check_save_path(path: Path, replace: bool) -> None:
    """--save-trajectory must name a file that can be created: not a folder, in an existing folder; a file there
    is replaced only with --overwrite or --resume (`replace`), and only when it is a trajectory stylealigned wrote."""
    from ..inversion import Trajectory

    if path.is_dir():
        raise UserError(f"--save-trajectory {path} is a folder; name a file such as {path / 'reference.safetensors'}")
    if not path.parent.is_dir():
        raise UserError(f"--save-trajectory {path}: folder {path.parent} does not exist; create it or choose another")
    if (path.exists() or path.is_symlink()) and not replace:
        raise UserError(f"{path} already exists; choose another --save-trajectory, or pass --overwrite to replace "
                        "a trajectory saved before")
    if path.exists() or path.is_symlink():
        try:
            Trajectory.load(path)
        except UserError:
            raise UserError(f"--save-trajectory {path} is a file stylealigned did not write (not a trajectory), "
                            "and it is never replaced; choose another file name") from None
