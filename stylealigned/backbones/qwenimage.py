"""Qwen-Image: a flow-matching transformer whose every block is double-stream, with complex RoPE per stream.

Each block's attention (`transformer_blocks.N.attn`) joins [text, image]; each stream has its own q/k RMS norms
and its own rotation, as the blocks receive them (`image_rotary_emb = (image freqs, text freqs)`): image tokens
at (frame, row, column) with rows and columns centred on 0, text after them. Padded text keys are masked
(`encoder_hidden_states_mask`). Latents come from a video VAE (a frame axis, per-channel mean and std) and are
packed 2x2 into tokens. Each transformer call is one guidance group: true CFG runs the negative prompt in a call
of its own.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .base import Backbone, Conditioning, component, resolution_shift, true_cfg_inputs
from .layers import JointAttention, complex_rotation, joined

# QwenImagePipeline's resolution shift: scheduler config keys and the defaults it takes where they are missing
NEGATIVE_PROMPT = " "  # the negative prompt of QwenImagePipeline's example, for guided inversion


class QwenImageBackbone(Backbone):
    family = "qwenimage"
    label = "Qwen-Image transformer"
    denoiser_name = "transformer"
    flow = True
    timestep_scale = 1.0  # the pipeline passes sigma
    names_unconditional_call = True  # the pipeline's negative-prompt call is named "uncond"

    def __init__(self, pipe):
        super().__init__(pipe)
        self._freqs: dict = {}  # the shared keys' frequencies of the last image grid, per device

    @classmethod
    def matches(cls, pipe) -> bool:
        from diffusers import QwenImageTransformer2DModel

        return isinstance(component(pipe, "transformer"), QwenImageTransformer2DModel)

    # Half the blocks, evenly spread (not measured on Qwen-Image): its blocks are all double-stream with RoPE, and on
    # builtin-flux sharing every layer pulled targets toward the reference's object; its double-stream blocks, the
    # ones its FLUX default keeps, are also its first, so block kind and depth are not told apart there.
    default_shared_layers = 0.5

    def attention_layers(self):
        return [f"transformer_blocks.{i}.attn" for i in range(len(self.denoiser.transformer_blocks))]

    def attention_kind(self, name):
        return QwenAttention()

    def guidance_groups(self):
        return 1  # true CFG runs the negative prompt in a transformer call of its own

    def default_guidance(self) -> float:
        """QwenImagePipeline guides (true CFG) only when given a negative prompt: 1 (none) by default."""
        return 1.0

    def pipeline_inputs(self, kwargs):
        """Qwen-Image guides with `true_cfg_scale` against a negative prompt; its `guidance_scale` is read by
        guidance-distilled variants only. So a set's guidance scale becomes true CFG, against the pipeline's own
        suggested negative prompt " " unless one is given."""
        return kwargs if self.denoiser.config.guidance_embeds else true_cfg_inputs(self.pipe, kwargs, NEGATIVE_PROMPT)

    def begin_call(self, state, config, kwargs):
        """The rotary frequencies the shared reference keys are rotated with, from this call's image grid."""
        shapes = kwargs["img_shapes"]
        images = shapes[0] if isinstance(shapes[0], list) else shapes
        if len(images) != 1:
            raise UserError(f"{type(self.pipe).__name__} adds condition images to the generated one; StyleAligned "
                            "runs on Qwen-Image text-to-image and img2img pipelines only")
        frames, height, width = images[0]
        shift = width if config.reference_positions == "shifted" else 0
        key = (frames, height, width, shift, self.pipe._execution_device)
        if key not in self._freqs:
            self._freqs = {key: image_freqs(self.denoiser.pos_embed, *key)}
        state.call["reference_freqs"] = self._freqs[key]

    # latents: a video VAE's, one frame, packed 2x2
    def latent_shape(self, height, width):
        factor = self.pipe.vae_scale_factor * 2  # the VAE's downsampling, then 2x2 packing
        return self.denoiser.config.in_channels // 4, 2 * (height // factor), 2 * (width // factor)

    def pack(self, latents, height, width):
        return self.pipe._pack_latents(latents, *latents.shape[:2], *latents.shape[-2:])

    def unpack(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)[:, :, 0]

    def _vae_encode(self, pixels):
        return super()._vae_encode(pixels[:, :, None])[:, :, 0]  # a video VAE: one frame

    def _vae_decode(self, latents):
        return super()._vae_decode(latents[:, :, None])[:, :, 0]

    # sampling and one step, for inversion
    def set_timesteps(self, scheduler, num_inference_steps, height, width):
        """As QwenImagePipeline sets them: sigmas 1 .. 1/n, shifted by mu for the image's token count."""
        mu = resolution_shift(scheduler.config, self.packed_shape(height, width)[0])
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), mu=mu)

    def conditioning(self, prompt, guidance_scale, height, width, max_sequence_length=None):
        """The prompt's embeddings, text mask and image grid; the negative prompt's apart when guided (true CFG)."""
        pipe, guided = self.pipe, guidance_scale > 1
        _, rows, columns = self.latent_shape(height, width)
        length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}

        def inputs(text: str) -> dict:
            embeds, mask = pipe.encode_prompt(prompt=text, device=pipe._execution_device, **length)
            return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
                    "img_shapes": [[(1, rows // 2, columns // 2)]]}

        return Conditioning(inputs(prompt), guided, inputs(NEGATIVE_PROMPT) if guided else None)

    def predict(self, latents, timestep, conditioning, guidance_scale):
        """The velocity; guided as QwenImagePipeline guides: true CFG rescaled to the conditional norm per token."""
        transformer = self.denoiser
        timestep = torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0]).to(transformer.dtype)

        def velocity(inputs: dict) -> torch.Tensor:
            return transformer(hidden_states=latents.to(transformer.dtype), timestep=timestep / 1000, **inputs,
                               return_dict=False)[0].float()

        out, negative = self.prompted_and_negative(velocity, conditioning, transformer)
        if negative is None:
            return out
        combined = negative + guidance_scale * (out - negative)
        return combined * (out.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


class QwenAttention(JointAttention):
    """Qwen-Image's double-stream attention: [text, image], each stream rotated by its own complex frequencies;
    the text padding masked as the stock processor masks it (boolean, over keys)."""

    positional = ("encoder_hidden_states", "encoder_hidden_states_mask", "attention_mask", "image_rotary_emb")

    def __init__(self):
        super().__init__(text_first=True, rotations=_rotations)

    def key_mask(self, attn, state, kwargs, attention_mask, text_tokens, image_tokens):
        text = kwargs.get("encoder_hidden_states_mask")
        if text is None:
            return None
        image = torch.ones(text.shape[0], image_tokens, dtype=torch.bool, device=text.device)
        return torch.cat([text.bool(), image], dim=1)[:, None, None, :]


def _rotations(attn, state, kwargs, text_tokens, image_tokens):
    """The call's rotations (text by its frequencies, image by its own); the shared keys' from `begin_call`."""
    image, text = kwargs["image_rotary_emb"]
    rotate = joined((complex_rotation(text), text_tokens), (complex_rotation(image), image_tokens))
    return rotate, complex_rotation(state.call["reference_freqs"])


def image_freqs(pos_embed, frames: int, height: int, width: int, column_shift: int, device) -> torch.Tensor:
    """(frames * height * width, dim / 2): the complex frequencies of an image's tokens from the model's own table
    (`QwenEmbedRope`: frame t, row and column centred on 0 under scale_rope), each column moved by column_shift."""
    sizes = [dim // 2 for dim in pos_embed.axes_dim]
    positive, negative = (table.to(device).split(sizes, dim=1) for table in (pos_embed.pos_freqs,
                                                                            pos_embed.neg_freqs))

    def at(axis: int, positions: torch.Tensor) -> torch.Tensor:
        """Table rows at integer positions; negative ones from the table of negative positions (-1 last)."""
        return torch.where((positions >= 0)[:, None], positive[axis][positions.clamp(min=0)],
                           negative[axis][positions.clamp(max=-1)])

    def centred(count: int) -> torch.Tensor:
        steps = torch.arange(count, device=device)
        return steps - (count - count // 2) if pos_embed.scale_rope else steps

    grid = (frames, height, width, -1)
    return torch.cat([at(0, torch.arange(frames, device=device)).view(frames, 1, 1, -1).expand(grid),
                      at(1, centred(height)).view(1, height, 1, -1).expand(grid),
                      at(2, centred(width) + column_shift).view(1, 1, width, -1).expand(grid)], dim=-1).flatten(0, 2)
