"""Wan 2.1 / 2.2 text-to-video and image-to-video: a flow-matching transformer over a clip's (frame, row, column)
tokens, 3D RoPE.

Each block's self-attention `attn1` (its only attention over video tokens) can share; the text cross-attention
`attn2` never does. `attn1` applies RMSNorm to q and k over all heads together, before the head split, then RoPE
over (frame, row, column). A clip's tokens are all video tokens: AdaIN runs over all of a clip's tokens, and
targets see every token of the reference clip. Wan 2.2's two experts (`transformer` for high noise,
`transformer_2` for low noise) both share; their layers are named `transformer.blocks.N.attn1` and
`transformer_2.blocks.N.attn1`, counted in that order. The pipeline runs the conditional and unconditional
prompts in transformer calls of their own: one guidance group each. Latents are (channels, frames, rows, columns).

On `WanImageToVideoPipeline` every clip of a call starts from the call's one `image` (its first frame): Wan 2.1
I2V feeds the image's latent and a frame mask as extra input channels and its CLIP tokens to attn2 (never shared);
Wan 2.2 TI2V (`expand_timesteps`) replaces the first latent frame with the image's, at timestep 0. attn1 is the
same in both, so sharing is too.

A still image leads a set of clips as a one-frame clip (`still_reference`): inverted alone (Wan's causal VAE encodes
a first frame on its own), run as one frame in every denoiser call, its keys at frame 0 of the targets' grid (its
own positions; the column moved by the width under "shifted").
"""

from __future__ import annotations

import contextlib

import torch
from PIL import Image
from torch import Tensor

from ..errors import UserError
from .base import Backbone, Conditioning, _vae_in_fp32, component, t5_length
from .layers import AttentionKind, Tokens, heads_of, rows

EXPERTS = ("transformer", "transformer_2")  # Wan 2.2: high noise, then low noise


