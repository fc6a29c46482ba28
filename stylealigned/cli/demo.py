"""`stylealigned demo`: style-aligned sets from the built-in model, offline, in about a minute on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import Device, Overwrite, check_numbers


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder (grid.png, demo.json).")] = Path("stylealigned-demo"),
    sets: Annotated[int, typer.Option(help="Sets of 4 to generate, each without and with sharing.")] = 3,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    model: Annotated[str, typer.Option(
        help="builtin (the UNet) or builtin-flux (the FLUX.1-style transformer); both know the same toy world.")
    ] = "builtin",
    threads: Annotated[int, typer.Option(
        help="CPU threads; the built-in model is small, so more rarely help and slow a busy machine down.")] = 1,
    seed: Annotated[int, typer.Option(help="Picks the sets and their starting noise.")] = 0,
    device: Device = "auto", overwrite: Overwrite = False,
) -> None:
    """Generate sets of 4 with a built-in model without and with sharing, and one transfer from a drawing."""
    from ..errors import UserError
    from ..io import discard_earlier, prepare_output_dir, restore_earlier
    from ..models import BUILTIN_MODELS

    check_numbers(sets=sets, steps=steps, threads=threads, seed=seed)
    if model not in BUILTIN_MODELS:
        raise UserError(f"--model must be a built-in model ({', '.join(BUILTIN_MODELS)}), got {model!r}; the demo "
                        "judges sets with the toy world's classifier")
    ours = ["grid.png", "demo.json"]
    prepare_output_dir(out, overwrite=overwrite, outputs=ours, record="demo.json", listed=lambda _: ours,
                       resumable=False)
    try:
        _run(out, model, sets, steps, threads, seed, device)
    except BaseException:
        restore_earlier(out)  # what --overwrite set aside, back in place
        raise
    discard_earlier(out)


def _run(out: Path, model: str, sets: int, steps: int, threads: int, seed: int, device: str) -> None:
    """The demo's work once its folder is ready: generate, judge, write grid.png and demo.json, report."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    from ..demo import TARGETS, load_judge, run_demo
    from ..io import save_png, write_json_atomic
    from ..models import load_pipeline

    classifier = load_judge()
    diffusers_logging.disable_progress_bar()  # one progress bar, over the images, is enough
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    images = 2 * sets * (TARGETS + 1) + TARGETS
    with tqdm(total=images, desc="generating", unit="image") as progress:
        result = run_demo(pipe, classifier, sets, steps, seed, on_image=lambda *_: progress.update())
    save_png(result.grid, out / "grid.png", {"command": "demo", "model": model, "sets": sets, "steps": steps,
                                             "seed": seed})
    write_json_atomic(out / "demo.json", result.summary)
    agreement, accuracy = result.summary["style_agreement"], result.summary["object_accuracy"]
    typer.echo(f"style agreement with the reference: {agreement['shared']:.2f} shared vs "
               f"{agreement['unshared']:.2f} not shared ({sets} sets of {TARGETS + 1}, same seeds)")
    typer.echo(f"object accuracy: {accuracy['shared']:.2f} shared vs {accuracy['unshared']:.2f} not shared; "
               f"transfer from a drawn {result.transfer_set.style} {result.transfer_set.object}: "
               f"{result.transfer_agreement:.2f} style agreement")
    typer.echo(f"wrote {out / 'grid.png'} and {out / 'demo.json'}")
