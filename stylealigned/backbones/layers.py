"""Attention primitives: how one kind of attention module projects its tokens, and finishes its output.

The shared processor (`processors.SharedProcessor`) is family-free: for each shared layer it asks the layer's
`AttentionKind` (supplied by the family's backbone) to

- `project`: turn the module's call into `Tokens`: queries, keys and values after the q/k norms and before RoPE,
  which tokens are image tokens, the rotations at each image's own positions and at the positions targets see the
  reference at, the model's key mask;
- `finish`: turn the attention output into what the module returns (output projections, a parallel MLP).

The kinds here are shared by several families (a UNet's self-attention; joint text-and-image attention in one or
two streams); a family with another layout writes its own in its backbone module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import ALL

Rotation = Callable[[Tensor], Tensor] | None


@dataclass
class Tokens:
    """One attention call's tokens, as the shared processor takes them. Tensors are (batch, heads, tokens, dim)."""

    q: Tensor
    k: Tensor
    v: Tensor
    image: slice = field(default_factory=lambda: ALL)  # the image tokens: the only ones normalised and shared
    rotate: Rotation = None         # RoPE at each image's own positions, over all its tokens
    rotate_shared: Rotation = None  # RoPE of the shared reference image keys, at the positions targets see them
    mask: Tensor | None = None      # (batch, 1, 1 or queries, keys): the model's own key mask
    rest: Any = None                # what `finish` needs besides the output (text length, an MLP half, ...)
    inputs: Tensor | None = None    # (batch, tokens, C): the input `keys_values` projects, given by a kind whose
    # chunked sets cache it instead of the reference's keys and values (half their size, projected again per chunk)


class AttentionKind:
    """The primitives of one kind of attention module (one instance per kind, shared by its layers)."""

    # the names of the arguments the module passes its processor by position after hidden_states
    positional: tuple[str, ...] = ("encoder_hidden_states", "attention_mask", "image_rotary_emb")

    def project(self, attn, state, hidden_states: Tensor, **kwargs) -> Tokens:
        """The module's call (its processor's arguments by name) as `Tokens`; `state.call` holds this call's layout
        facts."""
        raise NotImplementedError

    def keys_values(self, attn, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (..., heads, tokens, dim), before RoPE, of the module's input x (..., tokens, C)."""
        return heads_of(attn.to_k(x), attn.heads, attn.norm_k), heads_of(attn.to_v(x), attn.heads)

    def finish(self, attn, out: Tensor, tokens: Tokens):
        """The module's return value from the attention output (batch, tokens, heads * dim)."""
        raise NotImplementedError


def heads_of(x: Tensor, heads: int, norm=None) -> Tensor:
    """(..., tokens, heads * dim) -> (..., heads, tokens, dim), normalised by `norm` (over dim) if given."""
    x = x.unflatten(-1, (heads, -1))
    return (x if norm is None else norm(x)).transpose(-2, -3)


def rows(linear: torch.nn.Linear, start: int, stop: int) -> Callable[[Tensor], Tensor]:
    """The output features start:stop of a fused linear layer, as a layer of their own (no other rows computed)."""
    bias = None if linear.bias is None else linear.bias[start:stop]
    return lambda x: F.linear(x, linear.weight[start:stop], bias)


def real_rotation(rotary) -> Rotation:
    """Apply a real (cos, sin) rotary embedding, as diffusers' FLUX processors do, to (..., heads, tokens, dim)."""
    if rotary is None:
        return None
    from diffusers.models.embeddings import apply_rotary_emb

    def rotate(x: Tensor) -> Tensor:
        return apply_rotary_emb(x.reshape(-1, *x.shape[-3:]), rotary, sequence_dim=2).view(x.shape)

    return rotate


def complex_rotation(freqs: Tensor) -> Rotation:
    """Apply a complex rotary embedding (tokens, dim / 2), pairs of adjacent channels as complex numbers, in fp32."""

    def rotate(x: Tensor) -> Tensor:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)

    return rotate


def joined(*parts: tuple[Rotation, int]) -> Rotation:
    """One rotation over a sequence made of consecutive parts, each (its rotation or None, its length)."""
    if all(rotate is None for rotate, _ in parts):
        return None

    def rotate(x: Tensor) -> Tensor:
        pieces = x.split([length for _, length in parts], dim=-2)
        return torch.cat([piece if fn is None else fn(piece) for piece, (fn, _) in zip(pieces, parts)], dim=-2)

    return rotate


