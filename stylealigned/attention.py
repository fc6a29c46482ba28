"""The method's math as pure tensor functions: AdaIN over tokens and attention shared with a reference.

Layout: a batch of images is split into G guidance groups (2 with classifier-free guidance, else 1) of M images;
image 0 of each group is that group's reference. Per-layer tensors are (G, M, heads, tokens, head_dim).

On transformers an image's tokens are text and image tokens: `image` (a slice of the token axis) says which are
image tokens, the only ones normalised and shared. `rotate` applies the layer's rotary embedding at an image's own
positions (text and image tokens); `rotate_shared` rotates the reference's image-token keys at the positions
targets see them at. Both are None on models without RoPE. Nothing here knows about diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import StyleAlignedConfig

EPS = 1e-5
ALL = slice(None)
Stats = tuple[Tensor, Tensor]
Rotation = Callable[[Tensor], Tensor] | None


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


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fused scaled-dot-product attention over (..., heads, tokens, head_dim), leading dims flattened for the kernel.

    `mask` (boolean: True attends, or additive) broadcasts against (..., heads, queries, keys).
    """
    lead = q.shape[:-3]
    if mask is not None and mask.ndim > 4:
        mask = mask.expand(*lead, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])
    out = F.scaled_dot_product_attention(q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:]),
                                         v.reshape(-1, *v.shape[-3:]), attn_mask=mask)
    return out.reshape(*lead, *out.shape[-3:])


def rotated(x: Tensor, rotate: Rotation, overwrite: bool = False) -> Tensor:
    """x with the rotary embedding applied (unchanged on models without RoPE); into x itself if `overwrite`."""
    if rotate is None:
        return x
    return x.copy_(rotate(x)) if overwrite else rotate(x)


def on_tokens(x: Tensor, tokens: slice, fn: Callable[[Tensor], Tensor], overwrite: bool = False) -> Tensor:
    """x with `fn` applied to the given slice of its token axis (dim -2) only; into x itself if `overwrite`."""
    if tokens == ALL and not overwrite:
        return fn(x)
    out = x if overwrite else x.clone()
    out[..., tokens, :] = fn(x[..., tokens, :])
    return out


