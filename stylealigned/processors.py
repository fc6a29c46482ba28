"""Attention with a shared reference, per attention kind: a UNet's self-attention and a transformer's joint attention.

Each processor projects, reshapes and puts outputs back exactly as diffusers' own processor for that kind does;
the method's math lives in `attention.py`. They know nothing about pipelines: `SharedState` tells them how the
batch is laid out, and `apply.py` calls them from a hook on each shared attention module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .attention import (ALL, Reference, align_targets, kept, make_reference, reference_attention, shared_attention,
                        shared_tokens)
from .config import StyleAlignedConfig

BATCH, RECORD, REPLAY = "batch", "record", "replay"


@dataclass
class SharedState:
    """Batch layout shared by every hooked layer of one denoiser, set anew by the denoiser's hook on each call.

    mode BATCH: each of `groups` guidance groups starts with its `references` reference images.
    mode RECORD: the batch holds only the references; layers store what targets need in `cache`.
    mode REPLAY: the batch holds only targets; layers use the references stored by the last RECORD pass, and take
    them out of the cache in the call's `last` chunk, freeing each as soon as its last reader is done.
    `text_tokens`: text tokens at the front of a joined [text, image] sequence (FLUX single-stream blocks).
    `reference_rotary`: the rotary embedding the shared reference keys are rotated with (RoPE models).
    `weights`: one per reference, how much targets take from each (normalised; `StyleAlignedHandle.set_weights`).
    """

    groups: int = 1
    mode: str = BATCH
    cache: dict[str, Any] = field(default_factory=dict)
    last: bool = False
    text_tokens: int = 0
    reference_rotary: Any = None
    weights: tuple[float, ...] = (1.0,)

    @property
    def references(self) -> int:
        """Reference images at the start of each guidance group."""
        return len(self.weights)

    def cached(self, name: str):
        """What the RECORD pass kept for layer `name`; taken out of the cache in the last chunk."""
        return self.cache.pop(name) if self.last else self.cache[name]

    def split(self, batch: int) -> int:
        """Images per guidance group for a batch of this size."""
        if batch % self.groups:
            raise ValueError(f"batch of {batch} does not split into {self.groups} guidance groups")
        return batch // self.groups


class SharedAttention:
    """What every kind shares: the three modes over (G, M, H, N, D) queries, keys and values before RoPE."""

    def __init__(self, name: str, config: StyleAlignedConfig, state: SharedState):
        self.name, self.config, self.state = name, config, state

    def attend(self, q: Tensor, k: Tensor, v: Tensor, image: slice = ALL, rotate=None, rotate_shared=None,
               mask: Tensor | None = None, inputs: Tensor | None = None, project: Projection | None = None) -> Tensor:
        """`inputs` (batch, image tokens, C): the layer's input at the image tokens, which `project` turns into
        keys and values: what a RECORD pass keeps, and REPLAY passes project the shared keys and values from."""
        mode = self.state.mode
        if mode == BATCH:  # q, k, v are this layer's own projections: the targets' are overwritten, not copied
            return shared_attention(q, k, v, self.config, image, rotate, rotate_shared, mask, overwrite=True,
                                    weights=self.state.weights)
        if mode == RECORD:
            self.state.cache[self.name] = self.stored(make_reference(q, k, v, self.config, image, rotate_shared,
                                                                     self.state.weights, keys=False), inputs)
            return reference_attention(q, k, v, rotate, mask)
        ref = self.state.cached(self.name)
        if ref.inputs is not None:
            key, value = shared_tokens(*project(ref.inputs), rotate_shared)
            ref = replace(ref, key=key, value=value)
        return align_targets(q, k, v, ref, self.config, image, rotate, mask, overwrite=True)

    def stored(self, ref: Reference, inputs: Tensor) -> Reference:
        """What the cache keeps of a layer's references for later passes: the AdaIN statistics and, where targets
        attend to the references, the layer's input at their image tokens (a copy of its own), half the size of
        the keys and values it is projected to again."""
        if not self.config.share_attention:
            return ref
        rows = inputs.unflatten(0, (self.state.groups, -1))[:, kept(self.state.weights)]
        return replace(ref, inputs=rows.clone(memory_format=torch.contiguous_format))

    def grouped(self, x: Tensor) -> Tensor:
        """(batch, tokens, heads, dim) -> (groups, per group, heads, tokens, dim)."""
        return x.unflatten(0, (self.state.groups, self.state.split(x.shape[0]))).transpose(2, 3)

    @staticmethod
    def ungrouped(x: Tensor) -> Tensor:
        """(groups, per group, heads, tokens, dim) -> (batch, tokens, heads * dim)."""
        return x.transpose(2, 3).flatten(0, 1).flatten(2)


Projection = Callable[[Tensor], tuple[Tensor, Tensor]]  # inputs (..., tokens, C) -> keys, values (..., H, N, D)


def split_heads(x: Tensor, proj, heads: int, norm=None) -> Tensor:
    """proj(x) as (..., tokens, heads, dim), normalised by `norm` (over dim) if given."""
    x = proj(x).unflatten(-1, (heads, -1))
    return x if norm is None else norm(x)


def projection(to_k, to_v, heads: int, norm_k=None) -> Projection:
    """A layer's keys and values (..., heads, tokens, dim), before RoPE, from its input (..., tokens, C)."""

    def project(x: Tensor) -> tuple[Tensor, Tensor]:
        return split_heads(x, to_k, heads, norm_k).transpose(-2, -3), split_heads(x, to_v, heads).transpose(-2, -3)

    return project


