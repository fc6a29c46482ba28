"""Z-Image (and Z-Image-Turbo): a flow-matching single-stream transformer, its inputs lists of one tensor per image.

`noise_refiner.N.attention` runs over one image's tokens alone, `context_refiner.N.attention` over its caption alone
(never shared: no image tokens), then `layers.N.attention` over [image patches, image padding to a multiple of 32,
caption padded to a multiple of 32, batch padding], the batch padding masked. Only the real image patches are
normalised and shared; image padding tokens are treated as text. Complex RoPE over (t, row, column): an image sits
at t = its padded caption length + 1, so a target and its reference may sit at different t, and the shared
reference keys are rotated at each target's own positions (per-target keys). Classifier-free guidance batches
[cond..., uncond...] in one call, except on steps where `cfg_truncation` turns it off. The model predicts minus the
velocity the scheduler steps with.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..processors import BATCH
from .base import Backbone, Conditioning, component, resolution_shift, t5_length
from .layers import AttentionKind, Tokens, complex_rotation, heads_of


class ZImageBackbone(Backbone):
    family = "zimage"
    label = "Z-Image transformer"
    denoiser_name = "transformer"
    sample_name = "x"
    row_lists = ("x", "cap_feats")
    # No published choice exists. The joint blocks (`layers`, 30 in Z-Image) are single-stream [image, caption]
    # blocks with RoPE, the counterpart of FLUX.1's single-stream blocks, which AlignedGen shares; the two
    # image-only noise refiners run first, on the noisy latent before any text, like the early blocks whose sharing
    # AlignedGen found copies the reference's layout and content. Reasoned from the architecture, not measured.
    default_shared_layers = "layers."
    flow = True

    @classmethod
    def matches(cls, pipe) -> bool:
        from diffusers import ZImageTransformer2DModel

        return isinstance(component(pipe, "transformer"), ZImageTransformer2DModel)

    def attention_layers(self):
        from diffusers.models.attention_processor import Attention

        return [name for name, module in self.denoiser.named_modules() if isinstance(module, Attention)
                and name.split(".", 1)[0] in ("noise_refiner", "layers")]

    def attention_kind(self, name):
        return ZImageAttention()

    def noise_level(self, inputs):
        """1 - `t`: the pipeline passes its transformer (1000 - timestep) / 1000."""
        return 1.0 - float(torch.as_tensor(inputs["t"]).min())

    def begin_call(self, state, config, kwargs):
        """Image patches, the shifted columns' rotation, and one group on steps `cfg_truncation` leaves unguided."""
        images = kwargs["x"]
        if isinstance(images[0], list):
            raise UserError("StyleAligned does not run Z-Image's Omni mode (several images per sample); use "
                            "ZImagePipeline")
        patch, frames = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
        _, depth, height, width = images[0].shape
        columns = width // patch
        tokens = (depth // frames) * (height // patch) * columns
        state.call["image_tokens"] = tokens
        state.call["shifted_columns"] = None if config.reference_positions == "same" else self.shifted_columns(
            tokens, columns, images[0].device)
        if state.groups == 2 and self.unguided_step(kwargs["t"]):
            state.groups = 1

    def shifted_columns(self, tokens: int, columns: int, device) -> torch.Tensor:
        """(tokens, column dim / 2): the model's own rotation table of the column axis at each image token's
        column + the width, image tokens in row-major order."""
        embedder = self.denoiser.rope_embedder
        if 2 * columns > embedder.axes_lens[2]:
            raise UserError(f"this image is too wide ({columns} patches) for the shifted reference positions on "
                            f"Z-Image ({embedder.axes_lens[2]} columns); use reference_positions='same'")
        shifted = torch.arange(tokens, device=device) % columns + columns
        ids = torch.stack([torch.zeros_like(shifted), torch.zeros_like(shifted), shifted], dim=-1)
        return embedder(ids)[:, -(embedder.axes_dims[2] // 2):]

    def unguided_step(self, t: torch.Tensor) -> bool:
        """Whether ZImagePipeline runs this step without guidance: t (its 1 - sigma, below 1) past a
        `cfg_truncation` below 1 (the default, 1, never truncates; no device sync then)."""
        truncation = getattr(self.pipe, "_cfg_truncation", None)
        return truncation is not None and float(truncation) < 1 and float(t.flatten()[0]) > truncation

    @property
    def latent_dtype(self):
        return torch.float32  # ZImagePipeline draws and steps its latents in fp32, whatever the transformer's

    def native_size(self):
        return 1024, 1024  # ZImagePipeline's default

    def latent_shape(self, height, width):
        factor = self.pipe.vae_scale_factor * 2  # the VAE's downsampling, then 2x2 patches
        return self.denoiser.config.in_channels, 2 * (height // factor), 2 * (width // factor)

    def set_timesteps(self, scheduler, num_inference_steps, height, width):
        """As ZImagePipeline sets them: sigmas 1 .. 1/n, and mu from the image's patch count."""
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        _, rows, columns = self.latent_shape(height, width)
        mu = resolution_shift(scheduler.config, (rows // 2) * (columns // 2))
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu)

    def conditioning(self, prompt, guidance_scale, height, width, max_sequence_length=None):
        """Qwen caption features (one tensor per prompt, its real tokens), [cond, uncond] when guided (scale > 0)."""
        guided = guidance_scale > 0
        embeds, negative = self.pipe.encode_prompt(prompt=[prompt], device=self.pipe._execution_device,
                                                   do_classifier_free_guidance=guided,
                                                   **t5_length(max_sequence_length))
        return Conditioning({"cap_feats": list(embeds) + list(negative)}, guided)

    def predict(self, latents, timestep, conditioning, guidance_scale):
        """Velocity: minus the model's output (as the pipeline steps with it), guidance pos + g (pos - neg)."""
        transformer = self.denoiser
        rows = 2 if conditioning.guided else 1
        batch = latents.to(transformer.dtype).repeat(rows, 1, 1, 1).unsqueeze(2)
        t = (1000 - torch.as_tensor(timestep, device=latents.device).float().expand(rows)) / 1000
        out = transformer(list(batch.unbind(0)), t, **conditioning.inputs, return_dict=False)[0]
        out = torch.stack([row.float() for row in out]).squeeze(2)
        if conditioning.guided:
            cond, uncond = out.chunk(2)
            out = cond + guidance_scale * (cond - uncond)
        return -out


class ZImageAttention(AttentionKind):
    """Z-Image's `Attention` with `ZSingleStreamAttnProcessor`: one sequence, image patches first; q/k RMS norms
    per head; complex RoPE at each batch row's own positions (`freqs_cis`); a boolean key mask (batch, keys)."""

    positional = ()

    def project(self, attn, state, hidden_states, attention_mask=None, freqs_cis=None, **kwargs):
        q = heads_of(attn.to_q(hidden_states), attn.heads, attn.norm_q)
        k, v = self.keys_values(attn, hidden_states)
        tokens = state.call["image_tokens"]
        freqs = freqs_cis.unflatten(0, (state.groups, -1))  # (groups, images, tokens, dim / 2)
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        return Tokens(q, k, v, slice(0, tokens), RowRotation(freqs), SharedRotation(freqs[:, :, :tokens], state), mask)

    def finish(self, attn, out, tokens):
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class RowRotation:
    """Complex RoPE with each image's own positions: `freqs` (groups, images, tokens, dim / 2), applied to
    (groups, images, heads, tokens, dim); `rows(rows)` is the rotation of the images `rows` of each group."""

    def __init__(self, freqs: torch.Tensor):
        self.freqs = freqs

    def rows(self, rows: slice) -> RowRotation:
        return RowRotation(self.freqs[:, rows])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return complex_rotation(self.freqs[:, :, None])(x)


class SharedRotation:
    """The references' image keys (groups, heads, K x patches, dim), K references side by side, each rotated at
    every target's own image positions, the column moved by the image width under "shifted": per-target keys
    (groups, targets, heads, K x patches, dim)."""

    per_target = True  # what it rotates depends on the call's targets: each chunk of a set rotates the cached keys

    def __init__(self, freqs: torch.Tensor, state):
        self.freqs, self.state = freqs, state

    def __call__(self, k: torch.Tensor) -> torch.Tensor:
        state = self.state
        targets = self.freqs[:, state.references:] if state.mode == BATCH else self.freqs
        columns = state.call["shifted_columns"]
        if columns is not None:  # the model's own table at column + W for the column axis
            targets = torch.cat([targets[..., :-columns.shape[-1]], columns.expand_as(
                targets[..., -columns.shape[-1]:])], dim=-1)
        if k.shape[-2] != targets.shape[-2]:  # several references side by side, each at the same positions
            targets = targets.repeat(1, 1, k.shape[-2] // targets.shape[-2], 1)
        return complex_rotation(targets[:, :, None])(k[:, None])
