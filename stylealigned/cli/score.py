"""`stylealigned score DIR`: the paper's two metrics for a set that `stylealigned generate` wrote."""

import json
from pathlib import Path

import typer

from ..errors import UserError
from ..eval.encoders import DEFAULT_CLIP, DEFAULT_DINO
from ..eval.metrics import score_clips, score_set
from ..eval.run_folder import read_run_folder
from ..io import write_json_atomic
from . import app
from .common import SCORES, write_failure


@app.command()
def score(
    folder: Path = typer.Argument(..., help="Folder written by `stylealigned generate` (holds run.json)."),
    clip_model: str = typer.Option(DEFAULT_CLIP, help="CLIP for text alignment: hub id or local folder."),
    dino_model: str = typer.Option(DEFAULT_DINO, help="DINO ViT for set consistency: hub id or local folder."),
    full_prompt: bool = typer.Option(
        False, help="Score text alignment against the full prompt instead of the prompt without the --style suffix."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Print text alignment (CLIP) and set consistency (DINO) and write them to DIR/scores.json; for a set of clips
    frame by frame, with the temporal consistency within clips (DINO of neighbouring frames)."""
    run = read_run_folder(folder)
    texts = run.texts(full_prompt)
    try:
        images = run.load_images()
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"an image in {folder} cannot be read ({error}); "
                        "generate the set again or complete it with --resume".replace("\n", " ")) from None
    scores = (score_clips if run.clips else score_set)(images, texts, clip_model, dino_model, device)
    per_image = scores.pop("text_alignment_per_image")
    temporal = scores.pop("temporal_consistency_per_clip", None) or [None] * len(per_image)
    record = {
        **scores,
        "text": "full prompt" if full_prompt else "prompt without the style suffix",
        "clip_model": clip_model,
        "dino_model": dino_model,
        "images": [{"file": path.name, "text": text, "text_alignment": value}
                   | ({"temporal_consistency": smooth} if run.clips else {})
                   for path, text, value, smooth in zip(run.images, texts, per_image, temporal)],
    }
    try:
        write_json_atomic(folder / SCORES, record)
        list_as_ours(folder / "run.json", SCORES)
    except OSError as error:
        raise write_failure(error, folder, "score again") from None
    items = "clips (each the mean over its frames)" if run.clips else "images"
    typer.echo(f"text alignment  {scores['text_alignment']:.4f}  (CLIP, mean of {len(per_image)} {items})")
    pairs = "frame by frame, mean over pairs of clips" if run.clips else "mean over pairs"
    typer.echo(f"set consistency {scores['set_consistency']:.4f}  (DINO, {pairs}, reference included)")
    if scores.get("layout_copying") is not None:
        typer.echo(f"layout copying  {scores['layout_copying']:.4f}  (coarse luminance correlation of each target "
                   "with the reference, mean)")
    if scores.get("temporal_consistency") is not None:
        typer.echo(f"temporal consistency {scores['temporal_consistency']:.4f}  (DINO, neighbouring frames, mean "
                   "over clips)")
    typer.echo(f"wrote {folder / SCORES}")


def list_as_ours(record: Path, name: str) -> None:
    """Add `name` to the files a run.json of ours lists, so that --overwrite deletes it with the set."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and isinstance(data.get("files"), list) and name not in data["files"]:
        write_json_atomic(record, {**data, "files": [*data["files"], name]})