class WanBackbone(Backbone):
    family = "wan"
    label = "Wan transformer"
    denoiser_name = "transformer"
    # Every block's attn1, as the paper shares every self-attention layer: attn1 is Wan's only attention over
    # video tokens, its blocks are alike (no double/single-stream split as in FLUX), and under the default
    # "shifted" positions targets see the reference beside themselves rather than on their own tokens.
    default_shared_layers = 1.0
    flow = True
    frame_axis = 2
    names_unconditional_call = True  # the pipeline's negative-prompt call is named "uncond"
    frames = 81  # the pipeline's default clip length, until `read_settings` reads the set's

    def __init__(self, pipe):
        super().__init__(pipe)
        self._experts = {name: component(pipe, name) for name in EXPERTS if component(pipe, name) is not None}
        if self._denoiser is None:  # a Wan 2.2 pipeline may hold its low-noise expert alone
            self._denoiser = next(iter(self._experts.values()))

    @classmethod
    def matches(cls, pipe) -> bool:
        from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

        return isinstance(pipe, (WanPipeline, WanImageToVideoPipeline)) and any(
            isinstance(component(pipe, name), WanTransformer3DModel) for name in EXPERTS)

    def denoisers(self):
        if len(self._experts) == 1:
            return {"": self.denoiser}
        return {f"{name}.": expert for name, expert in self._experts.items()}

    def attention_layers(self):
        return [prefix + name for prefix, denoiser in self.denoisers().items()
                for name, _ in denoiser.named_modules() if name.rsplit(".", 1)[-1] == "attn1"]

    def attention_kind(self, name):
        return WAN_SELF_ATTENTION

    def guidance_groups(self):
        return 1  # the negative prompt runs in a transformer call of its own

    def begin_call(self, state, config, kwargs):
        """The rotary embedding of the shared reference keys: the model's own RoPE at the call's (frame, row,
        column) positions, the column moved by the latent width under "shifted"; a still reference's at frame 0
        only (None: the call's own)."""
        shape = list(kwargs["hidden_states"].shape)
        still = state.call.get("still_reference", False)
        if still:
            shape[self.frame_axis] = 1
        shifted = config.reference_positions == "shifted"  # (Wan 2.2's experts have one RoPE: same heads, sizes)
        state.call["reference_rotary"] = reference_rotary(self.denoiser.rope, shape, shifted) if shifted or still \
            else None

    # latents: (channels, frames, rows, columns)
    @property
    def image_to_video(self) -> bool:
        """WanImageToVideoPipeline: every clip starts from the call's `image` (its first frame)."""
        from diffusers import WanImageToVideoPipeline

        return isinstance(self.pipe, WanImageToVideoPipeline)

    def read_settings(self, pipeline_kwargs):
        """The clip length; one the VAE cannot encode whole, or a size that is not whole patches (WanPipeline would
        round them), is a UserError; so is image-to-video without one first frame (diffusers' call takes one
        image for the whole batch)."""
        if self.image_to_video and not isinstance(pipeline_kwargs.get("image"), Image.Image):
            raise UserError("WanImageToVideoPipeline starts every clip from one first frame: pass generate_set "
                            "image= one PIL image (not one per clip: its call takes one; the CLI and web app run "
                            "text-to-video Wan)")
        frames = pipeline_kwargs.get("num_frames", type(self).frames)
        step = self.pipe.vae_scale_factor_temporal
        if frames < 1 or (frames - 1) % step:
            low = max(frames - 1, 0) // step * step + 1
            raise UserError(f"a Wan clip is one more than a multiple of {step} frames, got {frames}; pass {low} or "
                            f"{low + step}")
        multiple = self.pipe.vae_scale_factor_spatial * self.denoiser.config.patch_size[1]
        for name in ("height", "width"):
            size = pipeline_kwargs.get(name)
            if size is not None and size % multiple:
                raise UserError(f"Wan's {name} must be a multiple of {multiple}, got {size}; pass "
                                f"{max(size // multiple, 1) * multiple}")
        self.frames = frames

    def native_size(self):
        return 480, 832  # WanPipeline's default height and width

    def latent_shape(self, height, width):
        pipe = self.pipe
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        return (self.denoiser.config.out_channels, (self.frames - 1) // temporal + 1, height // spatial,
                width // spatial)

    def still_reference(self, shape, height, width):
        """A one-frame latent of the set's size: a still image, inverted as a one-frame clip (Wan's causal VAE
        encodes a first frame on its own)."""
        channels, _, rows, columns = self.latent_shape(height, width)
        return tuple(shape) == (channels, 1, rows, columns)

    @torch.no_grad()
    def encode(self, image):
        """An RGB image as a one-frame clip's latent (1, C, 1, h, w), or a clip (a list of frames of one size) as
        (1, C, latent frames, h, w): the VAE's mean, in fp32, normalised."""
        if self.image_to_video:
            raise UserError("a real reference is inverted on a text-to-video Wan pipeline (WanPipeline); "
                            "WanImageToVideoPipeline starts every clip from its image= first frame instead")
        processor, vae = self.pipe.video_processor, self.pipe.vae
        if isinstance(image, list):
            self.read_settings({"num_frames": len(image)})  # the causal VAE encodes 4k + 1 frames whole
            pixels = processor.preprocess_video(image)
        else:
            pixels = processor.preprocess(image).unsqueeze(2)
        with _vae_in_fp32(vae):
            latents = vae.encode(pixels.to(self.pipe._execution_device, torch.float32)).latent_dist.mean
        scale, offset = self._latent_scaling(latents)
        height, width = (size * self.pipe.vae_scale_factor_spatial for size in latents.shape[-2:])
        return (latents - offset) * scale, height, width

    def _latent_scaling(self, like):
        """The VAE's per-channel latents mean and std (it has no scaling factor), over (1, C, 1, 1, 1)."""
        config = self.pipe.vae.config
        view = dict(device=like.device, dtype=torch.float32)
        mean, std = (torch.tensor(values, **view).view(1, -1, 1, 1, 1)
                     for values in (config.latents_mean, config.latents_std))
        return 1 / std, mean

    @torch.no_grad()
    def decode(self, latents, height, width) -> list[list]:
        """Latents -> one list of PIL frames per clip, as WanPipeline decodes them."""
        vae = self.pipe.vae
        scale, offset = self._latent_scaling(latents)
        with _vae_in_fp32(vae) if vae.dtype == torch.float16 else contextlib.nullcontext():
            video = vae.decode((latents / scale + offset).to(vae.dtype), return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type="pil")

    # one step, for inversion
    def conditioning(self, prompt, guidance_scale, height, width, max_sequence_length=None):
        """UMT5 embeddings; the negative prompt's in a call of its own when guided."""
        guided = guidance_scale > 1
        embeds, negative = self.pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=guided,
                                                   device=self.pipe._execution_device,
                                                   **t5_length(max_sequence_length))
        return Conditioning({"encoder_hidden_states": embeds}, guided,
                            {"encoder_hidden_states": negative} if guided else None)

    def expert(self, timestep) -> torch.nn.Module:
        """The transformer the pipeline calls at `timestep`: Wan 2.2's high-noise one at or above the boundary."""
        ratio = self.pipe.config.get("boundary_ratio")
        if ratio is None or float(timestep) >= ratio * self.pipe.scheduler.config.num_train_timesteps:
            return self._experts.get("transformer", self.denoiser)
        return self._experts["transformer_2"]

    def predict(self, latents, timestep, conditioning, guidance_scale):
        transformer = self.expert(timestep)
        timestep = torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0])

        def velocity(inputs: dict) -> Tensor:
            return transformer(hidden_states=latents.to(transformer.dtype), timestep=timestep, **inputs,
                               return_dict=False)[0].float()

        out, negative = self.prompted_and_negative(velocity, conditioning, transformer)
        return out if negative is None else negative + guidance_scale * (out - negative)


