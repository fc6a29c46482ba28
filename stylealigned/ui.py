"""A local web page for making sets: prompts and knobs in a form, the set back as images. Standard library only.

The pipeline is loaded once; requests are served one at a time (a set at a time uses the whole device).
"""

from __future__ import annotations

import base64
import html
import io
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs

from .cli.common import build_config, check_numbers
from .config import KNOBS, StyleAlignedConfig, knob_help, knobs_of_type
from .errors import UserError
from .sets import generate_set

DEFAULTS = StyleAlignedConfig()
SWITCHES = knobs_of_type("bool")
DEFAULT_ON = tuple(name for name in SWITCHES if getattr(DEFAULTS, name))
TEXT_KNOBS = tuple(name for name in KNOBS if name not in SWITCHES)
FIELDS = {  # name: (label, default)
    "prompts": ("Prompts, one per line (the first is the reference)", "a cat\na dog\na house\na tree"),
    "style": ("Style, appended to every prompt", ""),
    "seed": ("Seed", "0"), "steps": ("Steps", "30"), "guidance": ("Guidance", "7.0"),
    **{name: (f"{name}: {knob_help(name)}", "" if getattr(DEFAULTS, name) is None else str(getattr(DEFAULTS, name)))
       for name in TEXT_KNOBS},
}

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>stylealigned</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}label{{display:block;margin:.4em 0}}
textarea{{width:100%;height:7em}}.set img{{width:200px;margin:4px;image-rendering:pixelated}}
.error{{color:#b00}}figure{{display:inline-block;margin:0}}figcaption{{font-size:12px;width:200px}}</style></head>
<body><h1>stylealigned</h1><p>Model: {model}</p><form method="post" action="/generate">{fields}
<fieldset>{switches}</fieldset><button>Generate</button></form>{result}</body></html>"""


def render_page(model: str, values: dict[str, str], checked: set[str], result: str = "") -> str:
    """The form with the given values, followed by a result (images or an error)."""
    fields = []
    for name, (label, _) in FIELDS.items():
        value = html.escape(values.get(name, ""))
        widget = (f'<textarea name="{name}">{value}</textarea>' if name == "prompts"
                  else f'<input name="{name}" value="{value}">')
        fields.append(f"<label>{label} {widget}</label>")
    switches = "".join(f'<label><input type="checkbox" name="{name}"{" checked" * (name in checked)}> {name}</label>'
                       for name in SWITCHES)
    return PAGE.format(model=html.escape(model), fields="".join(fields), switches=switches, result=result)


def parse_form(body: str) -> tuple[dict[str, str], set[str]]:
    """Field values and the set of ticked switches from an urlencoded form body."""
    form = {name: values[0] for name, values in parse_qs(body, keep_blank_values=True).items()}
    return {name: form.get(name, "") for name in FIELDS}, {name for name in SWITCHES if name in form}


def run_form(pipe, values: dict[str, str], checked: set[str]) -> list[tuple[str, object]]:
    """Generate the set a form asks for: (prompt, image) pairs; bad values are UserErrors."""
    prompts = [line.strip() for line in values["prompts"].splitlines() if line.strip()]
    if not prompts:
        raise UserError("write at least one prompt")
    style = values["style"].strip()
    prompts = [f"{p}, {style}" if style else p for p in prompts]
    try:
        seed, steps, guidance = int(values["seed"]), int(values["steps"]), float(values["guidance"])
        knobs = {name: float(values[name]) if name in knobs_of_type("float") else values[name].strip()
                 for name in TEXT_KNOBS if values[name].strip()}
    except ValueError as error:
        raise UserError(f"a number field holds something else: {error}") from None
    check_numbers(seed=seed, steps=steps, guidance=guidance)
    config = build_config("text-to-image", False, **{name: name in checked for name in SWITCHES}, **knobs)
    try:
        images = generate_set(pipe, prompts, config, seed=seed, num_inference_steps=steps, guidance_scale=guidance)
    except ValueError as error:  # a knob this model refuses, such as shared_layers naming none of its layers
        raise UserError(str(error)) from None
    return list(zip(prompts, images))


def figure(prompt: str, image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(prompt)}</figcaption></figure>'


def make_handler(pipe, model: str):
    """A request handler class serving the form (GET /) and sets (POST /generate) with this pipeline."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/":
                return self.send_error(404)
            self._reply(200, render_page(model, {n: d for n, (_, d) in FIELDS.items()}, set(DEFAULT_ON)))

        def do_POST(self) -> None:
            if self.path != "/generate":
                return self.send_error(404)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8", "replace")
            values, checked = parse_form(body)
            try:
                pairs = run_form(pipe, values, checked)
            except UserError as error:
                return self._reply(400, render_page(model, values, checked,
                                                    f'<p class="error">{html.escape(str(error))}</p>'))
            result = '<div class="set">' + "".join(figure(p, im) for p, im in pairs) + "</div>"
            self._reply(200, render_page(model, values, checked, result))

        def _reply(self, status: int, page: str) -> None:
            data = page.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # keep the terminal for the progress bars
            pass

    return Handler


def serve(pipe, model: str, host: str = "127.0.0.1", port: int = 7860) -> HTTPServer:
    """A server for the page on host:port (port 0 picks a free one); call `.serve_forever()` to run it."""
    return HTTPServer((host, port), make_handler(pipe, model))