def attend_with_reference(q: Tensor, k: Tensor, v: Tensor, ref_k: Tensor, ref_v: Tensor,
                          score_scale: float = 1.0, score_shift: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """Targets (G, T, H, N, D) attend to their own tokens and to their group's shared reference tokens (G, H, R, D).

    The reference keys are multiplied by `score_scale`; `score_shift` is added to the logits toward them
    (`key_biased_attention`: no logits tensor is built here). `mask` (G, T, 1, N, N), boolean (True attends) or
    additive, masks the targets' own keys; the shared keys are never masked.
    """
    groups, targets = q.shape[:2]
    ref_k = ref_k * score_scale if score_scale != 1.0 else ref_k
    keys = torch.cat([k, ref_k[:, None].expand(groups, targets, *ref_k.shape[1:])], dim=-2)
    values = torch.cat([v, ref_v[:, None].expand(groups, targets, *ref_v.shape[1:])], dim=-2)
    key_bias = None
    if score_shift != 0.0:
        key_bias = torch.zeros(keys.shape[-2], dtype=q.dtype, device=q.device)
        key_bias[k.shape[-2]:] = score_shift
    return key_biased_attention(q, keys, values, key_bias, mask)


def key_biased_attention(q: Tensor, keys: Tensor, values: Tensor, key_bias: Tensor | None = None,
                         mask: Tensor | None = None) -> Tensor:
    """Attention where `key_bias` (keys,) is added to every query's logit toward each key (None: no bias).

    `mask` (..., 1, N, N'), boolean (True attends) or additive, covers the first N' keys; keys past it are never
    masked.
    """
    if mask is None:
        return attention(q, keys, values, None if key_bias is None else key_bias.view(1, 1, 1, -1))
    own = mask.to(q.dtype) if mask.is_floating_point() else torch.zeros(
        mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    extra = keys.shape[-2] - own.shape[-1]
    shared = torch.zeros((*own.shape[:-1], extra), dtype=q.dtype, device=q.device)
    bias = torch.cat([own, shared], dim=-1)
    if key_bias is not None:
        bias = bias + key_bias
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
    """One layer's view of the references: the shared keys and values, and the AdaIN statistics of targets."""

    key: Tensor  # (G, H, R, D): the reference's image-token keys, rotated where targets see them, unscaled
    value: Tensor
    query_stats: Stats | None
    key_stats: Stats | None
    value_stats: Stats | None


def make_reference(q: Tensor, k: Tensor, v: Tensor, config: StyleAlignedConfig, image: slice = ALL,
                   rotate_shared: Rotation = None) -> Reference:
    """Collect what targets need from the references' (G, H, N, D) queries, keys and values (before RoPE)."""
    q, k, v = q[..., image, :], k[..., image, :], v[..., image, :]
    return Reference(
        key=rotated(k, rotate_shared), value=v,
        query_stats=token_stats(q) if config.adain_queries else None,
        key_stats=token_stats(k) if config.adain_keys else None,
        value_stats=token_stats(v) if config.adain_values else None,
    )


def align_targets(q: Tensor, k: Tensor, v: Tensor, ref: Reference, config: StyleAlignedConfig, image: slice = ALL,
                  rotate: Rotation = None, mask: Tensor | None = None, overwrite: bool = False) -> Tensor:
    """Targets (G, T, H, N, D), before RoPE: AdaIN of their image tokens to the reference's, RoPE, then attention
    to their own tokens and, per the config, to the reference's shared tokens.

    `overwrite`: normalise and rotate q, k, v in place (a processor's own projections), so that no second copy of
    them is alive while the targets attend.
    """

    def normalised(x: Tensor, ref_stats: Stats | None) -> Tensor:
        if ref_stats is None:
            return x
        ref_stats = (ref_stats[0][:, None], ref_stats[1][:, None])
        return on_tokens(x, image, lambda tokens: adain(tokens, token_stats(tokens), ref_stats), overwrite)

    q, k, v = normalised(q, ref.query_stats), normalised(k, ref.key_stats), normalised(v, ref.value_stats)
    q, k = rotated(q, rotate, overwrite), rotated(k, rotate, overwrite)
    if not config.share_attention:
        return attention(q, k, v, mask)
    return attend_with_reference(q, k, v, ref.key, ref.value, config.shared_score_scale, config.shared_score_shift,
                                 mask)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, rotate: Rotation = None,
                        mask: Tensor | None = None) -> Tensor:
    """The references (G, H, N, D) attend to their own tokens only: the stock model's attention."""
    return attention(rotated(q, rotate), rotated(k, rotate), v, mask)


def shared_attention(q: Tensor, k: Tensor, v: Tensor, config: StyleAlignedConfig, image: slice = ALL,
                     rotate: Rotation = None, rotate_shared: Rotation = None, mask: Tensor | None = None,
                     overwrite: bool = False) -> Tensor:
    """Attention of (G, M, H, N, D) images (before RoPE) where image 0 of each group is the reference.

    The reference attends to itself only, exactly as if generated alone (in the paper's formulation it also
    sees a copy of itself, which leaves its softmax unchanged); targets follow `align_targets` (`overwrite`: their
    rows of q, k, v are overwritten). `mask` (G, M, 1, N, N) is the model's own attention mask, if any.
    """
    if config.full_attention_share:
        return full_attention_share(q, k, v)
    ref_q, ref_k, ref_v = q[:, 0], k[:, 0], v[:, 0]
    ref_out = reference_attention(ref_q, ref_k, ref_v, rotate, None if mask is None else mask[:, 0])[:, None]
    if q.shape[1] == 1:
        return ref_out
    ref = make_reference(ref_q, ref_k, ref_v, config, image, rotate_shared)
    targets = align_targets(q[:, 1:], k[:, 1:], v[:, 1:], ref, config, image, rotate,
                            None if mask is None else mask[:, 1:], overwrite)
    return torch.cat([ref_out, targets], dim=1)
