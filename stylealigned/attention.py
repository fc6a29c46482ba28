"""The method's math as pure tensor functions: AdaIN over tokens and attention shared with a reference.

Layout: a batch of images is split into G guidance groups (2 with classifier-free guidance, else 1) of M images;
image 0 of each group is that group's reference. Per-layer tensors are (G, M, heads, tokens, head_dim).
Nothing here knows about diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import StyleAlignedConfig

EPS = 1e-5
Stats = tuple[Tensor, Tensor]


def token_stats(x: Tensor) -> Stats:
    """Mean and std over tokens (dim -2) per head and channel; unbiased variance + EPS under the root.

    A layer with a single token (a 1x1 bottleneck at tiny sizes) has no unbiased variance; it gets 0, not NaN.
    """
    var, mean = torch.var_mean(x, dim=-2, keepdim=True, correction=min(1, x.shape[-2] - 1))
    return mean, (var + EPS).sqrt()


def adain(x: Tensor, stats: Stats, ref_stats: Stats) -> Tensor:
    """Renormalise x from its own token statistics to the reference's: (x - mu) / sigma * sigma_ref + mu_ref."""
    (mean, std), (ref_mean, ref_std) = stats, ref_stats
    gain = ref_std / std
    return torch.addcmul(ref_mean - mean * gain, x, gain)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Fused scaled-dot-product attention over (..., tokens, head_dim), leading dims flattened for the kernel."""
    lead = q.shape[:-3]
    out = F.scaled_dot_product_attention(q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:]),
                                         v.reshape(-1, *v.shape[-3:]), attn_mask=bias)
    return out.reshape(*lead, *out.shape[-3:])


def attend_with_reference(q: Tensor, k: Tensor, v: Tensor, ref_k: Tensor, ref_v: Tensor,
                          score_scale: float = 1.0, score_shift: float = 0.0) -> Tensor:
    """Targets (G, T, H, N, D) attend to their own tokens and to their group's reference tokens (G, H, R, D).

    The reference keys are multiplied by `score_scale`; `score_shift` is added to the logits toward them
    through an additive bias inside the fused kernel (no logits tensor is built here).
    """
    groups, targets = q.shape[:2]
    ref_k = ref_k * score_scale if score_scale != 1.0 else ref_k
    keys = torch.cat([k, ref_k[:, None].expand(groups, targets, *ref_k.shape[1:])], dim=-2)
    values = torch.cat([v, ref_v[:, None].expand(groups, targets, *ref_v.shape[1:])], dim=-2)
    bias = None
    if score_shift != 0.0:
        bias = torch.zeros(1, 1, 1, keys.shape[-2], dtype=q.dtype, device=q.device)
        bias[..., k.shape[-2]:] = score_shift
    return attention(q, keys, values, bias)


def full_attention_share(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The paper's ablation: every image attends to all tokens of all images in its group."""
    groups, images, heads, tokens, dim = q.shape

    def joined(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(groups, heads, images * tokens, dim)

    out = attention(joined(q), joined(k), joined(v))
    return out.reshape(groups, heads, images, tokens, dim).transpose(1, 2)


@dataclass
class Reference:
    """One layer's view of the references: keys, values and the AdaIN statistics targets are aligned to."""

    key: Tensor  # (G, H, R, D)
    value: Tensor
    query_stats: Stats | None
    key_stats: Stats | None
    value_stats: Stats | None


def make_reference(q: Tensor, k: Tensor, v: Tensor, config: StyleAlignedConfig) -> Reference:
    """Collect what targets need from the references' (G, H, R, D) queries, keys and values."""
    return Reference(
        key=k, value=v,
        query_stats=token_stats(q) if config.adain_queries else None,
        key_stats=token_stats(k) if config.adain_keys else None,
        value_stats=token_stats(v) if config.adain_values else None,
    )


def align_targets(q: Tensor, k: Tensor, v: Tensor, ref: Reference, config: StyleAlignedConfig) -> Tensor:
    """Targets (G, T, H, N, D): AdaIN to the reference, then attention shared with it (per the config)."""

    def normalised(x: Tensor, ref_stats: Stats | None) -> Tensor:
        if ref_stats is None:
            return x
        return adain(x, token_stats(x), (ref_stats[0][:, None], ref_stats[1][:, None]))

    q, k, v = normalised(q, ref.query_stats), normalised(k, ref.key_stats), normalised(v, ref.value_stats)
    if not config.share_attention:
        return attention(q, k, v)
    return attend_with_reference(q, k, v, ref.key, ref.value, config.shared_score_scale, config.shared_score_shift)


def shared_attention(q: Tensor, k: Tensor, v: Tensor, config: StyleAlignedConfig) -> Tensor:
    """Self-attention of (G, M, H, N, D) images where image 0 of each group is the reference.

    The reference attends to itself only, exactly as if generated alone (in the paper's formulation it also
    sees a copy of itself, which leaves its softmax unchanged); targets follow `align_targets`.
    """
    if config.full_attention_share:
        return full_attention_share(q, k, v)
    ref_q, ref_k, ref_v = q[:, 0], k[:, 0], v[:, 0]
    ref_out = attention(ref_q, ref_k, ref_v)[:, None]
    if q.shape[1] == 1:
        return ref_out
    ref = make_reference(ref_q, ref_k, ref_v, config)
    return torch.cat([ref_out, align_targets(q[:, 1:], k[:, 1:], v[:, 1:], ref, config)], dim=1)
