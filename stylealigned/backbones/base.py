"""What every model family tells the rest of the package: its denoiser, attention layers, latents and calls.

A `Backbone` wraps one pipeline. Everything family-specific (where the attention layers are, how tokens are laid
out, how latents are made, packed, encoded and decoded, what the denoiser predicts, how to call it for one step)
is a method or attribute here, overridden by one module per family; nothing above `backbones/` names a UNet.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..errors import UserError


@dataclass
class Conditioning:
    """Denoiser inputs for one prompt (batched [uncond, cond] when `guided`), as its family's `predict` takes them."""

    inputs: dict[str, Any]
    guided: bool
    negative: dict[str, Any] | None = None  # the unconditional inputs, on families that run them in a call apart


def t5_length(max_sequence_length: int | None) -> dict:
    """The T5 length argument of a pipeline's encode_prompt, where given (else the pipeline's default)."""
    return {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}


def call_takes(pipe, name: str) -> bool:
    """Whether the pipeline's __call__ has the parameter `name`."""
    return name in inspect.signature(type(pipe).__call__).parameters


def true_cfg_inputs(pipe, kwargs: dict, negative_prompt: str) -> dict:
    """A set's `guidance_scale` as `true_cfg_scale` against `negative_prompt` (unless one is given), for pipelines
    whose `guidance_scale` only a guidance-distilled denoiser reads (FLUX.1 without a guidance embedding, Qwen)."""
    if "guidance_scale" not in kwargs or "true_cfg_scale" in kwargs or not call_takes(pipe, "true_cfg_scale"):
        return kwargs
    kwargs = dict(kwargs)
    kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale")
    if kwargs["true_cfg_scale"] > 1:
        kwargs.setdefault("negative_prompt", negative_prompt)
    return kwargs


