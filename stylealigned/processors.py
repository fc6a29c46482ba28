"""A diffusers attention processor for self-attention shared with a reference image.

The processor only projects and reshapes; the method's math lives in `attention.py`. It knows nothing about
pipelines: `SharedState` tells it how the batch is laid out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .attention import align_targets, attention, make_reference, shared_attention
from .config import StyleAlignedConfig

BATCH, RECORD, REPLAY = "batch", "record", "replay"


@dataclass
class SharedState:
    """Batch layout shared by every patched layer of one UNet.

    mode BATCH: each of `groups` guidance groups starts with its reference image.
    mode RECORD: the batch holds only the references; layers store what targets need in `cache`.
    mode REPLAY: the batch holds only targets; layers use the references stored by the last RECORD pass.
    """

    groups: int = 1
    mode: str = BATCH
    cache: dict[str, Any] = field(default_factory=dict)

    def split(self, batch: int) -> int:
        """Images per guidance group for a batch of this size."""
        if batch % self.groups:
            raise ValueError(f"batch of {batch} does not split into {self.groups} guidance groups")
        return batch // self.groups


class StyleAlignedAttnProcessor:
    """Self-attention in which targets see their group's reference (drop-in for diffusers' AttnProcessor2_0)."""

    def __init__(self, name: str, config: StyleAlignedConfig, state: SharedState):
        self.name, self.config, self.state = name, config, state

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: StyleAligned shares self-attention only, without attention masks")
        residual, input_shape = hidden_states, hidden_states.shape
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        batch, tokens, _ = hidden_states.shape
        per_group = self.state.split(batch)
        heads = attn.heads

        def split_heads(x: Tensor) -> Tensor:
            return x.view(self.state.groups, per_group, tokens, heads, -1).transpose(2, 3)

        q, k, v = (split_heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)

        out = self._attend(q, k, v)
        hidden_states = out.transpose(2, 3).reshape(batch, tokens, -1).to(q.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if len(input_shape) == 4:
            hidden_states = hidden_states.transpose(1, 2).reshape(input_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        mode = self.state.mode
        if mode == BATCH:
            return shared_attention(q, k, v, self.config)
        if self.config.full_attention_share:
            raise ValueError("full_attention_share shares among all images at once and cannot run in chunks")
        if mode == RECORD:
            self.state.cache[self.name] = make_reference(q[:, 0], k[:, 0], v[:, 0], self.config)
            return attention(q, k, v)
        return align_targets(q, k, v, self.state.cache[self.name], self.config)


def is_self_attention(module: torch.nn.Module) -> bool:
    """True for diffusers Attention modules that attend within the image (not to text)."""
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention) and not module.is_cross_attention
