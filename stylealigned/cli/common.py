"""What `generate` and `transfer` share: options, the config from flags, and writing a set to a run folder."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer

from ..config import KNOBS, StyleAlignedConfig, knob_help, knob_type, knobs_of_type
from ..errors import UserError
from ..io import (contact_sheet, discard_earlier, image_filename, make_grid, prepare_output_dir, read_png_metadata,
                  read_video, restore_earlier, save_png, save_video, write_json_atomic)

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def _max_size() -> int:
    """Pixels per side: 4096, or the variable STYLEALIGNED_MAX_SIZE where it holds a whole number."""
    text = os.environ.get("STYLEALIGNED_MAX_SIZE", "").strip()
    return int(text) if text.isdigit() else 4096


MAX_SIZE = _max_size()
MAX_PROMPTS_FILE = 10_000_000  # bytes
LIMITS = {  # every numeric option of every command: (lowest, highest); NaN and infinities lie in no range
    "seed": (0, 2**63 - 1), "steps": (1, 1000), "guidance": (0, 100), "width": (8, MAX_SIZE), "height": (8, MAX_SIZE),
    "batch_size": (1, 4096), "offset": (0, 999), "inversion_guidance": (0, 100), "shared_score_scale": (0, 100),
    "shared_score_shift": (-100, 100), "share_until": (0, 1), "port": (0, 65535), "sets": (1, 100),
    "threads": (1, 1024), "styles": (1, 100),
    "control_scale": (0, 10),  # 0 itself is refused by the ControlNet options (no control at all)
    "reference_weight": (0, 10**6), "window": (8, MAX_SIZE), "stride": (8, MAX_SIZE),
    "frames": (1, 1000), "fps": (1, 240),  # clips, on video models
    # the web app operator's limits on one job
    "max_prompts": (1, 1000), "max_steps": (1, 1000), "max_side": (8, MAX_SIZE), "max_upload_mb": (1, 10_000),
}


def check_numbers(**values) -> None:
    """Refuse a numeric option (None: not given) outside its LIMITS range, naming the option (or knob) and range."""
    for name, value in values.items():
        low, high = LIMITS[name]
        if value is not None and not low <= value <= high:
            label = name if name in KNOBS else "--" + name.replace("_", "-")
            raise UserError(f"{label} must lie in {low}..{high}, got {value}; pass a value in that range")


class Interrupted(Exception):
    """Ctrl-C or a kill during generation: finished images are on disk, the rest can be resumed."""
PRESETS = {"text-to-image": StyleAlignedConfig.text_to_image, "transfer": StyleAlignedConfig.transfer,
           "guided": StyleAlignedConfig.guided}

# Options shared by every command that generates a set.
Prompts = Annotated[Optional[list[str]], typer.Argument(help="Prompts; the first one is the reference.")]
PromptsFile = Annotated[Optional[Path], typer.Option(help="Text file with one prompt per line (added after PROMPTS).")]
Style = Annotated[Optional[str], typer.Option(help='Appended to every prompt as "PROMPT, STYLE".')]
Model = Annotated[str, typer.Option(
    help="Hub id, local diffusers folder, single .safetensors file, 'builtin' or 'builtin-flux'.")]
Out = Annotated[Path, typer.Option(help="Output folder (one PNG per image, grid.png, run.json).")]
Seed = Annotated[int, typer.Option(help="Image i starts from noise seeded by SEED + i.")]
Steps = Annotated[int, typer.Option(help="Denoising steps.")]
Guidance = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the pipeline's).")]
Size = Annotated[Optional[int], typer.Option(
    help=f"Pixels, a multiple of 8 up to {MAX_SIZE} (the variable STYLEALIGNED_MAX_SIZE raises it); "
         "default: the model's native size.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[Optional[str], typer.Option(help="fp16, bf16 or fp32 (default: fp16 on GPUs, fp32 on CPU).")]
Scheduler = Annotated[str, typer.Option(
    help="auto (DDIM, the paper's, on UNets; the model's own on flow models), ddim, euler, euler-a, dpm++, unipc, "
         "pndm, or model.")]
Negative = Annotated[Optional[str], typer.Option(help="Negative prompt for every image.")]
BatchSize = Annotated[Optional[int], typer.Option(
    help="Bounds memory for large sets: targets per denoiser call, images per ControlNet call and per decode; "
         "waves of 8x this.")]
Resume = Annotated[bool, typer.Option(help="Complete an interrupted run in --out with the same parameters.")]
Overwrite = Annotated[bool, typer.Option(help="Replace earlier results in --out.")]
NoShare = Annotated[bool, typer.Option("--no-share", help="Baseline: the plain model, nothing shared.")]
Preset = Annotated[str, typer.Option(
    help="Starting knobs: text-to-image (paper default), transfer, or guided (true-CFG transformers).")]
ReferencePrompts = Annotated[Optional[list[str]], typer.Option(
    "--reference-prompt", help="A reference's prompt, repeatable: with references every PROMPT is a target, and "
                               "targets mix the references' styles (--reference-weight).")]
ReferenceWeights = Annotated[Optional[list[float]], typer.Option(
    "--reference-weight", help="With several references: how much targets take from each, once per reference in "
                               "order (>= 0, normalised; default equal).")]
Frames = Annotated[Optional[int], typer.Option(
    help="Frames per clip, on video models (Wan: one more than a multiple of 4; default: the pipeline's, 81).")]
Fps = Annotated[Optional[int], typer.Option(help="Frames per second of the MP4s, on video models (default 16).")]
DEFAULT_FPS = 16  # Wan's
SCORES = "scores.json"  # what `stylealigned score` writes into a run folder
Loras = Annotated[Optional[list[str]], typer.Option(
    "--lora", help="LoRA weights to load, PATH[:SCALE] (a .safetensors file or its folder; scale 1); repeatable.")]
OPTION_TYPES = {"bool": bool, "float": float}  # every other knob is given as text


def with_knob_options(command: Callable) -> Callable:
    """Give a typer command one option per StyleAlignedConfig knob (unset: the preset's value); the command
    receives them as `knobs`, a dict of the values given."""
    signature = inspect.signature(command, eval_str=True)
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[OPTION_TYPES.get(knob_type(name), str)], typer.Option(show_default=False, help=knob_help(name))])
        for name in KNOBS]

    @functools.wraps(command)
    def run(**kwargs):
        return command(**{name: kwargs[name] for name in signature.parameters if name != "knobs"},
                       knobs={option.name: kwargs[option.name] for option in options})

    run.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "knobs"] + options)
    run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
    return run


def fit_to_family(config: StyleAlignedConfig, knobs: dict, pipe, batch_size: int | None) -> StyleAlignedConfig:
    """The config for this pipeline's family: the knobs left to the family take its values, a preset's norm sharing
    is dropped where the family has no such norms (FLUX, SD3), unless the user asked for it (then it is refused with
    the reason), and every knob checked against the model (layer names) and the batch size, before anything is
    written."""
    from ..apply import layers_to_share
    from ..backbones import backbone_for

    backbone = backbone_for(pipe)
    norms = ("share_group_norm", "share_layer_norm")  # a preset's are fitted, the user's kept (and checked below)
    config = backbone.fit_preset(config).replace(**{name: getattr(config, name) for name in norms
                                                    if knobs.get(name) is not None})
    backbone.check_config(config)
    if batch_size and config.full_attention_share:
        raise UserError("full_attention_share shares among all images at once, so it cannot run in batches; "
                        "drop --batch-size or --full-attention-share")
    try:
        layers_to_share(backbone, config)
    except ValueError as error:
        raise UserError(f"{error}; pass a fraction or a part of one of these names") from None
    return config


def build_config(preset: str, no_share: bool, **knobs) -> StyleAlignedConfig:
    """The preset with every knob given on the command line applied; invalid values become UserErrors."""
    if preset not in PRESETS:
        raise UserError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if no_share:
        return StyleAlignedConfig.disabled()
    check_numbers(**{name: knobs.get(name) for name in knobs_of_type("float")})
    changes = {name: value for name, value in knobs.items() if value is not None}
    if "shared_layers" in changes:
        text = changes["shared_layers"]
        try:
            changes["shared_layers"] = float(text)
        except ValueError:
            changes["shared_layers"] = text
    try:
        return PRESETS[preset](**changes)
    except ValueError as error:
        raise UserError(f"invalid knob: {error}") from None


def read_prompts(prompts: list[str] | None, prompts_file: Path | None, style: str | None) -> list[str]:
    """Prompts from the arguments and the file, with the style appended; none at all is a UserError."""
    prompts = list(prompts or [])
    check_not_empty(prompts, "a prompt argument")
    if prompts_file is not None:
        try:
            with open(prompts_file, "rb") as file:
                data = file.read(MAX_PROMPTS_FILE + 1)
            if len(data) > MAX_PROMPTS_FILE:
                raise UserError(f"--prompts-file {prompts_file} is over {MAX_PROMPTS_FILE // 1_000_000} MB; "
                                "pass a text file with one prompt per line")
            prompts += [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --prompts-file {prompts_file}: {error}") from None
    if not prompts:
        raise UserError("no prompts given; pass prompts as arguments or --prompts-file FILE")
    return [f"{p}, {style}" if style else p for p in prompts]


def check_not_empty(texts: list[str], what: str) -> None:
    """Every prompt must hold some text."""
    if not all(text.strip() for text in texts):
        raise UserError(f"{what} is empty; write some text in every prompt, or leave it out")


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    from .. import __version__

    return {"stylealigned": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


@dataclass
class RunFolder:
    """Where a set is written: NN-<slug>.png per position (a set of clips: NN-<slug>.mp4 at `fps` frames per
    second), grid.png (for clips, a contact sheet) and run.json holding `parameters` and the SHA-256 of every file
    written so far (what a resume checks before it keeps or replaces a file)."""

    path: Path
    prompts: list[str]
    parameters: dict
    files: dict[int, Path] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    written: int = 0
    kept: list[str] = field(default_factory=list)  # files of ours besides the outputs that run.json keeps listing
    resumable = True  # whether the command has --resume
    fps: int | None = None  # a set of clips

    def __post_init__(self) -> None:
        suffix = ".png" if self.fps is None else ".mp4"
        self.files = {i: (self.path / image_filename(i, p)).with_suffix(suffix) for i, p in enumerate(self.prompts)}

    @property
    def outputs(self) -> list[str]:
        """The files this set writes besides run.json, which lists them: overwriting deletes these and no others."""
        return [file.name for file in self.files.values()] + ["grid.png"]

    def open(self, resume: bool, overwrite: bool) -> list[int]:
        """Create or reopen the folder; returns the positions still to generate."""
        earlier = self.path / "run.json"
        resuming = resume and earlier.exists()
        prepare_output_dir(self.path, overwrite=overwrite, resume=resume, outputs=self.outputs,
                           resumable=self.resumable)
        if resuming and (differ := self._differences(earlier)):
            raise UserError(f"{self.path} holds a run with other parameters ({', '.join(differ)}); rerun the same "
                            "command to resume, or pass --overwrite")
        todo = [i for i, file in self.files.items() if not file.exists()]
        if resuming:
            record = json.loads(earlier.read_text(encoding="utf-8"))
            self._check_ours(record.get("sha256") or {})
            self._keep_or_drop_scores(record.get("files") or [], todo)
        return todo

    def _keep_or_drop_scores(self, listed: list, todo: list[int]) -> None:
        """The scores.json `stylealigned score` wrote (run.json lists it) describe the set as it was: deleted when the
        resume will change the set, else kept on the list."""
        scores = self.path / SCORES
        if SCORES not in listed or not scores.is_file() or scores.is_symlink():
            return
        if todo:
            scores.unlink()
        else:
            self.kept.append(SCORES)

    def _check_ours(self, recorded: dict) -> None:
        """Refuse to resume where a file at one of our names is not the one this run wrote (run.json's digest, or
        for an image written by another process, our metadata for its position)."""
        for position, file in [*self.files.items(), (None, self.path / "grid.png")]:
            if not (file.exists() or file.is_symlink()):
                continue
            if not (_recorded(file, recorded) if file.name in recorded else self._our_metadata(file, position)):
                raise UserError(f"{file} is not the file this run wrote (run.json lists another); move it away, "
                                "then rerun with --resume")
            self.digests[file.name] = file_digest(file)

    def _our_metadata(self, file: Path, position: int | None) -> bool:
        try:
            metadata = read_png_metadata(file) if file.is_file() else {}
        except (OSError, ValueError):
            return False
        expected = json.loads(json.dumps(self.parameters))
        return metadata.get("position") == position and all(metadata.get(k) == v for k, v in expected.items())

    def _differences(self, earlier: Path) -> list[str]:
        """What differs between this set and the one recorded in `earlier`: prompts, style, model, reference, ..."""
        now = json.loads(json.dumps({"prompts": self.prompts, **self.parameters}))
        try:
            record = json.loads(earlier.read_text(encoding="utf-8"))
            before = {"prompts": record.get("prompts"), **record.get("parameters", {})}
        except (ValueError, AttributeError, TypeError):
            return ["an unreadable run.json"]
        return sorted(name for name in now.keys() | before.keys() if now.get(name) != before.get(name))

    def write_record(self, complete: bool) -> None:
        write_json_atomic(self.path / "run.json", {"parameters": self.parameters, "prompts": self.prompts,
                                                   "style": self.parameters.get("style"), "complete": complete,
                                                   "files": self.outputs + self.kept, "sha256": self.digests,
                                                   "versions": versions()})

    def save(self, position: int, image) -> None:
        """Write the image (or the clip: a list of frames) at `position`."""
        if self.fps is not None:
            self._written(self.files[position], lambda path: save_video(image, path, self.fps))
            return
        self._written(self.files[position], lambda path: save_png(
            image, path, {**self.parameters, "position": position, "prompt": self.prompts[position],
                          "seed_of_image": self.parameters["seed"] + position}))

    def _written(self, path: Path, write: Callable[[Path], None]) -> None:
        """Write one of our files, record its digest, and on the first one delete the earlier run set aside."""
        write(path)
        self.digests[path.name] = file_digest(path)
        if not self.written:
            discard_earlier(self.path)
        self.written += 1

    def write_grid(self, extra: list[tuple[str, object]] = ()) -> Path:
        from PIL import Image

        if self.fps is not None:
            labels = [f"{i}: {p}" for i, p in enumerate(self.prompts)]
            sheet = contact_sheet([read_video(file) for file in self.files.values()], labels)
            self._written(self.path / "grid.png", lambda path: save_png(sheet, path, self.parameters))
            return self.path / "grid.png"
        images = [(label, image) for label, image in extra]
        images += [(f"{i}: {p}", Image.open(file)) for (i, p), file in zip(enumerate(self.prompts), self.files.values())]
        grid = make_grid([image for _, image in images], columns=min(len(images), 5),
                         labels=[label for label, _ in images])
        self._written(self.path / "grid.png", lambda path: save_png(grid, path, self.parameters))
        return self.path / "grid.png"

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Put back the earlier run (which --overwrite set aside) if the block fails before our first file."""
        try:
            yield
        except BaseException:
            if not self.written:
                restore_earlier(self.path)
            raise

    def collect_digests(self) -> None:
        """The digests of images other processes wrote (under accelerate), read from disk."""
        for file in self.files.values():
            if file.name not in self.digests and file.exists():
                self.digests[file.name] = file_digest(file)


def _recorded(file: Path, recorded: dict) -> bool:
    return file.is_file() and file_digest(file) == recorded[file.name]


def write_failure(error: OSError, fallback: Path, then: str) -> UserError:
    """One line for a failed write: which file, why in words, and what to do about it, then `then`."""
    name = error.filename or fallback
    fixes = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
             errno.EACCES: f"allow writing to {Path(name).parent}", errno.EPERM: f"allow writing to {Path(name)}",
             errno.EROFS: "choose a writable folder", errno.EISDIR: f"move the folder {name} away",
             errno.ENOENT: f"the folder {Path(name).parent} was removed or renamed meanwhile; put it back"}
    fix = fixes.get(error.errno, "fix the cause")
    return UserError(f"cannot write {name} ({error.strerror or error}); {fix} and {then}")


