"""FLUX.1 (dev, schnell) and Chroma: a flow-matching transformer with double- and single-stream blocks and RoPE.

Double-stream blocks (`transformer_blocks.N.attn`) join [text, image]; single-stream blocks
(`single_transformer_blocks.N.attn`) get that joined sequence whole, its text length given by `txt_ids`. Latents are
packed 2x2 into tokens. One transformer call is one guidance group: FLUX.1-dev embeds its guidance, and true CFG
(and Chroma's CFG) runs the negative prompt in a call of its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import (Backbone, Conditioning, call_takes, component, resolution_shift, t5_length,
                   true_cfg_inputs)

PIPELINE_T5_LENGTH = 512  # FluxPipeline's default max_sequence_length
from .layers import JointAttention, call_rotations


class FluxBackbone(Backbone):
    family = "flux"
    label = "FLUX.1 transformer"
    denoiser_name = "transformer"
    unbatched_inputs = ("img_ids", "txt_ids")
    flow = True
    timestep_scale = 1.0  # the pipeline passes sigma
    # Measured on builtin-flux (docs/findings.md, section 6): AdaIN on the targets' keys alone leaks less of the
    # reference's content into them than the paper's AdaIN on queries and keys, for a little of its style.
    default_adain_queries = False

    @classmethod
    def single_file(cls, keys):
        from diffusers import FluxPipeline

        if any(key.removeprefix("model.diffusion_model.").startswith("double_blocks.") for key in keys):
            return "flux", FluxPipeline
        return None

    @classmethod
    def matches(cls, pipe) -> bool:
        from diffusers.models.transformers.transformer_flux import FluxAttention

        transformer = component(pipe, "transformer")
        return transformer is not None and hasattr(transformer, "single_transformer_blocks") and any(
            isinstance(module, FluxAttention) for module in transformer.modules())

    def attention_layers(self):
        from diffusers.models.transformers.transformer_flux import FluxAttention

        return [name for name, module in self.denoiser.named_modules() if isinstance(module, FluxAttention)]

    def attention_kind(self, name):
        return JointAttention(text_first=True, rotations=call_rotations)

    @property
    def embedded_guidance(self):
        return bool(self.denoiser.config.get("guidance_embeds", False))

    @property
    def names_unconditional_call(self):
        """FluxPipeline's true CFG runs the negative prompt in a call named "uncond"; FLUX.1-dev embeds its guidance."""
        return not self.embedded_guidance

    def default_guidance(self) -> float:
        """FluxPipeline's embedded guidance (FLUX.1-dev); without an embedding (schnell, builtin-flux) guidance is
        true CFG, off (1) unless asked for."""
        return super().default_guidance() if self.embedded_guidance else 1.0

    def pipeline_inputs(self, kwargs):
        """Without a guidance embedding a set's guidance scale is true CFG against the empty prompt; T5 runs at its
        tokenizer's length where that is shorter than the pipeline's default (builtin-flux's 12 tokens)."""
        if not self.embedded_guidance:
            kwargs = true_cfg_inputs(self.pipe, kwargs, "")
        if not call_takes(self.pipe, "max_sequence_length"):
            return kwargs
        return {**kwargs, "max_sequence_length": self.text_length(kwargs.get("max_sequence_length"))}

    def text_length(self, given: int | None) -> int:
        """T5's token count: `given`, else the tokenizer's model_max_length capped at the pipeline's default."""
        own = getattr(getattr(self.pipe, "tokenizer_2", None), "model_max_length", PIPELINE_T5_LENGTH)
        return given or min(own, PIPELINE_T5_LENGTH)

    def controlnet(self):
        from diffusers import FluxControlNetModel

        return FluxControlNetModel, ("num_attention_heads", "attention_head_dim", "joint_attention_dim",
                                     "pooled_projection_dim")

    @property
    def default_shared_layers(self) -> tuple[str, ...]:
        """Every double-stream block and the last quarter of the single-stream blocks (at least one), measured on
        builtin-flux (docs/findings.md, section 6): the single-stream blocks carry the reference's objects into the
        targets, the last one least; the double-stream blocks carry its style and little content."""
        double, single = self.blocks()
        return double + single[len(single) - math.ceil(len(single) / 4):]

    @property
    def guided_shared_layers(self) -> tuple[str, ...]:
        """The first half of the double-stream blocks and the last three eighths of the single-stream blocks (at
        least one of each), measured on builtin-flux with the unconditional call unshared (docs/findings.md, section
        6): guidance then carries the style, and the deeper double-stream blocks cost the targets their objects."""
        double, single = self.blocks()
        return double[:math.ceil(len(double) / 2)] + single[len(single) - math.ceil(3 * len(single) / 8):]

    def blocks(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The attention layers of the double-stream blocks and of the single-stream blocks, in network order."""
        layers = self.attention_layers()
        single = tuple(name for name in layers if name.startswith("single_transformer_blocks."))
        return tuple(name for name in layers if name not in single), single

    def layer_groups(self):
        double, single = self.blocks()
        return [("double-stream", double), ("single-stream", single)]

    def guidance_groups(self):
        return 1  # the negative prompt (true CFG, Chroma) runs in a transformer call of its own

    def begin_call(self, state, config, kwargs):
        """Text length and the rotary embedding of the shared reference keys, from this call's position ids."""
        txt_ids, img_ids = (kwargs[name][0] if kwargs[name].ndim == 3 else kwargs[name]
                            for name in ("txt_ids", "img_ids"))
        state.call["text_tokens"] = txt_ids.shape[0]
        state.call["reference_rotary"] = self.reference_rotary(img_ids, config)

    def reference_rotary(self, img_ids, config):
        """The rotary embedding of the shared reference keys at these image ids, beside the image (columns moved by
        the latent width, on the device: no host sync) under `reference_positions="shifted"`."""
        if config.reference_positions == "shifted":
            img_ids = img_ids.clone()
            img_ids[:, 2] += img_ids[:, 2].max() + 1
        return self.denoiser.pos_embed(img_ids)

    def latent_shape(self, height, width):
        factor = self.pipe.vae_scale_factor * 2  # the VAE's downsampling, then 2x2 packing
        return self.denoiser.config.in_channels // 4, 2 * (height // factor), 2 * (width // factor)

    def pack(self, latents, height, width):
        return self.pipe._pack_latents(latents, *latents.shape[:2], *latents.shape[2:])

    def unpack(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

    def set_timesteps(self, scheduler, num_inference_steps, height, width):
        """As FluxPipeline sets them: sigmas 1 .. 1/n, shifted by mu for the image's token count."""
        config = scheduler.config
        _, rows, columns = self.latent_shape(height, width)
        mu = resolution_shift(config, (rows // 2) * (columns // 2))
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps,
                                                                          num_inference_steps)
        scheduler.set_timesteps(num_inference_steps if sigmas is None else None, sigmas=sigmas, mu=mu)

    def conditioning(self, prompt, guidance_scale, height, width, max_sequence_length=None):
        """T5 + CLIP embeddings and position ids. FLUX.1-dev's guidance is embedded (one batch row); without an
        embedding guidance is true CFG, the empty prompt in a call of its own."""
        pipe, device = self.pipe, self.pipe._execution_device
        _, rows, columns = self.latent_shape(height, width)

        def inputs(text: str) -> dict:
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=text, prompt_2=None, device=device,
                                                          num_images_per_prompt=1,
                                                          max_sequence_length=self.text_length(max_sequence_length))
            image_ids = pipe._prepare_latent_image_ids(1, rows // 2, columns // 2, device, embeds.dtype)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids,
                    "img_ids": image_ids}

        guided = not self.embedded_guidance and guidance_scale > 1
        return Conditioning(inputs(prompt), guided=False, negative=inputs("") if guided else None)

    def predict(self, latents, timestep, conditioning, guidance_scale):
        transformer = self.denoiser
        extra = {}
        if self.embedded_guidance:
            extra["guidance"] = torch.full([latents.shape[0]], guidance_scale, device=latents.device,
                                           dtype=torch.float32)
        timestep = torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0]).to(transformer.dtype)

        def velocity(inputs: dict) -> torch.Tensor:
            return transformer(hidden_states=latents.to(transformer.dtype), timestep=timestep / 1000, **extra,
                               **inputs, return_dict=False)[0].float()

        out, negative = self.prompted_and_negative(velocity, conditioning, transformer)
        return out if negative is None else negative + guidance_scale * (out - negative)