def resolution_shift(config, tokens: int, max_shift: float = 1.15) -> float:
    """mu of a flow pipeline's resolution-dependent shift for `tokens` image tokens, from its scheduler's config and
    the pipelines' defaults (diffusers' `calculate_shift`, the same function in FLUX, SD3, Qwen-Image, Z-Image)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", max_shift))


def component(pipe, name: str):
    """The pipeline's component `name` (None if absent); the module itself under a torch.compile wrapper
    (`pipe.unet = torch.compile(pipe.unet)`)."""
    module = getattr(pipe, name, None)
    return getattr(module, "_orig_mod", module)


class Backbone:
    """One pipeline seen through its family. Subclasses set the class attributes and override the hooks."""

    family = ""                 # short name, e.g. "flux"
    label = ""                  # for messages and the README, e.g. "FLUX.1 transformer"
    denoiser_name = ""          # the pipeline attribute holding the denoiser
    sample_name = "hidden_states"  # the denoiser's first (latent) argument
    unbatched_inputs: tuple[str, ...] = ()  # denoiser keyword inputs without a batch dimension
    row_lists: tuple[str, ...] = ()  # denoiser inputs given as lists of one tensor per batch row (Z-Image's)
    default_shared_layers: float | str | tuple[str, ...] = 1.0  # `shared_layers` when a config leaves it None
    default_adain_queries = True  # likewise `adain_queries` (the paper's)
    names_unconditional_call = False  # the pipeline runs CFG's unconditional prediction in a call of its own and
    # names it (`cache_context("uncond")`), so `share_unconditional=False` can keep that call unshared
    shares_norms = False        # share_group_norm / share_layer_norm have a meaning
    flow = False                # flow matching (velocity, sigma schedule) instead of a discrete noise schedule
    embedded_guidance = False   # the guidance scale is an input of the denoiser (FLUX.1-dev), not CFG
    frame_axis: int | None = None  # the latents' frame axis (batch first), on video families
    timestep_name = "timestep"  # the denoiser's input that says how noisy its latents are
    timestep_scale = 1000.0     # that input at pure noise (a UNet's training timesteps; sigma x 1000 on SD3 and Wan)

    supports_panorama = False  # MultiDiffusion panoramas (`panorama.py`) run on this family

    @classmethod
    def single_file(cls, keys: list[str]) -> tuple[str, type] | None:
        """(kind, pipeline class) of an original-format single-file checkpoint whose tensor names are `keys`, if
        it holds this family's denoiser (None: not this family's, or no single-file loading for it)."""
        return None

    def __init__(self, pipe):
        self.pipe = pipe
        self._denoiser = component(pipe, self.denoiser_name)

    @classmethod
    def matches(cls, pipe) -> bool:
        raise NotImplementedError

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's denoiser; under `pipe.unet = torch.compile(pipe.unet)` the module the wrapper compiles."""
        return self._denoiser

    def denoisers(self) -> dict[str, torch.nn.Module]:
        """Every denoiser the pipeline calls, by the prefix of its layers' names in `attention_layers` ("" for
        one): each expert of a model with several (Wan 2.2), in the order `shared_layers` counts their layers."""
        return {"": self.denoiser}

    # attention layers
    def attention_layers(self) -> list[str]:
        """Names (in the denoiser) of the attention modules that can share, in network order."""
        raise NotImplementedError

    def attention_kind(self, name: str):
        """The attention primitives (`layers.AttentionKind`) of layer `name`, which the shared processor composes."""
        raise NotImplementedError

    def pipeline_inputs(self, kwargs: dict) -> dict:
        """A set's pipeline arguments in this pipeline's own terms, where they differ (Qwen-Image's guidance)."""
        return kwargs

    def controlnet(self) -> tuple[type, tuple[str, ...]] | None:
        """(ControlNet model class, config entries it must share with the denoiser), or None: no ControlNet sets."""
        return None

    def layer_groups(self) -> list[tuple[str, str | tuple[str, ...]]]:
        """The family's meaningful groups of attention layers as (name, shared_layers), for the layer sweep."""
        return []

    @property
    def guided_shared_layers(self) -> float | str | tuple[str, ...]:
        """`shared_layers` when a config leaves it None and keeps the unconditional call unshared (the `guided`
        preset): the family's default unless measured otherwise."""
        return self.default_shared_layers

    def check_config(self, config) -> None:
        """Refuse knobs that mean nothing on this family, in one line."""
        if not config.share_unconditional and not self.names_unconditional_call:
            raise UserError(f"share_unconditional=False needs a pipeline that predicts the unconditional branch in a "
                            f"denoiser call of its own; a {self.label} does not, so turn it on for {self.family} "
                            f"models")
        if self.shares_norms:
            return
        for knob in ("share_group_norm", "share_layer_norm", "full_attention_share"):
            if getattr(config, knob):
                raise UserError(f"{knob} has no meaning on a {self.label} (it has no such layers or ablation "
                                f"here); turn it off for {self.family} models")

    def resolve(self, config):
        """`config` with the knobs it leaves to the family (`FAMILY_KNOBS`, None) set to this family's values."""
        from ..config import FAMILY_KNOBS

        return config.resolved(**{name: getattr(self, f"default_{name}") for name in FAMILY_KNOBS})

    def fit_preset(self, config):
        """A preset made for UNets, resolved for this family and without the norm sharing it has no norms for."""
        config = self.resolve(config)
        if self.shares_norms:
            return config
        return config.replace(share_group_norm=False, share_layer_norm=False)

    # one denoiser call
    def guidance_groups(self) -> int:
        """2 when the pipeline batches [uncond..., cond...] in this call (classifier-free guidance), else 1."""
        try:
            return 2 if self.pipe.do_classifier_free_guidance else 1
        except AttributeError:  # called outside a pipeline call, or a pipeline without the property
            return 1

    def begin_call(self, state, config, kwargs: dict) -> None:
        """Read per-call layout facts (text length, positions) from the denoiser's inputs into `state.call`."""

    def noise_level(self, inputs: dict) -> float:
        """How noisy this denoiser call's latents are, 1 = pure noise, 0 = clean (`share_until` compares it): the
        largest over the batch and tokens (Wan 2.2 TI2V gives its image's frame timestep 0)."""
        return float(torch.as_tensor(inputs[self.timestep_name]).max()) / self.timestep_scale

    def wrap_output(self, sample: torch.Tensor, return_dict: bool):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def read_settings(self, pipeline_kwargs: dict) -> None:
        """Read the generation's settings that latents depend on besides height and width (a clip's frame count)
        from the keyword arguments a set passes the pipeline's call."""

    # latents
    def still_reference(self, shape: tuple[int, ...], height: int, width: int) -> bool:
        """Whether a reference latent of `shape` (one item) is a still image that can lead this set of clips: a
        single frame on its frame axis, where the set's have more (its rows of a batch hold it on every frame, and
        the denoiser runs it as one frame)."""
        return False

    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels that the model generates by default."""
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, rows, columns) of one image's unpacked latent."""
        factor = self.pipe.vae_scale_factor
        return self.pipe.vae.config.latent_channels, height // factor, width // factor

    def packed_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one image's latent in the denoising loop's layout (`pack`)."""
        return tuple(self.pack(torch.empty(1, *self.latent_shape(height, width)), height, width).shape[1:])

    def pack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Unpacked [B, C, h, w] latents -> the layout of the pipeline's denoising loop (its step-end callback's)."""
        return latents

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def start_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents in the denoising loop's layout (`pack`'s) -> what the pipeline's `latents=` takes, where the two
        differ (FLUX.2 takes a grid of patches and makes tokens of it)."""
        return latents

    def initial_noise(self, positions, seed: int, height: int, width: int) -> torch.Tensor:
        """Starting latents for the given set positions, each from its own CPU generator seeded `seed + position`."""
        shape = (1, *self.latent_shape(height, width))
        noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + p))
                           for p in positions])
        return self.pack(noise, height, width).to(self.pipe._execution_device, self.latent_dtype)

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype the pipeline keeps its latents in between steps: the denoiser's, unless a family says fp32."""
        return self.denoiser.dtype

    @torch.no_grad()
    def encode(self, image: Image.Image) -> tuple[torch.Tensor, int, int]:
        """(z_0, height, width): an RGB image's latent in the pipeline's layout, batch of 1, fp32 on the execution
        device (the VAE's mean, run in fp32), and the pixel size it stands for."""
        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(image).to(self.pipe._execution_device, torch.float32)
        with _vae_in_fp32(vae):
            latents = self._vae_encode(pixels)
        scale, offset = self._latent_scaling(latents)
        height, width = (size * self.pipe.vae_scale_factor for size in latents.shape[-2:])
        return self.pack((latents - offset) * scale, height, width), height, width

    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """What the pipeline returns with `output_type="latent"` -> PIL images, as the pipeline decodes them."""
        latents = self.unpack(latents, height, width)
        scale, offset = self._latent_scaling(latents)
        return self.decode_vae(latents / scale + offset)

    @torch.no_grad()
    def decode_vae(self, latents: torch.Tensor) -> list[Image.Image]:
        """The VAE's latents -> PIL images (an fp32 VAE where fp16 would overflow), safety-checked if the pipeline
        checks."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        with _vae_in_fp32(vae) if upcast else contextlib.nullcontext():
            images = self._vae_decode(latents.to(vae.dtype))
        if getattr(self.pipe, "safety_checker", None) is not None:
            images, _ = self.pipe.run_safety_checker(images, self.pipe._execution_device, latents.dtype)
        return self.pipe.image_processor.postprocess(images, output_type="pil")

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent mean of [B, 3, H, W] pixels, unscaled."""
        return self.pipe.vae.encode(pixels).latent_dist.mean

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels of unscaled VAE latents."""
        return self.pipe.vae.decode(latents, return_dict=False)[0]

    def _latent_scaling(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(scale, offset) with model latents = (VAE latents - offset) * scale: the VAE's scaling factor with its
        shift factor, or with its per-channel latents mean and std (and a scaling factor of 1 where it has none)."""
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            view = dict(device=like.device, dtype=torch.float32)
            return (config.get("scaling_factor", 1.0) / torch.tensor(std, **view).view(1, -1, 1, 1),
                    torch.tensor(mean, **view).view(1, -1, 1, 1))
        return config.scaling_factor, getattr(config, "shift_factor", None) or 0.0

    # sampling and one step, for inversion
    def default_guidance(self) -> float:
        """The guidance scale the pipeline samples with when none is given."""
        return float(inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default)

    def prediction_type(self) -> str:
        """What the denoiser predicts: "epsilon", "v_prediction" or "flow" (velocity)."""
        return "flow" if self.flow else self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def scheduled(self, num_inference_steps: int, height: int, width: int):
        """A copy of the pipeline's scheduler with its timesteps set as the pipeline's own call sets them."""
        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        scheduler = copy.deepcopy(self.pipe.scheduler)
        self.set_timesteps(scheduler, num_inference_steps, height, width)
        return scheduler

    def set_timesteps(self, scheduler, num_inference_steps: int, height: int, width: int) -> None:
        scheduler.set_timesteps(num_inference_steps)

    def conditioning(self, prompt: str, guidance_scale: float, height: int, width: int,
                     max_sequence_length: int | None = None) -> Conditioning:
        """Denoiser inputs for `prompt`; `max_sequence_length` (T5 families) as the generation call passes it."""
        raise NotImplementedError

    def predict(self, latents: torch.Tensor, timestep, conditioning: Conditioning,
                guidance_scale: float) -> torch.Tensor:
        """The denoiser's output for one latent at one timestep (guidance applied), fp32."""
        raise NotImplementedError

    @staticmethod
    def prompted_and_negative(velocity, conditioning: Conditioning, denoiser):
        """`velocity` of the prompt and, where `conditioning` has one, of the negative prompt (else None), each in a
        denoiser call named as the stock pipelines name theirs ("cond", "uncond"; `share_unconditional` reads it)."""
        with denoiser.cache_context("cond"):
            out = velocity(conditioning.inputs)
        if conditioning.negative is None:
            return out, None
        with denoiser.cache_context("uncond"):
            return out, velocity(conditioning.negative)


class _vae_in_fp32:
    """Run the VAE in fp32 inside the block (SDXL's VAE overflows in fp16), then put its dtype back."""

    def __init__(self, vae):
        self.vae, self.dtype = vae, vae.dtype

    def __enter__(self):
        if self.dtype != torch.float32:
            self.vae.to(torch.float32)
        return self

    def __exit__(self, *exc):
        if self.dtype != torch.float32:
            self.vae.to(self.dtype)
        return False
