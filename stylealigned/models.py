"""Load a diffusers pipeline from a hub id, a local folder, a single checkpoint file or the built-in toy model.

Single `.safetensors`/`.ckpt` files (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1) need their diffusers config: diffusers
fetches it from the hub (or its cache); offline, pass `config=` a local diffusers folder or a cached hub id of the
same architecture.
"""

import contextlib
import json
import math
import pickle
import re
import zipfile
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open

from .backbones import FAMILIES, backbone_for
from .errors import UserError

# The built-in models by name: the UNet and the FLUX.1-style transformer (`scripts/train_builtin.py`).
BUILTIN_MODELS = {"builtin": Path(__file__).parent / "builtin", "builtin-flux": Path(__file__).parent / "builtin_flux"}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# "auto": DDIM (the paper's sampler) on UNets, the model's own flow-matching scheduler on FLUX and SD3;
# "model" keeps the scheduler the model ships with.
SCHEDULERS = {
    "auto": None,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "model": None,
}
DTYPES = {
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32,
}


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; an explicit accelerator that is not available is a UserError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(resolved.type, False):
        raise UserError(f"device {device!r} is not available on this machine; use --device auto or cpu")
    return resolved


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> float16 on cuda/mps and float32 on cpu; accepts torch dtypes and names like "fp16" or "bfloat16"."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_kind(path) -> tuple[str, type]:
    """(kind, pipeline class) of an original-format checkpoint, told from its tensor names by the families'
    backbones (no weights are read): "sd1", "sd2", "sdxl", "flux" or "sd3"."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as file:
                keys = list(file.keys())
        else:
            state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
            keys = list(state.get("state_dict", state))
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise UserError(f"cannot read checkpoint {path}: {error}".splitlines()[0]) from None
    for family in FAMILIES:
        found = family.single_file(keys)
        if found is not None:
            return found
    raise UserError(f"{path} is not a single-file checkpoint of a supported model (SD 1.x/2.x, SDXL, FLUX.1 or "
                    "SD3); pass a diffusers folder or hub id")


def at_trained_size(pipe: DiffusionPipeline, folder: Path) -> DiffusionPipeline:
    """A model trained by `scripts/train_builtin.py` (the built-ins and copies of their folders) samples by default
    at the side its training.json names, not FluxPipeline's own default (1024 pixels on FLUX.1's VAE)."""
    try:
        side = int(json.loads((folder / "training.json").read_text())["side"])
    except (OSError, ValueError, KeyError, TypeError):
        return pipe
    if hasattr(pipe, "default_sample_size"):  # in latent pixels
        pipe.default_sample_size = side // pipe.vae_scale_factor
    return pipe


def _from_pretrained(model: str, dtype: torch.dtype, config) -> DiffusionPipeline:
    """Dispatch on what `model` names; hub and cache failures become one-line UserErrors."""
    path = Path(model).expanduser()
    if model in BUILTIN_MODELS:
        if not (BUILTIN_MODELS[model] / "model_index.json").is_file():
            raise UserError(f"the built-in model {model} is not installed; reinstall stylealigned or pass --model")
        path = BUILTIN_MODELS[model]
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is not a diffusers pipeline folder (it has no model_index.json)")
        return at_trained_size(DiffusionPipeline.from_pretrained(path, dtype=dtype), path)
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise UserError(f"{path} is not a .safetensors or .ckpt checkpoint nor a diffusers folder")
        _, pipeline_class = checkpoint_kind(path)
        fix = "connect once, or pass config= a local diffusers folder of the same architecture"
        load = partial(pipeline_class.from_single_file, path, config=config, dtype=dtype)
        return hub_call(f"the config of {path.name}", fix, load)
    if not HUB_ID.match(model) or path.suffix in CHECKPOINT_SUFFIXES:
        raise UserError(f"no such model file or folder: {model}")
    fix = f"download it once with network (`hf download {model}`) or pass a local diffusers folder"
    return hub_call(model, fix, partial(DiffusionPipeline.from_pretrained, model, dtype=dtype))


def hub_call(what: str, fix: str, load):
    """Run `load`, turning hub and cache failures into one line.

    Offline, diffusers raises a plain OSError whose cause is huggingface_hub's error (OfflineModeIsEnabled,
    LocalEntryNotFoundError, a connection error); every huggingface_hub error is itself an OSError.
    """
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "couldn't connect, trying the cache" notice would precede ours
    try:
        with _cache_only_if_unreachable():
            return load()
    except OSError as error:
        causes = [error]
        while causes[-1].__cause__ is not None:
            causes.append(causes[-1].__cause__)
        if any(isinstance(cause, (RepositoryNotFoundError, GatedRepoError)) for cause in causes):
            raise UserError(f"{what} is not on the Hugging Face hub or is gated; check the id or log in") from None
        raise UserError(f"{what} is not in the local Hugging Face cache and the hub cannot be reached; {fix}") from None
    finally:
        diffusers_logging.set_verbosity(level)


@contextlib.contextmanager
def _cache_only_if_unreachable():
    """Hugging Face's offline mode within the block when the hub does not answer one request: loaders then look in
    the cache at once, instead of retrying every file with backoff (up to a minute of retry lines)."""
    import huggingface_hub.constants as hub

    offline = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = offline or not _reachable(hub.ENDPOINT)
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = offline


def _reachable(endpoint: str) -> bool:
    """Whether the hub answers one HEAD request at all (any status), without retries."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=10)
    except Exception:  # a refused connection, an unknown host, a timeout, a proxy's refusal: not reachable
        return False
    return True