class ChromaBackbone(FluxBackbone):
    """Chroma: FLUX.1's blocks with T5 only, its padded text masked out, and CFG in calls of their own."""

    family = "chroma"
    label = "Chroma transformer"

    @classmethod
    def matches(cls, pipe) -> bool:
        from diffusers import ChromaTransformer2DModel

        return isinstance(component(pipe, "transformer"), ChromaTransformer2DModel)

    names_unconditional_call = False  # ChromaPipeline's negative-prompt call carries no name

    def default_guidance(self) -> float:
        return Backbone.default_guidance(self)

    def pipeline_inputs(self, kwargs):
        return kwargs  # ChromaPipeline's guidance_scale is its classifier-free guidance

    def conditioning(self, prompt, guidance_scale, height, width, max_sequence_length=None):
        pipe, guided = self.pipe, guidance_scale > 1
        device = pipe._execution_device
        embeds, text_ids, mask, negative, negative_ids, negative_mask = pipe.encode_prompt(
            prompt=prompt, negative_prompt="" if guided else None, device=device, do_classifier_free_guidance=guided,
            **t5_length(max_sequence_length))
        _, rows, columns = self.latent_shape(height, width)
        image_ids = pipe._prepare_latent_image_ids(1, rows // 2, columns // 2, device, embeds.dtype)

        def inputs(embeds, text_ids, mask) -> dict:
            mask = pipe._prepare_attention_mask(1, image_ids.shape[0], embeds.dtype, mask)
            return {"encoder_hidden_states": embeds, "txt_ids": text_ids, "img_ids": image_ids, "attention_mask": mask}

        return Conditioning(inputs(embeds, text_ids, mask), guided,
                            inputs(negative, negative_ids, negative_mask) if guided else None)
