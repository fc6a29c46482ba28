"""The web app: a Gradio Blocks page for style-aligned sets (text to set, and from a reference image); on a video
model (Wan) sets of clips, a player per clip.

One pipeline, loaded once; every job goes through `generate_set` / `invert` one at a time (one concurrency group
on Gradio's queue) and is written to its own run folder under `out`, exactly as the CLI writes it, then zipped.
Endpoints: `/generate_set` and `/transfer` (see the README for a `gradio_client` call).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import os
import re
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .cli.common import (DEFAULT_FPS, LIMITS, PRESETS, RunFolder, build_config, check_numbers, file_digest,
                         fit_to_family, generate_into, video_settings)
from .config import KNOBS, REFERENCE_POSITIONS, StyleAlignedConfig, knob_help, knobs_of_type
from .errors import UserError
from .io import slugify

CUSTOM = "custom"
CACHE, CACHE_AGE = ".gradio", 3600  # Gradio's copies of files under `out`, and the seconds they are kept


@dataclass(frozen=True)
class Limits:
    """What the operator allows one job: prompts in a set, denoising steps, pixels per side, upload bytes."""

    max_prompts: int = 16
    max_steps: int = 100
    max_side: int = 1024
    max_upload: str = "20mb"


class Cancelled(Exception):
    """The user pressed Cancel, or left: the job stops at its next denoiser step."""


STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("stop", default=None)
POLL = 0.2  # seconds between looks at whether a job's client is still there


def stoppable(job):
    """An async Gradio handler running `job` in a thread with STOP set: Cancel (Gradio cancels the task awaiting
    it) or a client that disconnected sets the event, and the job stops at its next denoiser step."""
    signature = inspect.signature(job)

    @functools.wraps(job)
    async def handler(self, *args, **kwargs):
        stop, request = threading.Event(), signature.bind(self, *args, **kwargs).arguments.get("request")
        STOP.set(stop)
        work = asyncio.ensure_future(asyncio.to_thread(job, self, *args, **kwargs))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=POLL)
                if self.client_left(request):
                    stop.set()
            return work.result()
        except asyncio.CancelledError:
            stop.set()
            raise

    return handler


def knob_widget(name: str, value):
    """The widget for one knob, its help as info text, its range enforced by the widget."""
    label, info = name.replace("_", " "), knob_help(name)
    if name in knobs_of_type("bool"):
        return gr.Checkbox(value=value, label=label, info=info)
    if name in knobs_of_type("float"):
        low, high = LIMITS[name]
        return gr.Number(value=value, label=label, info=info, minimum=low, maximum=high)
    if name == "reference_positions":
        return gr.Radio(list(REFERENCE_POSITIONS), value=value, label=label, info=info)
    return gr.Textbox(value="" if value is None else str(value), label=label, info=info)


def widget_value(name: str, value):
    """A knob's value as its widget compares it: text knobs as stripped text, others as they are."""
    if name in knobs_of_type("bool") or name in knobs_of_type("float"):
        return value
    return "" if value is None else str(value).strip()


def preset_values(preset: str, backbone) -> list:
    """Every knob's value in a preset on this backbone's family, in KNOBS order, as its widget shows it."""
    config = backbone.resolve(PRESETS[preset]())
    return [getattr(config, name) if getattr(config, name) is not None else "" for name in KNOBS]