def image_slice(state, start: int, image_tokens: int) -> slice:
    """The image tokens of the set among `image_tokens` from `start`: all of them, or the first
    `state.call["image_tokens"]` where the image stream also holds others (FLUX.2's conditioning images)."""
    return slice(start, start + state.call.get("image_tokens", image_tokens))


def call_rotations(attn, state, kwargs, text_tokens, image_tokens) -> tuple[Rotation, Rotation]:
    """The call's own (cos, sin) rotary embedding over its tokens, and the shared keys' one that the backbone's
    `begin_call` put in `state.call["reference_rotary"]` (FLUX.1, FLUX.2)."""
    return real_rotation(kwargs.get("image_rotary_emb")), real_rotation(state.call["reference_rotary"])


class SelfAttention(AttentionKind):
    """A UNet's self-attention (diffusers `Attention` with AttnProcessor2_0): every token an image token."""

    def project(self, attn, state, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("StyleAligned shares a UNet's self-attention only, without masks")
        residual, shape = hidden_states, hidden_states.shape
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = heads_of(attn.to_q(hidden_states), attn.heads, attn.norm_q)
        k, v = self.keys_values(attn, hidden_states)
        return Tokens(q, k, v, rest=(residual, shape))

    def finish(self, attn, out, tokens):
        residual, shape = tokens.rest
        out = attn.to_out[1](attn.to_out[0](out))
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointAttention(AttentionKind):
    """Attention over text and image tokens in two streams joined for the call (FLUX.1, SD3, Qwen-Image, FLUX.2
    double-stream blocks): image tokens projected by to_q/k/v, text by add_q/k/v_proj, each with its own q/k norms.

    `text_first`: the joined order is [text, image] (else [image, text]). Called without `encoder_hidden_states`
    the module sees one sequence: a single-stream block's [text, image] (`state.call["text_tokens"]` long text)
    or an image-only attention. Only the set's image tokens are shared (`image_slice`). `rotations(attn, state, kwargs, text, image)` gives (rotate, rotate_shared) for a
    call with that many text and image tokens (None, None without RoPE).
    """

    def __init__(self, text_first: bool, rotations=None):
        self.text_first, self.rotations = text_first, rotations

    def project(self, attn, state, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q, k, v = self.image_streams(attn, hidden_states)
        text_tokens = 0
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            text = self.text_streams(attn, encoder_hidden_states)
            q, k, v = (torch.cat([t, x] if self.text_first else [x, t], dim=-2) for x, t in zip((q, k, v), text))
        elif self.text_first:
            text_tokens = state.call.get("text_tokens", 0)
        image_tokens = q.shape[-2] - text_tokens
        image = image_slice(state, text_tokens if self.text_first else 0, image_tokens)
        rotate, rotate_shared = (None, None) if self.rotations is None else self.rotations(
            attn, state, kwargs, text_tokens, image_tokens)
        mask = self.key_mask(attn, state, kwargs, attention_mask, text_tokens, image_tokens)
        return Tokens(q, k, v, image, rotate, rotate_shared, mask,
                      rest=(text_tokens, encoder_hidden_states is not None))

    def key_mask(self, attn, state, kwargs, attention_mask, text_tokens, image_tokens):
        """The model's mask over the call's keys (None: every key attends)."""
        return attention_mask

    def image_streams(self, attn, x):
        return (heads_of(attn.to_q(x), attn.heads, attn.norm_q), *self.keys_values(attn, x))

    def text_streams(self, attn, x):
        norm_q, norm_k = getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)
        return (heads_of(attn.add_q_proj(x), attn.heads, norm_q), heads_of(attn.add_k_proj(x), attn.heads, norm_k),
                heads_of(attn.add_v_proj(x), attn.heads))

    def finish(self, attn, out, tokens):
        text_tokens, two_streams = tokens.rest
        if not two_streams:
            if getattr(attn, "pre_only", False):  # a single-stream block projects the output itself
                return out
            return attn.to_out[1](attn.to_out[0](out))
        image_tokens = out.shape[1] - text_tokens
        text_out, image_out = (out[:, :text_tokens], out[:, text_tokens:]) if self.text_first else \
            (out[:, image_tokens:], out[:, :image_tokens])
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out
