"""`stylealigned ui`: the web app (see stylealigned/ui.py), in the optional extra `stylealigned[ui]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import Device, Dtype, Model, Scheduler, check_numbers


@app.command()
def ui(
    model: Model = "builtin", device: Device = "auto", dtype: Dtype = None, scheduler: Scheduler = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1 = this computer only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: the first free one from 7860).")] = 7860,
    out: Annotated[Path, typer.Option(help="Folder for the run folders, one per job.")] = Path("stylealigned-ui"),
    share: Annotated[bool, typer.Option(help="Also serve through a public gradio.live link.")] = False,
    max_prompts: Annotated[int, typer.Option(help="Most prompts in one set.")] = 16,
    max_steps: Annotated[int, typer.Option(help="Most denoising steps of one job.")] = 100,
    max_side: Annotated[int, typer.Option(help="Most pixels per image side.")] = 1024,
    max_upload_mb: Annotated[int, typer.Option(help="Largest upload, in MB.")] = 20,
) -> None:
    """Serve the web app for making style-aligned sets with one model, until Ctrl-C."""
    import socket

    from ..errors import UserError

    check_numbers(port=port, max_prompts=max_prompts, max_steps=max_steps, max_side=max_side,
                  max_upload_mb=max_upload_mb)
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as error:
        raise UserError(f"cannot listen on --host {host} ({error.strerror}); pass an address of this computer, "
                        "such as 127.0.0.1") from None
    prepare_out(out)
    try:
        from ..ui import Limits, launch
    except ImportError as error:
        raise UserError(f'the web app needs Gradio ({error}): pip install "stylealigned[ui]"') from None
    from ..models import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype, scheduler=scheduler)
    try:
        page = launch(pipe, model, out, Limits(max_prompts, max_steps, max_side, f"{max_upload_mb}mb"), host, port,
                      share, block=False)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error}); pass another --port") from None
    typer.echo(f"stylealigned ui on {page.share_url or page.local_url} (Ctrl-C to stop); run folders in {out}")
    page.block_thread()


def prepare_out(out: Path) -> None:
    """--out must be a folder this process can write in (created if missing), before the server starts."""
    from ..io import writable_folder

    writable_folder(out, "--out")