class App:
    """The page and its two jobs for one pipeline; `build()` returns the gr.Blocks."""

    def __init__(self, pipe, model: str, out: Path, limits: Limits = Limits()):
        from .backbones import backbone_for

        self.pipe, self.model, self.out, self.limits = pipe, model, Path(out), limits
        self.backbone = backbone_for(pipe)
        self.native_height, self.native_width = self.backbone.native_size()
        clip: dict = {}
        self.video = video_settings(pipe, clip, None, None) is not None  # clips: frames and fps apply
        self.frames = clip.get("num_frames")  # the pipeline's default clip length
        self.device = threading.Lock()  # a cancelled job's thread may still be finishing its step
        self.page: gr.Blocks | None = None

    # --- the jobs ---

    def config(self, preset: str, knobs: dict, batch_size, shown: str) -> StyleAlignedConfig:
        """With `custom` every knob as the widgets hold it; else the preset, with every knob that differs from both
        the preset and what the tab shows at first (`shown`: so a knob given through the API wins), checked."""
        if preset != CUSTOM:
            unchanged = [dict(zip(KNOBS, preset_values(name, self.backbone))) for name in (preset, shown)]
            knobs = {name: value for name, value in knobs.items()
                     if all(widget_value(name, value) != widget_value(name, each[name]) for each in unchanged)}
        given = {name: (value.strip() or None) if isinstance(value, str) else value for name, value in knobs.items()}
        base = "text-to-image" if preset == CUSTOM else preset
        return fit_to_family(build_config(base, False, **given), given, self.pipe, batch_size or None)

    def settings(self, prompts: list[str], seed, steps, guidance, width, height, batch_size, frames=None,
                 fps=None) -> tuple[dict, int | None]:
        """Check the numbers against the CLI's ranges and this server's limits; the pipeline settings (on a video
        model with the clips' frames) and the MP4s' frames per second (None: a set of images)."""
        if not prompts:
            raise UserError("write at least one prompt (one per line)")
        if len(prompts) > self.limits.max_prompts:
            raise UserError(f"{len(prompts)} prompts, over this server's limit of {self.limits.max_prompts}")
        if None in (seed, steps, guidance, width, height):
            raise UserError("fill in seed, steps, guidance, width and height")
        whole = {"seed": seed, "steps": steps, "width": width, "height": height, "batch size": batch_size or 0}
        for name, value in whole.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
                raise UserError(f"{name} must be a whole number, got {value!r}")
        check_numbers(seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                      batch_size=batch_size or None)
        if steps > self.limits.max_steps:
            raise UserError(f"steps must be at most {self.limits.max_steps} on this server, got {steps}")
        if max(width, height) > self.limits.max_side or width % 8 or height % 8:
            raise UserError(f"width and height must be multiples of 8 up to {self.limits.max_side}, "
                            f"got {width}x{height}")
        settings = {"num_inference_steps": int(steps), "guidance_scale": float(guidance), "width": int(width),
                    "height": int(height)}
        if not self.video:
            return settings, None
        return settings, video_settings(self.pipe, settings, frames and int(frames), fps and int(fps))

    def folder(self, prompts: list[str], parameters: dict, fps: int | None = None) -> RunFolder:
        """A fresh run folder under `out`, named by time and the first prompt, never an existing one (MP4s at `fps`
        for a set of clips)."""
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{slugify(prompts[0], 30)}"
        self.out.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = self.out / (stem if n == 0 else f"{stem}-{n}")
            try:
                path.mkdir()
                return RunFolder(path, prompts, parameters | ({} if fps is None else {"fps": fps}), fps=fps)
            except FileExistsError:
                continue
        raise UserError(f"cannot find a free run folder name under {self.out}")

    def client_left(self, request: gr.Request | None) -> bool:
        """Whether the client of this request disconnected (Gradio marks its running events dead)."""
        queue, session = getattr(self.page, "_queue", None), getattr(request, "session_hash", None)
        events = [event for jobs in getattr(queue, "active_jobs", None) or [] for event in jobs or []
                  if getattr(event, "session_hash", None) == session]
        return session is not None and any(not event.alive for event in events)

    @contextlib.contextmanager
    def on_device(self, desc: str):
        """The device for this job alone; every denoiser call first checks the job's STOP event."""
        stop = STOP.get() or threading.Event()  # None: called outside a Gradio handler

        def check(*_):
            if stop.is_set():
                raise Cancelled

        with self.device:
            check()
            self.pipe.set_progress_bar_config(desc=desc)
            hook = self.backbone.denoiser.register_forward_pre_hook(check)
            try:
                yield
            finally:
                hook.remove()

    def run(self, folder: RunFolder, produce, batch_size, extra=()) -> tuple[list, str, str]:
        """Generate into the folder on the device; the gallery, the zip and a one-line status."""
        with self.on_device("denoising"):
            generate_into(folder, folder.open(resume=False, overwrite=False), produce, batch_size or None,
                          grid_extra=list(extra))
        zip_path = folder.path.with_suffix(".zip")
        with zipfile.ZipFile(zip_path, "w") as archive:
            for name in [*folder.outputs, "run.json"]:
                archive.write(folder.path / name, f"{folder.path.name}/{name}")
        gallery = [(image, label) for label, image in extra]
        gallery += [(str(file), f"{i}: {folder.prompts[i]}") for i, file in folder.files.items()]
        made = "images" if folder.fps is None else "clips"
        return gallery, str(zip_path), f"Done: {len(folder.prompts)} {made} in run folder {folder.path.name}"

    @stoppable
    def generate_set(self, prompts: str, style: str, preset: str, seed, steps, guidance, width, height, batch_size,
                     request: gr.Request, progress=gr.Progress(track_tqdm=True), frames=None, fps=None, **knobs):
        """Text to set: the first prompt's image (or clip, on a video model) is the reference."""
        with messages():
            lines = styled(prompts, style)
            settings, fps = self.settings(lines, seed, steps, guidance, width, height, batch_size, frames, fps)
            config = self.config(preset, knobs, batch_size, "text-to-image")
            folder = self.folder(lines, {"command": "generate", "model": self.model, "style": style or None,
                                         "seed": int(seed), "scheduler": "auto", "dtype": str(self.pipe.dtype),
                                         **settings, "batch_size": batch_size or None, "config": config.to_dict(),
                                         "preset": preset}, fps)
            progress(0, desc="denoising")

            def produce(todo, on_image):
                from .sets import generate_set

                generate_set(self.pipe, lines, config, seed=int(seed), batch_size=batch_size or None, indices=todo,
                             on_image=on_image, **settings)

            return self.run(folder, produce, batch_size)

    @stoppable
    def transfer(self, reference, reference_prompt: str, inversion: str, prompts: str, style: str, preset: str,
                 seed, steps, guidance, width, height, batch_size, request: gr.Request,
                 progress=gr.Progress(track_tqdm=True), frames=None, fps=None, **knobs):
        """From a reference image: invert it, then a set of targets in its style (00 is its reconstruction; on a
        video model the image is a one-frame clip that every target clip attends to)."""
        from .inversion import MODES, invert
        from .io import load_image

        with messages():
            if reference is None:
                raise UserError("upload a reference image (drop, paste or click the image box)")
            if not (reference_prompt or "").strip():
                raise UserError("describe the reference image in the reference prompt")
            if inversion not in MODES:
                raise UserError(f"inversion must be one of {', '.join(MODES)}, got {inversion!r}")
            targets = styled(prompts, style)
            if not targets:
                raise UserError("write at least one target prompt (one per line)")
            settings, fps = self.settings(targets + [reference_prompt], seed, steps, guidance, width, height,
                                          batch_size, frames, fps)
            config = self.config(preset, knobs, batch_size, "transfer")
            image = load_image(reference, settings["width"], settings["height"])
            inversion_guidance = settings["guidance_scale"] if self.backbone.embedded_guidance else 2.0
            with self.on_device("inverting"):
                progress(0, desc="inverting")
                trajectory = invert(self.pipe, image, reference_prompt.strip(), settings["num_inference_steps"],
                                    guidance_scale=inversion_guidance, mode=inversion, seed=int(seed))
            folder = self.folder([trajectory.prompt] + targets, {
                "command": "transfer", "model": self.model, "style": style or None, "seed": int(seed),
                "scheduler": "auto", "dtype": str(self.pipe.dtype), **settings, "batch_size": batch_size or None,
                "config": config.to_dict(), "preset": preset, "reference": Path(reference).name,
                "reference_sha256": file_digest(reference), "inversion": inversion,
                "inversion_guidance": inversion_guidance, "offset": 0}, fps)
            progress(0, desc="denoising")

            def produce(todo, on_image):
                from .sets import generate_set

                generate_set(self.pipe, targets, config, reference=trajectory, seed=int(seed),
                             batch_size=batch_size or None, indices=todo, on_image=on_image, **settings)

            return self.run(folder, produce, batch_size, extra=[("reference (input)", image)])

    def cancel(self) -> str:
        """The Cancel button's message; its `cancels` makes Gradio cancel this session's job, which stops it."""
        return "Cancelled."

    # --- the page ---

    def settings_panel(self, name: str, preset: str) -> tuple[list, dict]:
        """Preset, seed, steps, guidance, size, batch size and every knob; (fixed inputs, knob widgets)."""
        preset_box = gr.Radio([*PRESETS, CUSTOM], value=preset, label="Preset",
                              info="Starting knobs: text-to-image (the paper's default), transfer (score shift "
                                   "log 2), or custom (the knobs below as you set them).")
        with gr.Row():
            seed = gr.Number(0, label="Seed", info="Image i starts from noise seeded by seed + i.", precision=0,
                             minimum=0, maximum=2**31 - 1)
            steps = gr.Slider(1, self.limits.max_steps, value=min(30, self.limits.max_steps), step=1, label="Steps",
                              info=f"Denoising steps (this server allows up to {self.limits.max_steps}).",
                              elem_id=f"{name}-steps")
            guidance = gr.Slider(0, LIMITS["guidance"][1], value=self.backbone.default_guidance(), step=0.5,
                                 label="Guidance", info="Classifier-free guidance scale.")
        side = 16 if self.video else 8  # Wan: whole 2x2 patches of its 8x latents
        with gr.Row():
            width = gr.Slider(side, self.limits.max_side, value=self.native_width, step=side, label="Width",
                              info=f"Pixels, a multiple of {side}.", elem_id=f"{name}-width")
            height = gr.Slider(side, self.limits.max_side, value=self.native_height, step=side, label="Height",
                               info=f"Pixels, a multiple of {side}.", elem_id=f"{name}-height")
            batch = gr.Number(0, label="Batch size", precision=0, minimum=0, maximum=LIMITS["batch_size"][1],
                              info="Targets per denoiser call, to bound memory; 0 = all at once.")
        values = functools.partial(preset_values, backbone=self.backbone)
        with gr.Accordion("Knobs", open=False):
            knobs = {name: knob_widget(name, value) for name, value in zip(KNOBS, values(preset))}
        preset_box.input(lambda name: values(name) if name != CUSTOM else [gr.update()] * len(KNOBS), preset_box,
                         list(knobs.values()), api_visibility="private", queue=False)
        for widget in knobs.values():
            widget.input(lambda: CUSTOM, None, preset_box, api_visibility="private", queue=False)
        return [preset_box, seed, steps, guidance, width, height, batch], knobs

    def clip_panel(self, name: str) -> list:
        """Frames per clip and frames per second, shown on a video model only."""
        with gr.Row(visible=self.video):
            frames = gr.Number(self.frames, label="Frames", precision=0,
                               minimum=1, maximum=LIMITS["frames"][1], elem_id=f"{name}-frames",
                               info="Frames per clip (Wan: one more than a multiple of 4).")
            fps = gr.Number(DEFAULT_FPS, label="FPS", precision=0, minimum=1, maximum=LIMITS["fps"][1],
                            info="Frames per second of the MP4s.")
        return [frames, fps]

    def outputs(self, name: str) -> list:
        contents = "MP4s" if self.video else "PNGs with their metadata"
        gallery = gr.Gallery(label="Set: a player per clip" if self.video else "Set", columns=5, format="png",
                             elem_id=f"{name}-gallery", object_fit="contain")
        archive = gr.File(label=f"Download the set (zip: {contents}, grid.png, run.json)", elem_id=f"{name}-zip")
        status = gr.Markdown(elem_id=f"{name}-status")
        return [gallery, archive, status]

    def build(self) -> gr.Blocks:
        """The page. Gradio's copies of outputs and uploads go to `out`/.gradio (unless GRADIO_TEMP_DIR names a
        folder: Gradio reads it anew on every request, so the first app of a process sets it for all), deleted
        after an hour and when the server closes."""
        os.environ.setdefault("GRADIO_TEMP_DIR", str((self.out / CACHE).resolve()))
        with gr.Blocks(title="stylealigned", delete_cache=(CACHE_AGE, CACHE_AGE)) as page:
            gr.Markdown(f"# stylealigned\nStyle-aligned {'video' if self.video else 'image'} sets with model "
                        f"`{self.model}`. "
                        f"Up to {self.limits.max_prompts} prompts and {self.limits.max_steps} steps a set; "
                        "one job on the device at a time, the others wait in the queue.")
            with gr.Tab("Text to video set" if self.video else "Text to set"):
                prompts = gr.Textbox("a circle\na square\na triangle", lines=4, label="Prompts",
                                     info="One per line; the first is the reference.", elem_id="set-prompts")
                style = gr.Textbox("", label="Style", info='Appended to every prompt as "PROMPT, STYLE".')
                fixed, knobs = self.settings_panel("set", "text-to-image")
                fixed += self.clip_panel("set")
                with gr.Row():
                    go, stop = gr.Button("Generate", variant="primary", elem_id="set-go"), gr.Button("Cancel")
                outputs = self.outputs("set")
                job = go.click(self.generate_set, [prompts, style, *fixed], outputs, inputs_kwargs=knobs,
                               api_name="generate_set", concurrency_id="device", concurrency_limit=1)
                stop.click(self.cancel, None, outputs[2], cancels=[job], api_visibility="private", queue=False)
            with gr.Tab("From a reference image"):
                with gr.Row():
                    reference = readable_upload(gr.Image(type="filepath", sources=["upload", "clipboard"],
                                                         label="Reference image", elem_id="transfer-reference"))
                    with gr.Column():
                        reference_prompt = gr.Textbox("", label="Reference prompt",
                                                      info="Text describing the reference image.",
                                                      elem_id="transfer-reference-prompt")
                        inversion = gr.Radio(["ddim", "noise"], value="ddim", label="Inversion",
                                             info="ddim (faithful) or noise (forward noising, no denoiser calls).")
                targets = gr.Textbox("a square\na triangle", lines=3, label="Target prompts",
                                     info="One per line, each made in the reference's style.",
                                     elem_id="transfer-prompts")
                target_style = gr.Textbox("", label="Style", info='Appended to every target as "PROMPT, STYLE".')
                fixed, knobs = self.settings_panel("transfer", "transfer")
                fixed += self.clip_panel("transfer")
                with gr.Row():
                    go, stop = gr.Button("Generate", variant="primary", elem_id="transfer-go"), gr.Button("Cancel")
                outputs = self.outputs("transfer")
                job = go.click(self.transfer, [reference, reference_prompt, inversion, targets, target_style, *fixed],
                               outputs, inputs_kwargs=knobs, api_name="transfer", concurrency_id="device",
                               concurrency_limit=1)
                stop.click(self.cancel, None, outputs[2], cancels=[job], api_visibility="private", queue=False)
        self.page = page
        return page.queue(default_concurrency_limit=1)