class SelfAttentionProcessor(SharedAttention):
    """A UNet's self-attention (diffusers `Attention` with AttnProcessor2_0), every token an image token."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: StyleAligned shares a UNet's self-attention only, without masks")
        residual, input_shape = hidden_states, hidden_states.shape
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        q, k, v = (self.grouped(split_heads(hidden_states, proj, attn.heads, norm)) for proj, norm in
                   ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None)))
        out = self.attend(q, k, v, inputs=hidden_states,
                          project=projection(attn.to_k, attn.to_v, attn.heads, attn.norm_k))
        hidden_states = self.ungrouped(out).to(q.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if len(input_shape) == 4:
            hidden_states = hidden_states.transpose(1, 2).reshape(input_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointAttentionProcessor(SharedAttention):
    """A transformer's attention over text and image tokens (FLUX.1's FluxAttention, SD3's joint `Attention`).

    `text_first`: the joint sequence is [text, image] (FLUX) rather than [image, text] (SD3). Called without
    `encoder_hidden_states` the layer sees one sequence: FLUX single-stream blocks' joined [text, image]
    (`state.text_tokens` long text part), or SD3.5's image-only `attn2`.
    """

    def __init__(self, name: str, config: StyleAlignedConfig, state: SharedState, text_first: bool):
        super().__init__(name, config, state)
        self.text_first = text_first

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb=None, **kwargs) -> Tensor | tuple:
        q, k, v = self._project(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        text_tokens, inputs = 0, hidden_states
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            text = self._project(attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                                 getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None))
            q, k, v = (torch.cat([t, x] if self.text_first else [x, t], dim=-2) for x, t in zip((q, k, v), text))
        elif self.text_first:
            text_tokens = self.state.text_tokens
            inputs = hidden_states[:, text_tokens:]
        image_tokens = q.shape[-2] - text_tokens
        image = slice(text_tokens, None) if self.text_first else slice(0, image_tokens)

        rotate = rotate_shared = None
        if image_rotary_emb is not None:
            rotate = _rotation(image_rotary_emb)
            rotate_shared = _rotation(self.state.reference_rotary)
        mask = None if attention_mask is None else self.grouped_mask(attention_mask)
        out = self.attend(q, k, v, image, rotate, rotate_shared, mask, inputs,
                          projection(attn.to_k, attn.to_v, attn.heads, attn.norm_k))
        out = self.ungrouped(out).to(q.dtype)

        if encoder_hidden_states is None:
            if getattr(attn, "pre_only", False):  # FLUX single-stream: the block projects the output itself
                return out
            return attn.to_out[1](attn.to_out[0](out))
        text_out, image_out = (out[:, :text_tokens], out[:, text_tokens:]) if self.text_first else \
            (out[:, image_tokens:], out[:, :image_tokens])
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out

    def _project(self, attn, x: Tensor, to_q, to_k, to_v, norm_q, norm_k) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(self.grouped(split_heads(x, proj, attn.heads, norm))
                     for proj, norm in ((to_q, norm_q), (to_k, norm_k), (to_v, None)))

    def grouped_mask(self, mask: Tensor) -> Tensor:
        """The model's (batch, 1, N, N) attention mask as (groups, per group, 1, N, N)."""
        return mask.unflatten(0, (self.state.groups, self.state.split(mask.shape[0])))


def _rotation(rotary_emb):
    """Apply a (cos, sin) rotary embedding, as the stock FLUX processor does, to (..., heads, tokens, dim)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def rotate(x: Tensor) -> Tensor:
        return apply_rotary_emb(x.reshape(-1, *x.shape[-3:]), rotary_emb, sequence_dim=2).view(x.shape)

    return rotate


MASKED_BACKENDS = ("native", "_native_math", "_native_efficient")  # diffusers backends that take an additive mask


class DispatchedAttention:
    """diffusers' attention dispatcher (`dispatch_attention_fn`) with one backend, as an `attention_kernel`.

    `backend` None runs the active one (diffusers' `attention_backend` block). The dispatcher takes and returns
    (batch, tokens, heads, dim): these are views of our (batch, heads, tokens, dim), nothing is copied.
    """

    def __init__(self, backend):
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        self.backend = backend
        name = _AttentionBackendRegistry._active_backend if backend is None else backend
        self.takes_masks = str(getattr(name, "value", name)) in MASKED_BACKENDS

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                    scale=scale, backend=self.backend)
        return out.transpose(1, 2)


def backend_kernel(processor) -> DispatchedAttention | None:
    """The attention kernel a module's own `processor` runs, for ours to run too: the dispatcher with the user's
    backend where the processor goes through it (FLUX.1, Chroma) and a backend was chosen (`set_attention_backend`
    on the model, or a non-native active backend), else None: torch's SDPA, what the processor calls then (and
    what UNet and SD3 processors always call)."""
    if not hasattr(processor, "_attention_backend"):
        return None
    if processor._attention_backend is None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        if _AttentionBackendRegistry._active_backend == AttentionBackendName.NATIVE:
            return None
    return DispatchedAttention(processor._attention_backend)


def is_self_attention(module) -> bool:
    """True for a UNet's diffusers Attention modules that attend within the image (not to text)."""
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention) and not module.is_cross_attention
