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


def group_moments(x: Tensor, groups: int) -> Moments:
    """Mean and biased variance per image and channel group of x (batch, channels, ...), in fp32 or wider.

    Two plain passes: torch.var_mean runs a scalar float64 loop on CPUs, several times slower than GroupNorm.
    """
    x = x.reshape(x.shape[0], groups, -1).to(torch.promote_types(x.dtype, torch.float32))
    mean = x.mean(-1, keepdim=True)
    return mean, (x - mean).square_().mean(-1, keepdim=True)


def joint_moments(own: Moments, ref: Moments) -> Moments:
    """Moments of the union of two equal-sized samples."""
    (mean, var), (ref_mean, ref_var) = own, ref
    return (mean + ref_mean) / 2, (var + ref_var) / 2 + ((mean - ref_mean) / 2) ** 2


def normalise(x: Tensor, norm: nn.GroupNorm, moments: Moments) -> Tensor:
    """GroupNorm of x with the given moments instead of its own: (x - mean) * (weight / std) + bias, in the
    moments' precision, in two passes."""
    mean, var = moments
    shape, groups = x.shape, norm.num_groups
    grouped = x.reshape(shape[0], groups, shape[1] // groups, -1).to(mean.dtype)
    scale = torch.rsqrt(var + norm.eps)[..., None]
    centred = grouped - mean[..., None]
    if not norm.affine:
        return (centred * scale).reshape(shape).to(x.dtype)
    weight, bias = (p.view(1, groups, -1, 1).to(mean.dtype) for p in (norm.weight, norm.bias))
    return torch.addcmul(bias, centred, scale * weight).reshape(shape).to(x.dtype)


def shared_group_norm(norm: nn.GroupNorm, name: str, state: SharedState, x: Tensor) -> Tensor:
    """GroupNorm of x whose statistics are shared with the reference according to `state`."""
    per_group = state.split(x.shape[0])
    moments = group_moments(x, norm.num_groups)
    if state.mode == RECORD:
        state.cache[name] = moments
        return normalise(x, norm, moments)
    mean, var = (m.view(state.groups, per_group, *m.shape[1:]) for m in moments)
    if state.mode == BATCH:
        ref = (mean[:, :1], var[:, :1])
    else:
        ref = tuple(m.view(state.groups, 1, *m.shape[1:]) for m in state.cache[name])
    joint = joint_moments((mean, var), ref)
    return normalise(x, norm, tuple(m.reshape(x.shape[0], *m.shape[2:]) for m in joint))
