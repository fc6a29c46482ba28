"""`stylealigned eval`: the benchmark under the paper's configurations, scored, tabled and plotted."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from accelerate import PartialState

from ..backbones import backbone_for
from ..errors import UserError
from ..eval.ablations import CONFIGS, parse_configs
from ..eval.encoders import DEFAULT_CLIP, DEFAULT_DINO
from ..eval.runner import SET_SEED_STRIDE, evaluate, reference_trajectory
from . import app
from .common import DEFAULT_MODEL, Device, Dtype, Guidance, Model, Scheduler, Size, Steps, check_numbers, load

Text = Optional[str]


@app.command("eval")
def evaluate_command(
    model: Model = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output folder; rerunning the same command resumes it.")] = Path(
        "stylealigned-eval"),
    configs: Annotated[Text, typer.Option(
        help=f"Comma-separated, from: {', '.join(CONFIGS)}. Default: all that apply.")] = None,
    styles: Annotated[int, typer.Option(help="Evaluate the first N of the benchmark's 100 styles.")] = 100,
    seed: Annotated[int, typer.Option(help=f"Set i starts from seed + {SET_SEED_STRIDE} x i.")] = 0,
    steps: Steps = 50, guidance: Guidance = None, width: Size = None, height: Size = None,
    reference_image: Annotated[Optional[Path], typer.Option(help="Real image for the transfer sets.")] = None,
    reference_prompt: Annotated[Text, typer.Option(help="What the reference image shows (to invert it).")] = None,
    reference_style: Annotated[Text, typer.Option(help="Style text of the transfer prompts.")] = None,
    clip_model: Annotated[str, typer.Option(help="CLIP for text alignment: hub id or folder.")] = DEFAULT_CLIP,
    dino_model: Annotated[str, typer.Option(help="DINO ViT for set consistency: hub id or folder.")] = DEFAULT_DINO,
    device: Device = "auto", dtype: Dtype = None, scheduler: Scheduler = "auto",
) -> None:
    """Generate every benchmark set under each configuration; write results.csv, summary.md and tradeoff.png."""
    check_numbers(styles=styles, seed=seed)
    parse_configs(configs, has_reference=reference_image is not None)  # fail before the model loads
    if reference_image is not None and not (reference_prompt and reference_style):
        raise UserError("--reference-image needs --reference-prompt (what it shows) and --reference-style")
    state = PartialState(cpu=device == "cpu")  # created first, so every later PartialState() shares it
    pipe, settings = load(model, device, dtype, scheduler, steps, guidance, width, height, None)
    pipe.set_progress_bar_config(disable=True)
    names = parse_configs(configs, has_reference=reference_image is not None, backbone=backbone_for(pipe))
    reference = None
    if "transfer" in names:
        reference = reference_trajectory(pipe, out, reference_image, reference_prompt, settings["num_inference_steps"],
                                         settings["width"], settings["height"])
    evaluate(pipe, out, names, styles=styles, seed=seed, reference=reference, reference_style=reference_style,
             clip_model=clip_model, dino_model=dino_model, **settings)
    if state.is_main_process:
        typer.echo((out / "summary.md").read_text(encoding="utf-8"))
        typer.echo(f"wrote {out / 'results.csv'}, {out / 'summary.md'} and {out / 'tradeoff.png'}")