def styled(prompts: str, style: str) -> list[str]:
    """Non-empty lines of a text box, each with the style appended."""
    style = (style or "").strip()
    return [f"{p}, {style}" if style else p for p in (line.strip() for line in (prompts or "").splitlines()) if p]


def field_names(message: str) -> str:
    """A message as the page says it: the CLI's option names (--batch-size) become the fields' (batch size)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda flag: flag.group(1).replace("-", " "), message)


def readable_upload(component: gr.Image) -> gr.Image:
    """The image box, whose failure to read an upload (a text file, a huge header) is one sentence on the page."""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception:
            raise gr.Error("The reference is not an image this app can read; upload a PNG, JPEG or WebP image "
                           "of at most 100 megapixels.") from None

    component.preprocess = checked
    return component


@contextlib.contextmanager
def messages():
    """Turn every failure inside the block into a gr.Error: a message on the page, never a traceback or a blank."""
    try:
        yield
    except gr.Error:
        raise
    except Cancelled:
        raise gr.Error("Cancelled; the images made so far are in the run folder.") from None
    except (UserError, ValueError) as error:
        raise gr.Error(field_names(str(error))) from None
    except Exception as error:
        raise gr.Error(f"Generation failed ({type(error).__name__}: {error}); the server is still up.") from None


def launch(pipe, model: str, out: Path, limits: Limits = Limits(), host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, block: bool = True) -> gr.Blocks:
    """Serve the app on host:port (0: a free port); `block=False` returns at once (the URL is `.local_url`)."""
    page = App(pipe, model, out, limits).build()
    page.launch(server_name=host, server_port=port or None, share=share, max_file_size=limits.max_upload,
                prevent_thread_lock=not block, allowed_paths=[str(Path(out).resolve())], show_error=True,
                quiet=True)
    return page
