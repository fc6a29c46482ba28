"""FLUX.2 (`Flux2Pipeline`, guidance-distilled) and FLUX.2-klein (`Flux2KleinPipeline`, CFG in two calls).

Double-stream blocks (`transformer_blocks.N.attn`, `Flux2Attention`) join [text, image]; single-stream blocks
(`single_transformer_blocks.N.attn`, `Flux2ParallelSelfAttention`) project q, k, v and a SwiGLU MLP input with one
fused linear layer, and the attention output and the MLP's with another: only the attention half is shared. RoPE is
real, over (t, row, column, l) ids. The image stream may also hold FLUX.2's own conditioning images (editing): their
ids have t > 0; they are not images of the set and are never shared. Latents are 2x2 patches, batch-normed with the
VAE's running statistics, as tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Conditioning, component, t5_length
from .flux import FluxBackbone
from .layers import AttentionKind, JointAttention, Tokens, call_rotations, heads_of, image_slice, real_rotation


class ParallelSelfAttention(AttentionKind):
    """A FLUX.2 single-stream block's attention over [text, image], fused with its MLP."""

    positional = ("attention_mask", "image_rotary_emb")

    def project(self, attn, state, hidden_states, attention_mask=None, image_rotary_emb=None, **kwargs):
        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = fused.split([3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        image = image_slice(state, state.call["text_tokens"], hidden_states.shape[1] - state.call["text_tokens"])
        return Tokens(heads_of(q, attn.heads, attn.norm_q), heads_of(k, attn.heads, attn.norm_k),
                      heads_of(v, attn.heads), image, real_rotation(image_rotary_emb),
                      real_rotation(state.call["reference_rotary"]), attention_mask, rest=mlp)

    def finish(self, attn, out, tokens):
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(tokens.rest)], dim=-1))


class Flux2Backbone(FluxBackbone):
    family = "flux2"
    label = "FLUX.2 transformer"
    # FLUX.1's block layout (double-stream, then single-stream blocks), so FLUX.1's measured default carries over
    # (`flux.FluxBackbone.default_shared_layers`).

    @classmethod
    def single_file(cls, keys):
        return None  # diffusers loads no FLUX.2 pipeline from one file

    def controlnet(self):
        return None

    @classmethod
    def matches(cls, pipe) -> bool:
        from diffusers import Flux2Transformer2DModel

        return isinstance(component(pipe, "transformer"), Flux2Transformer2DModel)

    def attention_layers(self):
        from diffusers.models.transformers.transformer_flux2 import Flux2Attention, Flux2ParallelSelfAttention

        return [name for name, module in self.denoiser.named_modules()
                if isinstance(module, (Flux2Attention, Flux2ParallelSelfAttention))]

    def attention_kind(self, name):
        if name.startswith("single_transformer_blocks"):
            return ParallelSelfAttention()
        return JointAttention(text_first=True, rotations=call_rotations)

    def __init__(self, pipe):
        super().__init__(pipe)
        self._seen_ids: tuple = ()  # (ids, their version, reference positions, facts): `image_facts`' last answer

    def begin_call(self, state, config, kwargs):
        """Text length, the set's image tokens and the rotary embedding of the shared reference keys, from this
        call's position ids."""
        txt_ids = kwargs["txt_ids"][0] if kwargs["txt_ids"].ndim == 3 else kwargs["txt_ids"]
        state.call["text_tokens"] = txt_ids.shape[0]
        state.call["image_tokens"], state.call["reference_rotary"] = self.image_facts(kwargs["img_ids"], config)

    def image_facts(self, ids, config) -> tuple:
        """(the set's image tokens, the shared keys' rotary embedding) from a call's image ids: the set's images
        have t = 0 (conditioning images come after, at t > 0). Counting them reads the ids on the host (a device
        sync), so the answer is kept for the same ids: once per text-to-image call (the pipeline passes the same
        ids every step), per step only where the pipeline joins conditioning images' ids anew (editing)."""
        seen = self._seen_ids
        if not (seen and seen[0] is ids and seen[1:3] == (ids._version, config.reference_positions)):
            flat = ids[0] if ids.ndim == 3 else ids
            generated = flat[flat[:, 0] == 0]
            seen = self._seen_ids = (ids, ids._version, config.reference_positions,
                                     (generated.shape[0], self.reference_rotary(generated, config)))
        return seen[3]

    def pack(self, latents, height, width):
        """[B, C, h, w] -> 2x2 patches as tokens [B, h w / 4, 4 C], the layout of the denoising loop."""
        return self.pipe._pack_latents(self.pipe._patchify_latents(latents))

    def start_latents(self, latents, height, width):
        """The pipeline's `latents=` takes the patches as a grid [B, 4 C, h / 2, w / 2]."""
        _, rows_, columns = self.latent_shape(height, width)
        return latents.transpose(1, 2).unflatten(2, (rows_ // 2, columns // 2))

    def decode(self, latents, height, width):
        """The pipelines' `output_type="latent"` is the VAE's latent already (unpatched, batch norm undone)."""
        return self.decode_vae(latents)

    def _latent_scaling(self, like):
        """The VAE's batch-norm statistics, per channel of a 2x2 patch, spread back over the unpatched latent."""
        vae = self.pipe.vae
        view = dict(device=like.device, dtype=torch.float32)
        rows_, columns = like.shape[-2] // 2, like.shape[-1] // 2

        def spread(per_patch_channel):
            grid = per_patch_channel.to(**view).view(1, -1, 1, 1).expand(1, -1, rows_, columns)
            return self.pipe._unpatchify_latents(grid)

        std = torch.sqrt(vae.bn.running_var.to(**view) + vae.config.batch_norm_eps)
        return 1 / spread(std), spread(vae.bn.running_mean)

    def set_timesteps(self, scheduler, num_inference_steps, height, width):
        """As the FLUX.2 pipelines set them: sigmas 1 .. 1/n, shifted by the empirical mu for the token count."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        _, rows_, columns = self.latent_shape(height, width)
        mu = compute_empirical_mu(image_seq_len=(rows_ // 2) * (columns // 2), num_steps=num_inference_steps)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps,
                                                                                  num_inference_steps)
        scheduler.set_timesteps(num_inference_steps if sigmas is None else None, sigmas=sigmas, mu=mu)

    def conditioning(self, prompt, guidance_scale, height, width, max_sequence_length=None):
        """Text embeddings and position ids; klein's CFG (not distilled) runs the empty prompt in a call apart."""
        pipe, device = self.pipe, self.pipe._execution_device
        guided = guidance_scale > 1 and not self.embedded_guidance and not pipe.config.get("is_distilled", False)
        _, rows_, columns = self.latent_shape(height, width)
        image_ids = pipe._prepare_latent_ids(torch.empty(1, 1, rows_ // 2, columns // 2)).to(device)

        def inputs(text: str) -> dict:
            embeds, text_ids = pipe.encode_prompt(prompt=text, device=device, **t5_length(max_sequence_length))
            return {"encoder_hidden_states": embeds, "txt_ids": text_ids, "img_ids": image_ids}

        return Conditioning(inputs(prompt), guided, inputs("") if guided else None)
