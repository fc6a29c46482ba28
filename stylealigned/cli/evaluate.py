"""`stylealigned eval`: the benchmark under the paper's configurations, scored, tabled and plotted."""

from pathlib import Path

import typer
from accelerate import PartialState

from ..errors import UserError
from ..eval.ablations import CONFIGS, parse_configs
from ..eval.encoders import DEFAULT_CLIP, DEFAULT_DINO
from ..eval.runner import evaluate, reference_trajectory
from ..models import load_pipeline
from . import app


@app.command("eval")
def evaluate_command(
    model: str = typer.Option(..., help="Hub id, diffusers folder, .safetensors/.ckpt file or 'builtin'."),
    out: Path = typer.Option(..., help="Output folder; rerunning with the same settings resumes it."),
    configs: str = typer.Option(
        None, help=f"Comma-separated configurations from: {', '.join(CONFIGS)}. Default: all that apply."
    ),
    styles: int = typer.Option(100, help="Evaluate the first N of the benchmark's 100 styles."),
    steps: int = typer.Option(50, help="Denoising steps per image."),
    seed: int = typer.Option(0, help="Base seed; set i uses seed + 100 * i."),
    reference_image: Path = typer.Option(None, help="Real image whose style the transfer sets take (inverted once)."),
    reference_prompt: str = typer.Option(None, help="Prompt describing the reference image, used to invert it."),
    reference_style: str = typer.Option(None, help="Style text of the transfer sets' prompts: '{object}, STYLE'."),
    clip_model: str = typer.Option(DEFAULT_CLIP, help="CLIP for text alignment: hub id or local folder."),
    dino_model: str = typer.Option(DEFAULT_DINO, help="DINO ViT for set consistency: hub id or local folder."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps (one process per GPU under accelerate)."),
    dtype: str = typer.Option(None, help="fp16, bf16 or fp32; default fp16 on GPUs, fp32 on the CPU."),
) -> None:
    """Generate every benchmark set under each configuration; write results.csv, summary.md and tradeoff.png."""
    names = parse_configs(configs, has_reference=reference_image is not None)
    if reference_image is not None and not (reference_prompt and reference_style):
        raise UserError("--reference-image needs --reference-prompt (what it shows) and --reference-style")
    state = PartialState(cpu=device == "cpu")  # the process group every later PartialState() shares
    pipe = load_pipeline(model, device=str(state.device) if state.num_processes > 1 else device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    reference = (reference_trajectory(pipe, out, reference_image, reference_prompt, steps)
                 if "transfer" in names else None)
    evaluate(pipe, out, names, styles=styles, seed=seed, reference=reference, reference_style=reference_style,
             clip_model=clip_model, dino_model=dino_model, num_inference_steps=steps)
    if state.is_main_process:
        typer.echo((out / "summary.md").read_text(encoding="utf-8"))
        typer.echo(f"wrote {out / 'results.csv'}, {out / 'summary.md'} and {out / 'tradeoff.png'}")