def scheduler_class(name: str):
    """The scheduler class for a SCHEDULERS name (None for "model"); an unknown name is a UserError."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Replace the pipeline's scheduler by the named one, built from the model's own scheduler config."""
    new_class = scheduler_class(name)
    backbone = backbone_for(pipe)
    if backbone.flow and new_class is not None:
        raise UserError(f"{name} is a noise-prediction scheduler but this {backbone.label} is a flow-matching "
                        "model; use --scheduler auto (its own flow-matching scheduler)")
    if name == "auto" and not backbone.flow:
        new_class = DDIMScheduler
    if new_class is DDIMScheduler:  # the paper's sampler; latent models must not clip the predicted x0
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    elif new_class is not None:
        pipe.scheduler = new_class.from_config(pipe.scheduler.config)


def load_controlnet(model: str, pipe: DiffusionPipeline):
    """A ControlNet for `pipe`'s family (SD 1.x/2.x, SDXL, FLUX.1) from a hub id, a local folder or, on UNets, a
    single file, in the denoiser's dtype on the pipeline's device; one that does not fit the denoiser is a
    UserError."""
    backbone = backbone_for(pipe)
    if backbone.controlnet() is None:
        raise UserError(f"ControlNet sets run on SD 1.x/2.x, SDXL and FLUX.1 models, not on a {backbone.label}")
    model_class, shared = backbone.controlnet()
    path, dtype = Path(model).expanduser(), backbone.denoiser.dtype
    fix = f"download it once with network (`hf download {model}`) or pass a local ControlNet folder"
    if path.is_dir():
        kind = _class_name(path)
        if kind != model_class.__name__:
            raise UserError(f"{path} is not a diffusers {model_class.__name__} folder (its config.json names "
                            f"{kind or 'no model'}); pass a ControlNet for this {backbone.label}")
        controlnet = _load_folder(model_class, path, dtype)
    elif path.is_file() and path.suffix in CHECKPOINT_SUFFIXES and hasattr(model_class, "from_single_file"):
        controlnet = hub_call(f"the config of {path.name}", "connect once, or convert it to a diffusers folder",
                              partial(model_class.from_single_file, path, dtype=dtype))
    elif HUB_ID.match(model) and not path.exists():
        controlnet = hub_call(model, fix, partial(model_class.from_pretrained, model, dtype=dtype))
    else:
        raise UserError(f"no such ControlNet folder or hub id: {model}")
    misfit = [key for key in shared if controlnet.config.get(key) != backbone.denoiser.config.get(key)]
    embedding = controlnet.config.get("conditioning_embedding_out_channels")  # its blocks halve the image's side
    if embedding and 2 ** (len(embedding) - 1) != getattr(pipe, "vae_scale_factor", None):
        misfit.append("conditioning_embedding_out_channels, which scale control images to another latent size")
    if misfit:
        raise UserError(f"the ControlNet {model} does not fit this {backbone.label} (its {', '.join(misfit)} "
                        "differ); pass a ControlNet trained for this base model")
    return controlnet.to(pipe.device)


