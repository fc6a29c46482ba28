"""The floor for StyleAligned's cost: the stock model plus only the work that sharing attention cannot avoid.

In the layers StyleAligned shares (`stylealigned.apply.layers_to_share`, the family's default), each target attends
to its own tokens plus its guidance group's reference's image-token keys and values; the reference attends to its own
tokens only, exactly as in the stock model. Nothing else: no AdaIN, no statistics, no second rotary embedding of the
reference keys (targets see them where the reference has them, i.e. reference_positions="same"), no per-call
layout bookkeeping beyond the guidance-group count (and FLUX's text length for its single-stream blocks).

The processors below mirror diffusers' stock ones line for line (AttnProcessor2_0 for a UNet's self-attention,
FluxAttnProcessor, JointAttnProcessor2_0 for SD3, WanAttnProcessor for Wan's attn1), with one change: the
scaled-dot-product attention call becomes `FloorState.attend`. Two layouts, matching StyleAligned's two:

    with floor(pipe):                  # one batch: image 0 of each guidance group is the reference
    with floor(pipe, batch_size=4):    # per denoiser call: the references once (their keys and values kept),
                                       # then the targets 4 at a time against them, as generate_set runs them

So the floor is what `sa.apply` (and `generate_set`) would cost if StyleAligned were free; `check` shows it computes
StyleAligned's own attention with AdaIN off and reference_positions="same".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from stylealigned.apply import layers_to_share, take_rows
from stylealigned.attention import merged_attention, merges
from stylealigned.backbones import backbone_for
from stylealigned.config import StyleAlignedConfig

BATCH, RECORD, REPLAY = "batch", "record", "replay"


@dataclass
class FloorState:
    """What every floor layer of one denoiser call needs: the batch layout and, in chunks, the references' keys."""

    groups: int = 1         # guidance groups in the batch (2 with batched classifier-free guidance)
    text_tokens: int = 0    # FLUX single-stream blocks: text tokens in front of the joined sequence
    mode: str = BATCH       # BATCH: references and targets; RECORD: references only; REPLAY: targets only
    cache: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def attend(self, name: str, q: Tensor, k: Tensor, v: Tensor, image: slice) -> Tensor:
        """(batch, heads, tokens, dim) attention in which targets also see their reference's image tokens."""
        if self.mode == RECORD:
            self.cache[name] = (k[:, :, image], v[:, :, image])
            return F.scaled_dot_product_attention(q, k, v)
        if self.mode == REPLAY:
            ref_k, ref_v = self.cache[name]
            return _targets(*(x.unflatten(0, (self.groups, -1)) for x in (q, k, v)), ref_k, ref_v).flatten(0, 1)
        q, k, v = (x.unflatten(0, (self.groups, -1)) for x in (q, k, v))
        reference = F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0])[:, None]
        if q.shape[1] == 1:
            return reference.flatten(0, 1)
        targets = _targets(q[:, 1:], k[:, 1:], v[:, 1:], k[:, 0, :, image], v[:, 0, :, image])
        return torch.cat([reference, targets], dim=1).flatten(0, 1)


def _targets(q: Tensor, k: Tensor, v: Tensor, ref_k: Tensor, ref_v: Tensor) -> Tensor:
    """Targets (G, T, H, N, D) attend to their own keys and their group's reference keys (G, H, R, D), the fastest
    exact way known: on the CPU two flash calls merged by their log-sum-exps (`merged_attention`, cheaper there than
    concatenating the keys), else one call over the keys side by side."""
    if merges(q, k, v, ref_k, ref_v):
        return merged_attention(q, k, v, ref_k, ref_v)
    groups, targets = q.shape[:2]
    keys = torch.cat([k, ref_k[:, None].expand(groups, targets, *ref_k.shape[1:])], dim=-2)
    values = torch.cat([v, ref_v[:, None].expand(groups, targets, *ref_v.shape[1:])], dim=-2)
    out = F.scaled_dot_product_attention(q.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1))
    return out.unflatten(0, (groups, targets))


class UNetSelfAttention:
    """diffusers' AttnProcessor2_0 on a UNet's self-attention (no mask, every token an image token)."""

    def __init__(self, name: str, state: FloorState):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual, input_ndim = hidden_states, hidden_states.ndim
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        q, k, v = (proj(hidden_states).view(batch, -1, attn.heads, attn.to_k.out_features // attn.heads)
                   .transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = self.state.attend(self.name, q, k, v, slice(None))
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class FluxJointAttention:
    """diffusers' FluxAttnProcessor: double-stream blocks join [text, image], single-stream ones get them joined."""

    def __init__(self, name: str, state: FloorState):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        text_tokens = self.state.text_tokens
        if attn.added_kv_proj_dim is not None:
            text_q, text_k, text_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_q, text_k, text_v))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            q, k, v = (torch.cat([t, x], dim=1) for t, x in ((text_q, q), (text_k, k), (text_v, v)))
            text_tokens = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.state.attend(self.name, *(x.transpose(1, 2) for x in (q, k, v)), slice(text_tokens, None))
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(text_out.contiguous())