def reference_rotary(rope, shape, shifted: bool) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (1, tokens, 1, dim), of `rope` (the model's WanRotaryPosEmbed) at a latent of `shape`
    (batch, channels, frames, height, width); `shifted`: every column moved by the width in patches (the model's
    own embedding of a grid twice as wide, right half)."""
    _, _, frames, height, width = shape
    if not shifted:
        return rope(torch.empty(1, 0, frames, height, width, device="meta"))
    columns = width // rope.patch_size[2]
    if 2 * columns > rope.max_seq_len:
        raise UserError(f"reference_positions='shifted' needs RoPE positions up to {2 * columns} columns but this "
                        f"model has {rope.max_seq_len}; use reference_positions='same'")
    wide = rope(torch.empty(1, 0, frames, height, 2 * width, device="meta"))
    grid = (frames // rope.patch_size[0], height // rope.patch_size[1], 2 * columns)
    return tuple(t.view(*grid, -1)[:, :, columns:].reshape(1, -1, 1, t.shape[-1]) for t in wide)


def wan_rotation(rotary):
    """Apply Wan's (cos, sin) RoPE, each (1, tokens, 1, dim), to (..., heads, tokens, dim), computed as
    WanAttnProcessor computes it (adjacent channel pairs; the embedding's own dtype, then back)."""
    if rotary is None:
        return None
    cos, sin = (t.transpose(1, 2) for t in rotary)  # (1, 1, tokens, dim): over heads, then tokens
    cos, sin = cos[..., 0::2], sin[..., 1::2]

    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out

    return rotate


class WanSelfAttention(AttentionKind):
    """`WanAttention` as a block's attn1 with `WanAttnProcessor`: q/k RMSNorm over all heads, then the head split;
    every token a video token; no mask."""

    positional = ("encoder_hidden_states", "attention_mask", "rotary_emb")

    def project(self, attn, state, hidden_states, encoder_hidden_states=None, attention_mask=None,
                rotary_emb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("StyleAligned shares Wan's self-attention (attn1) only, without masks")
        q = heads_of(attn.norm_q(self.linear(attn, 0)(hidden_states)), attn.heads)
        k, v = self.keys_values(attn, hidden_states)
        rotate_shared = wan_rotation(state.call.get("reference_rotary") or rotary_emb)
        # a clip's cached reference is a chunked set's memory: its input, half the size of its keys and values
        return Tokens(q, k, v, rotate=wan_rotation(rotary_emb), rotate_shared=rotate_shared, inputs=hidden_states)

    def keys_values(self, attn, x):
        return heads_of(attn.norm_k(self.linear(attn, 1)(x)), attn.heads), heads_of(self.linear(attn, 2)(x), attn.heads)

    @staticmethod
    def linear(attn, which: int):
        """The q (0), k (1) or v (2) projection, from `to_qkv` where the module's projections are fused."""
        if getattr(attn, "fused_projections", False):
            return rows(attn.to_qkv, which * attn.inner_dim, (which + 1) * attn.inner_dim)
        return (attn.to_q, attn.to_k, attn.to_v)[which]

    def finish(self, attn, out, tokens):
        return attn.to_out[1](attn.to_out[0](out))


WAN_SELF_ATTENTION = WanSelfAttention()
