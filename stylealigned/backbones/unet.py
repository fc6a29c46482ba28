"""SD 1.x / 2.x / SDXL: a UNet2DConditionModel whose self-attention layers share; eps or v prediction."""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import Backbone, Conditioning, component
from .layers import SelfAttention

_SDXL_IMG2IMG_AESTHETIC_SCORES = (6.0, 2.5)  # the img2img pipeline's defaults (positive, negative)
LAYER_GROUPS = (("down-blocks", "down_blocks"), ("mid-block", "mid_block"), ("up-blocks", "up_blocks"))


class UNetBackbone(Backbone):
    family = "unet"
    label = "UNet (SD 1.x/2.x, SDXL)"
    denoiser_name = "unet"
    sample_name = "sample"
    shares_norms = True

    supports_panorama = True

    @classmethod
    def single_file(cls, keys):
        """SD 1.x, SD 2.x or SDXL, told apart by their text encoders' tensor names."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if not any(key.startswith("model.diffusion_model.input_blocks.") for key in keys):
            return None
        if any(key.startswith("conditioner.embedders.") for key in keys):
            return "sdxl", StableDiffusionXLPipeline
        if any(key.startswith("cond_stage_model.model.") for key in keys):
            return "sd2", StableDiffusionPipeline
        return "sd1", StableDiffusionPipeline

    @classmethod
    def matches(cls, pipe) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(component(pipe, "unet"), UNet2DConditionModel)

    def attention_layers(self) -> list[str]:
        """The diffusers Attention modules that attend within the image (not to text)."""
        from diffusers.models.attention_processor import Attention

        return [name for name, module in self.denoiser.named_modules()
                if isinstance(module, Attention) and not module.is_cross_attention]

    def attention_kind(self, name):
        return SelfAttention()

    def controlnet(self):
        from diffusers import ControlNetModel

        return ControlNetModel, ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                                 "addition_embed_type")

    def layer_groups(self):
        return list(LAYER_GROUPS)

    def guidance_groups(self):
        """The SD/SDXL pipelines' do_classifier_free_guidance, with the denoiser's config read here rather than
        through `pipe.unet` (a torch.compile wrapper there would be traced into its own graph)."""
        scale = getattr(self.pipe, "_guidance_scale", None)
        if scale is None:  # outside a pipeline call
            return 1
        return 2 if scale > 1 and self.denoiser.config.time_cond_proj_dim is None else 1

    def wrap_output(self, sample, return_dict):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

    def native_size(self):
        side = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    def latent_shape(self, height, width):
        factor = self.pipe.vae_scale_factor
        return self.denoiser.config.in_channels, height // factor, width // factor

    def scheduled(self, num_inference_steps, height, width):
        """The sampler's schedule; UNet inversion needs its discrete noise schedule (alphas_cumprod)."""
        scheduler = super().scheduled(num_inference_steps, height, width)
        if not hasattr(scheduler, "alphas_cumprod") or not torch.equal(scheduler.timesteps,
                                                                       scheduler.timesteps.round()):
            raise UserError(f"{type(scheduler).__name__} has no discrete noise schedule to invert; "
                            "use a DDIM, PNDM, Euler or DPM-Solver scheduler without Karras sigmas")
        return scheduler

    def conditioning(self, prompt, guidance_scale, height, width, max_sequence_length=None):
        """Text embeddings (batch [uncond, cond] when guided) and, on SDXL, its added conditioning."""
        from diffusers import StableDiffusionXLImg2ImgPipeline

        pipe, guided, device = self.pipe, guidance_scale > 1, self.pipe._execution_device
        if not hasattr(pipe, "_get_add_time_ids"):  # SD 1.x/2.x: text embeddings only
            cond, uncond = pipe.encode_prompt(prompt, device, 1, guided)
            return Conditioning({"encoder_hidden_states": torch.cat([uncond, cond]) if guided else cond}, guided)
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided)
        projection_dim = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                          else pooled.shape[-1])
        size, crop = (height, width), (0, 0)
        if isinstance(pipe, StableDiffusionXLImg2ImgPipeline):
            time_ids, time_ids_uncond = pipe._get_add_time_ids(
                size, crop, size, *_SDXL_IMG2IMG_AESTHETIC_SCORES, size, crop, size, cond.dtype, projection_dim)
        else:
            time_ids = time_ids_uncond = pipe._get_add_time_ids(
                size, crop, size, dtype=cond.dtype, text_encoder_projection_dim=projection_dim)
        if guided:
            cond, pooled, time_ids = (torch.cat([uncond, cond]), torch.cat([pooled_uncond, pooled]),
                                      torch.cat([time_ids_uncond, time_ids]))
        return Conditioning({"encoder_hidden_states": cond,
                             "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device)}}, guided)

    def predict(self, latents, timestep, conditioning, guidance_scale):
        unet_input = torch.cat([latents] * 2 if conditioning.guided else [latents]).to(self.denoiser.dtype)
        out = self.denoiser(unet_input, timestep, **conditioning.inputs, return_dict=False)[0].float()
        if conditioning.guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out
