"""`stylealigned ui`: the local web page (see stylealigned/ui.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .common import Device, Dtype, Model, Scheduler, check_numbers


@app.command()
def ui(
    model: Model = "builtin", device: Device = "auto", dtype: Dtype = None, scheduler: Scheduler = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1 = this computer only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
) -> None:
    """Serve a local web page for making style-aligned sets with one model, until Ctrl-C."""
    import socket

    from ..errors import UserError
    from ..models import load_pipeline
    from ..ui import serve

    check_numbers(port=port)
    pipe = load_pipeline(model, device=device, dtype=dtype, scheduler=scheduler)
    try:
        server = serve(pipe, model, host, port)
    except socket.gaierror as error:
        raise UserError(f"cannot listen on --host {host} ({error.strerror}); pass an address of this computer, "
                        "such as 127.0.0.1") from None
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); pass another --port") from None
    typer.echo(f"stylealigned ui on http://{host}:{server.server_port} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
