"""GroupNorm whose statistics are computed jointly over each image and its reference.

Joint statistics over an image and its (equal-sized) reference follow from each one's own moments:
mean = (m + m_ref) / 2, var = (v + v_ref) / 2 + ((m - m_ref) / 2)^2, so no features are concatenated.
LayerNorm needs nothing here: its statistics are per token, so sharing them changes nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .processors import BATCH, RECORD, SharedState

Moments = tuple[Tensor, Tensor]


def normalised(x: Tensor, groups: int, eps: float, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[Tensor, Moments]:
    """x (batch, channels, ...) normalised by its own statistics per image and channel group (then scaled by
    `weight` and shifted by `bias` if given: GroupNorm itself), in fp32 or wider, and those moments: mean and
    biased variance, (batch, groups) each.

    One fused GroupNorm pass: separate passes over the features (moments, centring, scaling) cost several times it.
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    weight, bias = (None if p is None else p.to(wide.dtype) for p in (weight, bias))
    y, mean, rstd = torch.native_group_norm(wide, weight, bias, x.shape[0], x.shape[1], wide[0, 0].numel(), groups, eps)
    return y, (mean, rstd.square().reciprocal_().sub_(eps))


def joint_moments(own: Moments, ref: Moments) -> Moments:
    """Moments of the union of two equal-sized samples."""
    (mean, var), (ref_mean, ref_var) = own, ref
    return (mean + ref_mean) / 2, (var + ref_var) / 2 + ((mean - ref_mean) / 2) ** 2


def renormalised(x: Tensor, y: Tensor, norm: nn.GroupNorm, own: Moments, moments: Moments) -> Tensor:
    """GroupNorm of x with `moments` instead of its `own`, from y, x normalised by its own (`normalised`):
    (x - mean) / std * weight + bias = y * (std_own / std) * weight + ((mean_own - mean) / std * weight + bias),
    one multiply and one add per feature, in y's place (an addcmul broadcast along the features is slower on CPUs)."""
    shape, groups = x.shape, norm.num_groups
    inv_std = torch.rsqrt(moments[1] + norm.eps)
    scale, shift = (inv_std * torch.sqrt(own[1] + norm.eps))[..., None], ((own[0] - moments[0]) * inv_std)[..., None]
    if norm.affine:
        weight, bias = (p.view(1, groups, -1).to(y.dtype) for p in (norm.weight, norm.bias))
        scale, shift = scale * weight, torch.addcmul(bias, shift, weight)
    grouped = y.view(shape[0], groups, shape[1] // groups, -1)
    return grouped.mul_(scale[..., None]).add_(shift[..., None]).view(shape).to(x.dtype)


def shared_group_norm(norm: nn.GroupNorm, name: str, state: SharedState, x: Tensor) -> Tensor:
    """GroupNorm of x whose statistics are shared with the reference according to `state`."""
    if state.mode == RECORD:  # the references alone: their own statistics, kept for the targets
        out, state.cache[name] = normalised(x, norm.num_groups, norm.eps, norm.weight, norm.bias)
        return out.to(x.dtype)
    per_group = state.split(x.shape[0])
    y, own = normalised(x, norm.num_groups, norm.eps)
    mean, var = (m.view(state.groups, per_group, -1) for m in own)
    if state.mode == BATCH:
        ref = (mean[:, :1], var[:, :1])
    else:
        ref = tuple(m.view(state.groups, 1, -1) for m in state.cached(name))
    joint = tuple(m.reshape(x.shape[0], -1) for m in joint_moments((mean, var), ref))
    return renormalised(x, y, norm, own, joint)