def generate_into(folder: RunFolder, todo: list[int], produce: Callable[[list[int], Callable], None],
                  batch_size: int | None, grid_extra: list[tuple[str, object]] = (), references: int = 1) -> bool:
    """Run `produce(positions, on_image)` for this process's share of `todo`, then write grid.png and run.json.

    Under `accelerate launch` each process takes its share of the set's waves (all compute the same reference).
    Returns whether this is the main process (the one that reports). A failed write (a full disk) is a UserError.
    A failure before the first image is written puts back the earlier run that --overwrite set aside.
    """
    from accelerate import PartialState

    from ..sets import waves_of

    state = PartialState()
    waves = [[i for i in todo if i in wave] for wave in waves_of(len(folder.prompts), batch_size, None, references)]

    def on_image(position: int, image) -> None:
        folder.save(position, image)
        if state.is_main_process:
            folder.write_record(complete=False)

    try:
        with folder.restoring():
            _write_set(folder, state, waves, produce, on_image, grid_extra)
    except OSError as error:
        raise write_failure(error, folder.path, f"rerun the same command with --resume (finished images are kept in "
                            f"{folder.path})") from None
    return state.is_main_process


def _write_set(folder: RunFolder, state, waves: list[list[int]], produce: Callable, on_image: Callable,
               grid_extra) -> None:
    """generate_into's work: run.json, this process's waves, then (main process) grid.png and the final record."""
    if state.is_main_process:
        folder.write_record(complete=False)
    with state.split_between_processes([wave for wave in waves if wave]) as mine:
        try:
            if mine:
                produce([i for wave in mine for i in wave], on_image)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: finished images are kept in {folder.path}; "
                              "rerun the same command with --resume to complete the set") from None
    state.wait_for_everyone()
    if state.is_main_process:
        folder.write_grid(grid_extra)
        folder.collect_digests()
        folder.write_record(complete=True)