class SD3JointAttention:
    """diffusers' JointAttnProcessor2_0: joint blocks' [image, text] attention and SD3.5's image-only attn2."""

    def __init__(self, name: str, state: FloorState):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x: Tensor) -> Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (heads(proj(encoder_hidden_states))
                                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            q, k, v = torch.cat([q, text_q], dim=2), torch.cat([k, text_k], dim=2), torch.cat([v, text_v], dim=2)
        out = self.state.attend(self.name, q, k, v, slice(0, image_tokens))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is not None:
            out, text_out = out[:, :image_tokens], out[:, image_tokens:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, text_out)


class WanSelfAttention:
    """diffusers' WanAttnProcessor on a block's attn1: q/k RMS norm over all heads, then the head split, Wan's
    RoPE; every token a video token."""

    def __init__(self, name: str, state: FloorState):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from stylealigned.backbones.wan import wan_rotation

        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))
        rotate = wan_rotation(rotary_emb)
        out = self.state.attend(self.name, rotate(q), rotate(k), v, slice(None))
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2, 3).type_as(q)))


PROCESSORS = {"unet": UNetSelfAttention, "flux": FluxJointAttention, "sd3": SD3JointAttention,
              "wan": WanSelfAttention}


@contextlib.contextmanager
def floor(pipe, batch_size: int | None = None, config: StyleAlignedConfig | None = None) -> Iterator[FloorState]:
    """Within this block `pipe` runs the floor in the layers `config` shares (StyleAligned's default layers);
    with `batch_size`, each denoiser call runs the references once, then the targets `batch_size` at a time."""
    backbone = backbone_for(pipe)
    denoiser, state = backbone.denoiser, FloorState()
    modules = dict(denoiser.named_modules())
    originals = {name: modules[name].processor for name in layers_to_share(backbone, config or StyleAlignedConfig())}
    forward, own_forward = denoiser.forward, vars(denoiser).get("forward")  # a hook registry may have bound one

    def floor_forward(*args, **kwargs):
        state.groups = backbone.guidance_groups()
        if "txt_ids" in kwargs:  # FLUX: the single-stream blocks' text length
            state.text_tokens = kwargs["txt_ids"].shape[-2]
        sample = args[0] if args else kwargs[backbone.sample_name]
        batch = sample.shape[0]
        if batch_size is None or batch // state.groups - 1 <= batch_size:
            return forward(*args, **kwargs)
        rows = torch.arange(batch, device=sample.device).view(state.groups, -1)
        pieces = [rows[:, :1]] + list(rows[:, 1:].split(batch_size, dim=1))
        merged = None
        try:
            for mode, piece in zip([RECORD] + [REPLAY] * (len(pieces) - 1), pieces):
                state.mode, index = mode, piece.reshape(-1)
                out = forward(*take_rows(args, index, batch), **{
                    key: value if key in backbone.unbatched_inputs else take_rows(value, index, batch)
                    for key, value in kwargs.items()})
                out = out[0] if isinstance(out, tuple) else out.sample
                merged = out.new_empty(batch, *out.shape[1:]) if merged is None else merged
                merged[index] = out
        finally:
            state.mode = BATCH
            state.cache.clear()
        return backbone.wrap_output(merged, kwargs.get("return_dict", True))

    for name in originals:
        modules[name].processor = PROCESSORS[backbone.family](name, state)
    denoiser.forward = floor_forward
    try:
        yield state
    finally:
        if own_forward is None:
            del denoiser.forward
        else:
            denoiser.forward = own_forward
        for name, processor in originals.items():
            modules[name].processor = processor


@torch.no_grad()
def check(pipe, prompts: list[str], batch_size: int, **pipeline_kwargs) -> dict[str, float]:
    """Max |difference| of the latents after the pipeline's call between the floor and StyleAligned with AdaIN off
    and reference_positions="same" (the same computation), in one batch and in chunks of `batch_size`."""
    import stylealigned as sa

    backbone = backbone_for(pipe)
    backbone.read_settings(pipeline_kwargs)
    height, width = backbone.native_size()
    kwargs = dict(height=height, width=width) | pipeline_kwargs | dict(output_type="latent")
    noise = backbone.initial_noise(range(len(prompts)), 0, kwargs["height"], kwargs["width"])
    same = StyleAlignedConfig(adain_queries=False, adain_keys=False)
    if backbone.family in ("flux", "wan"):
        same = same.replace(reference_positions="same")
    differences = {}
    for chunks in (None, batch_size):
        with sa.apply(pipe, same) as handle, handle.chunked(chunks):
            ours = pipe(prompts, latents=noise, **kwargs)[0]  # images, or a video pipeline's frames
        with floor(pipe, chunks):
            mine = pipe(prompts, latents=noise, **kwargs)[0]
        differences["one batch" if chunks is None else f"chunks of {chunks}"] = (ours - mine).abs().max().item()
    return differences
