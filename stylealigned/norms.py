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
    """Mean and biased variance per image and channel group of x (batch, channels, ...), in fp32 or wider."""
    x = x.reshape(x.shape[0], groups, -1)
    var, mean = torch.var_mean(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, keepdim=True, correction=0)
    return mean, var


def joint_moments(own: Moments, ref: Moments) -> Moments:
    """Moments of the union of two equal-sized samples."""
    (mean, var), (ref_mean, ref_var) = own, ref
    return (mean + ref_mean) / 2, (var + ref_var) / 2 + ((mean - ref_mean) / 2) ** 2


def normalise(x: Tensor, norm: nn.GroupNorm, moments: Moments) -> Tensor:
    """GroupNorm of x with the given moments instead of its own."""
    mean, var = moments
    shape = x.shape
    y = (x.reshape(shape[0], norm.num_groups, -1).to(mean.dtype) - mean) * torch.rsqrt(var + norm.eps)
    y = y.reshape(shape).to(x.dtype)
    if norm.affine:
        affine_shape = (1, -1) + (1,) * (len(shape) - 2)
        y = y * norm.weight.reshape(affine_shape) + norm.bias.reshape(affine_shape)
    return y


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