def load(model: str, device: str, dtype: str | None, scheduler: str, steps: int, guidance: float | None,
         width: int | None, height: int | None, negative_prompt: str | None, loras: list[str] | None = None):
    """The pipeline on this process's device (with the --lora weights loaded), and the pipeline settings every
    image of the set shares."""
    from accelerate import PartialState

    from ..backbones import backbone_for
    from ..models import load_loras, load_pipeline, lora_files

    check_numbers(steps=steps, guidance=guidance, width=width, height=height)
    lora_files(loras or [])  # fail before a slow load
    for flag, size in (("--width", width), ("--height", height)):
        if size is not None and size % 8:
            low = size - size % 8
            raise UserError(f"{flag} must be a multiple of 8, got {size}; pass {low} or {low + 8}")
    state = PartialState()
    if device == "auto" and state.num_processes > 1:
        device = str(state.device)
    pipe = load_pipeline(model, device=device, dtype=dtype, scheduler=scheduler)
    load_loras(pipe, loras or [])
    backbone = backbone_for(pipe)
    native_height, native_width = backbone.native_size()
    width, height = width or native_width, height or native_height
    _check_steps(pipe, backbone, steps, width, height)
    settings = {"num_inference_steps": steps, "width": width, "height": height}
    if guidance is not None:
        settings["guidance_scale"] = guidance
    if negative_prompt:
        settings["negative_prompt"] = negative_prompt
    return pipe, settings