def _load_folder(model_class, path: Path, dtype: torch.dtype):
    """A model from a local diffusers folder; missing or damaged weights are a UserError naming the folder."""
    try:
        return model_class.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the {model_class.__name__} in {path} ({reason}); its weights are missing or "
                        "damaged: download or copy the folder again") from None


def _class_name(folder: Path) -> str | None:
    """The model class a diffusers model folder's config.json names (None: no readable config)."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def with_controlnet(pipe: DiffusionPipeline, controlnet: str) -> DiffusionPipeline:
    """The ControlNet pipeline of `pipe`'s family, sharing all its components, with the ControlNet `controlnet`."""
    return AutoPipelineForText2Image.from_pipe(pipe, controlnet=load_controlnet(controlnet, pipe))


def with_image_input(pipe: DiffusionPipeline, inpaint: bool = False) -> DiffusionPipeline:
    """The image-to-image (or, with `inpaint`, inpainting) pipeline of `pipe`'s kind, sharing all its components."""
    auto = AutoPipelineForInpainting if inpaint else AutoPipelineForImage2Image
    try:
        return auto.from_pipe(pipe)
    except ValueError as error:  # no such variant of this pipeline in diffusers
        kind = "inpainting" if inpaint else "image-to-image"
        raise UserError(f"{type(pipe).__name__} has no {kind} variant in diffusers ({error}); "
                        "use an SD 1.x/2.x, SDXL, FLUX.1 or SD3 model") from None


def load_pipeline(model: str, device="auto", dtype=None, scheduler: str = "auto", config=None,
                  controlnet: str | None = None) -> DiffusionPipeline:
    """Load `model` ("builtin", "builtin-flux", a diffusers folder, a .safetensors/.ckpt file or a hub id) ready to
    sample.

    `config` (single files only): a local diffusers folder or hub id giving the pipeline's component configs.
    `controlnet`: a ControlNet (hub id, folder or file) to load the model's ControlNet pipeline with.
    """
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    dtype = resolve_dtype(dtype, device)
    scheduler_class(scheduler)  # fail before a slow load
    pipe = _from_pretrained(str(model), dtype, config)
    set_scheduler(pipe, scheduler)  # refuses a pipeline of no supported family
    if controlnet is not None:
        pipe = with_controlnet(pipe, controlnet)
    return pipe.to(device)


MAX_LORA_SCALE = 100


def parse_lora(spec: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` -> (path, scale); the scale is 1 unless the text after the last ':' is a number."""
    head, _, tail = spec.rpartition(":")
    try:
        return (Path(head).expanduser(), float(tail)) if head else (Path(spec).expanduser(), 1.0)
    except ValueError:
        return Path(spec).expanduser(), 1.0


def lora_files(specs: list[str]) -> list[tuple[Path, float]]:
    """(path, scale) of each `PATH[:SCALE]`; a path that does not exist is a UserError (checked before loading)."""
    loras = [parse_lora(spec) for spec in specs]
    for spec, (_, scale) in zip(specs, loras):
        if not (math.isfinite(scale) and abs(scale) <= MAX_LORA_SCALE):
            raise UserError(f"--lora {spec}: the scale must lie in -{MAX_LORA_SCALE}..{MAX_LORA_SCALE}, got {scale}; "
                            "pass PATH:SCALE with such a number (1 by default)")
    for path, _ in loras:
        if not path.exists():
            raise UserError(f"cannot load LoRA {path}: no such file or folder; pass a LoRA .safetensors file or "
                            "its folder")
    return loras


def load_loras(pipe: DiffusionPipeline, specs: list[str]) -> None:
    """Load LoRA weights, each `PATH[:SCALE]` (a .safetensors file or a folder holding one; scale 1 by default),
    into the pipeline through diffusers' LoRA loader, all of them active at their scales. StyleAligned's `apply`
    works on the LoRA'd projections, whether the LoRAs are loaded before or after it."""
    loras = lora_files(specs)
    taken = {name for names in pipe.get_list_adapters().values() for name in names} if loras else set()
    names, scales = [], []
    for path, scale in loras:
        name = f"lora{len(taken) + len(names)}"
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"cannot load LoRA {path} ({reason}); pass a LoRA .safetensors file, or its folder, "
                            "made for this model") from None
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(sorted(taken) + names, [1.0] * len(taken) + scales)
