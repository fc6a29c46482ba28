"""SD3 / SD3.5: an MMDiT flow-matching transformer with joint [image, text] attention and no RoPE.

Joint blocks (`transformer_blocks.N.attn`) order tokens [image, text]; SD3.5's dual-attention blocks add an
image-only self-attention (`transformer_blocks.N.attn2`). Classifier-free guidance batches [uncond..., cond...].
"""

from __future__ import annotations

import torch

from .base import Backbone, Conditioning, component, resolution_shift, t5_length
from .layers import JointAttention


class SD3Backbone(Backbone):
    family = "sd3"
    label = "SD3 / SD3.5 transformer"
    denoiser_name = "transformer"
    # Half the attention layers, evenly spread (not measured on SD3; no published choice exists): its blocks are all
    # of one kind, so the FLUX default's split by block kind does not apply; on builtin-flux sharing every layer pulled
    # targets toward the reference's object (content leakage 0.32 against 0.12 at half) through the shared keys and
    # values, not through positions, which SD3's blocks share too.
    default_shared_layers = 0.5
    flow = True

    @classmethod
    def single_file(cls, keys):
        from diffusers import StableDiffusion3Pipeline

        if any(key.removeprefix("model.diffusion_model.").startswith("joint_blocks.") for key in keys):
            return "sd3", StableDiffusion3Pipeline
        return None

    @classmethod
    def matches(cls, pipe) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(component(pipe, "transformer"), SD3Transformer2DModel)

    def attention_layers(self):
        from diffusers.models.attention_processor import Attention

        return [name for name, module in self.denoiser.named_modules()
                if isinstance(module, Attention) and name.rsplit(".", 1)[-1] in ("attn", "attn2")]

    def attention_kind(self, name):
        return JointAttention(text_first=False)

    def begin_call(self, state, config, kwargs):
        """Skip-layer guidance's extra call runs the conditional half alone: one group."""
        if kwargs.get("skip_layers") is not None:
            state.groups = 1

    def set_timesteps(self, scheduler, num_inference_steps, height, width):
        """As StableDiffusion3Pipeline sets them (shifted by mu only with dynamic shifting)."""
        config = scheduler.config
        if not config.get("use_dynamic_shifting"):
            scheduler.set_timesteps(num_inference_steps)
        else:
            _, rows, columns = self.latent_shape(height, width)
            patch = self.denoiser.config.patch_size
            mu = resolution_shift(config, (rows // patch) * (columns // patch), max_shift=1.16)
            scheduler.set_timesteps(num_inference_steps, mu=mu)

    def conditioning(self, prompt, guidance_scale, height, width, max_sequence_length=None):
        """CLIP x2 + T5 embeddings and pooled projections, batched [uncond, cond] when guided."""
        guided = guidance_scale > 1
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.pipe._execution_device,
            num_images_per_prompt=1, do_classifier_free_guidance=guided, **t5_length(max_sequence_length))
        if guided:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled}, guided)

    def predict(self, latents, timestep, conditioning, guidance_scale):
        transformer = self.denoiser
        batch = torch.cat([latents] * 2 if conditioning.guided else [latents]).to(transformer.dtype)
        timestep = torch.as_tensor(timestep, device=latents.device).expand(batch.shape[0])
        out = transformer(hidden_states=batch, timestep=timestep, **conditioning.inputs, return_dict=False)[0].float()
        if conditioning.guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out