def video_settings(pipe, settings: dict, frames: int | None, fps: int | None) -> int | None:
    """On a video pipeline (its call takes num_frames): the clip length into `settings` (default the pipeline's)
    and the MP4s' frames per second; on an image pipeline None, and --frames or --fps are a UserError."""
    check_numbers(frames=frames, fps=fps)
    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_frames")
    if parameter is None:
        if frames is not None or fps is not None:
            raise UserError(f"--frames and --fps apply to video models; {type(pipe).__name__} makes images")
        return None
    from ..backbones import backbone_for

    settings["num_frames"] = frames or parameter.default
    backbone_for(pipe).read_settings(settings)  # refuses a clip length or size the model cannot make, before writing
    return fps or DEFAULT_FPS


def fit_to_references(config: StyleAlignedConfig, knobs: dict, count: int) -> StyleAlignedConfig:
    """With several references a preset's GroupNorm sharing (which takes one reference) is dropped; asked for with
    --share-group-norm, it is refused."""
    from ..apply import check_references

    if count > 1 and knobs.get("share_group_norm") is None:
        config = config.replace(share_group_norm=False)
    check_references(config, count)
    return config


def reference_weights(weights: list[float] | None, count: int) -> list[float] | None:
    """--reference-weight: not given (equal weights, None), or once per reference with valid values."""
    from ..apply import normalised_weights

    if not weights:
        return None
    if len(weights) != count:
        raise UserError(f"--reference-weight is given {len(weights)} times for {count} reference(s); give it once "
                        "per reference, in their order, or not at all")
    normalised_weights(weights)
    for weight in weights:  # a sum that overflows would make every weight 0
        check_numbers(reference_weight=weight)
    return list(weights)


def _check_steps(pipe, backbone, steps: int, width: int, height: int) -> None:
    """The scheduler must be able to sample `steps` steps: on UNets, each timestep lies below its training's."""
    from ..inversion import sampling_timesteps

    trained = None if backbone.flow else pipe.scheduler.config.get("num_train_timesteps")
    try:
        last = max(sampling_timesteps(pipe, steps, width, height))
    except (IndexError, ValueError, RuntimeError):
        last = math.inf
    if last == math.inf or (trained and last >= trained):
        trained_on = f", trained on {trained} timesteps" if trained else ""
        raise UserError(f"--steps {steps} is too many for {type(pipe.scheduler).__name__}{trained_on}; "
                        "pass fewer --steps")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: what a resume compares, so another file at the same path is noticed."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
