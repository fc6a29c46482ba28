"""`stylealigned eval`: the benchmark under the paper's configurations or a named experiment, scored, tabled and
plotted."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from accelerate import PartialState

from ..backbones import backbone_for
from ..errors import UserError
from ..eval.ablations import CONFIGS
from ..eval.csd import load_csd
from ..eval.encoders import DEFAULT_CLIP, DEFAULT_DINO
from ..eval.experiments import EXPERIMENTS, SET_SIZES, conditions
from ..eval.runner import SET_SEED_STRIDE, evaluate, reference_trajectory
from . import app
from .common import (DEFAULT_MODEL, BatchSize, Device, Dtype, Frames, Guidance, Model, Scheduler, Size, Steps,
                     check_numbers, load, video_settings)

Text = Optional[str]


def parse_sizes(text: str | None) -> list[int] | None:
    """`--set-sizes 4,8,16` as integers; anything else is a UserError."""
    if text is None:
        return None
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--set-sizes takes comma-separated whole numbers such as 4,8,16; got {text!r}") from None
    if len(set(sizes)) < len(sizes):
        raise UserError(f"--set-sizes names a size twice ({text}); give each size once, such as 4,8,16")
    return sizes


@app.command("eval")
def evaluate_command(
    model: Model = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output folder; rerunning the same command resumes it.")] = Path(
        "stylealigned-eval"),
    experiment: Annotated[str, typer.Option(help=f"One of: {', '.join(EXPERIMENTS)}.")] = "ablations",
    configs: Annotated[Text, typer.Option(
        help=f"Ablations only, comma-separated, from: {', '.join(CONFIGS)}. Default: all that apply.")] = None,
    set_sizes: Annotated[Text, typer.Option(
        help=f"set-size only: images per set, comma-separated (default {','.join(map(str, SET_SIZES))}; "
             "up to 64, with --batch-size to bound memory).")] = None,
    styles: Annotated[int, typer.Option(help="Evaluate the first N of the benchmark's 100 styles.")] = 100,
    seed: Annotated[int, typer.Option(help=f"Set i starts from seed + {SET_SEED_STRIDE} x i.")] = 0,
    steps: Steps = 50, guidance: Guidance = None, width: Size = None, height: Size = None,
    batch_size: BatchSize = None, frames: Frames = None,
    reference_image: Annotated[Optional[Path], typer.Option(help="Real image for the transfer sets.")] = None,
    reference_prompt: Annotated[Text, typer.Option(help="What the reference image shows (to invert it).")] = None,
    reference_style: Annotated[Text, typer.Option(help="Style text of the transfer prompts.")] = None,
    clip_model: Annotated[str, typer.Option(help="CLIP for text alignment: hub id or folder.")] = DEFAULT_CLIP,
    dino_model: Annotated[str, typer.Option(help="DINO ViT for set consistency: hub id or folder.")] = DEFAULT_DINO,
    csd_model: Annotated[Optional[Path], typer.Option(
        help="CSD checkpoint file (ViT-L + style head) to add CSD style similarity; off by default.")] = None,
    device: Device = "auto", dtype: Dtype = None, scheduler: Scheduler = "auto",
) -> None:
    """Generate every benchmark set under each condition; write results.csv, summary.md and the experiment's plot.

    On a video model (Wan) each set is a set of clips (--frames), saved as MP4s and scored frame by frame, with the
    temporal consistency of neighbouring frames within each clip."""
    check_numbers(styles=styles, seed=seed, batch_size=batch_size)
    sizes = parse_sizes(set_sizes)
    if reference_image is not None and experiment != "ablations":
        raise UserError(f"--reference-image is for the ablations' transfer sets; drop it for --experiment {experiment}")
    conditions(experiment, None, configs, reference_image is not None, sizes)  # fail before the model loads
    if reference_image is not None and not (reference_prompt and reference_style):
        raise UserError("--reference-image needs --reference-prompt (what it shows) and --reference-style")
    if csd_model is not None:
        load_csd(str(csd_model))  # a wrong checkpoint fails here, before the pipeline loads
    state = PartialState(cpu=device == "cpu")  # created first, so every later PartialState() shares it
    pipe, settings = load(model, device, dtype, scheduler, steps, guidance, width, height, None)
    video_settings(pipe, settings, frames, None)  # on a video model: the clip length, scored per clip and frame
    pipe.set_progress_bar_config(disable=True)
    names = [condition.name for condition in conditions(experiment, backbone_for(pipe), configs,
                                                        reference_image is not None, sizes)]
    reference = None
    if "transfer" in names:
        reference = reference_trajectory(pipe, out, reference_image, reference_prompt, settings["num_inference_steps"],
                                         settings["width"], settings["height"])
    evaluate(pipe, out, names if experiment == "ablations" else None, styles=styles, seed=seed, reference=reference,
             reference_style=reference_style, clip_model=clip_model, dino_model=dino_model, experiment=experiment,
             set_sizes=sizes, csd_model=None if csd_model is None else str(csd_model), batch_size=batch_size,
             **settings)
    if state.is_main_process:
        typer.echo((out / "summary.md").read_text(encoding="utf-8"))
        typer.echo(f"wrote {out / 'results.csv'}, {out / 'summary.md'} and {out / EXPERIMENTS[experiment].plot}")
