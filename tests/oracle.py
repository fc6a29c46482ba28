"""Slow, explicit, loop-per-image reference implementation of the paper's equations: the oracle for every fast path.

It follows the paper's released code literally: every image (the reference too) is AdaIN-normalised to the
reference, the reference's keys and values are concatenated to every image's own (the reference thus sees itself
twice), targets see the reference keys scaled, and the shift is added to explicit logits. With several
references (`several_references`) the rules are written out anew: each reference alone, targets AdaIN-ed to the
references' weighted mixture and attending to all of them with log-weight logit shifts.
"""

import math

import torch
from torch import nn

EPS = 1e-5


def adain(x, ref):
    """(x - mean(x)) / std(x) * std(ref) + mean(ref), statistics over tokens (dim -2)."""
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + EPS).sqrt()
    ref_mean, ref_std = ref.mean(-2, keepdim=True), (ref.var(-2, keepdim=True) + EPS).sqrt()
    return (x - mean) / std * ref_std + ref_mean


def softmax_attention(q, k, v, shift_from=None, shift=0.0):
    """softmax(q k^T / sqrt(d) + shift on keys from `shift_from` on) v, logits built explicitly."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if shift_from is not None:
        logits[..., shift_from:] += shift
    return logits.softmax(-1) @ v


def mixture_moments(refs, weights):
    """Mean and std over tokens of the mixture of the references' token distributions, weighted: the mixture mean
    and the mixture's second moment minus its squared mean, each reference's variance unbiased + EPS."""
    mean = sum(w * ref.mean(-2, keepdim=True) for w, ref in zip(weights, refs))
    second = sum(w * (ref.var(-2, keepdim=True) + EPS + ref.mean(-2, keepdim=True) ** 2)
                 for w, ref in zip(weights, refs))
    return mean, (second - mean ** 2).sqrt()


def adain_to_mixture(x, refs, weights):
    """x renormalised from its own token statistics to the references' mixture."""
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + EPS).sqrt()
    ref_mean, ref_std = mixture_moments(refs, weights)
    return (x - mean) / std * ref_std + ref_mean


def several_references(q, k, v, r, n, count, weights, config):
    """Image n of the group starting at row r, whose first `count` images are references mixed by `weights`: a
    reference attends to itself alone; a target, AdaIN-ed to the mixture, attends to its own tokens and to every
    reference's raw keys (scaled) and values, the logits toward reference j shifted by shift + log(weights[j])."""
    if n - r < count:
        return softmax_attention(q[n], k[n], v[n])
    refs = range(r, r + count)
    qi = adain_to_mixture(q[n], [q[j] for j in refs], weights) if config.adain_queries else q[n]
    ki = adain_to_mixture(k[n], [k[j] for j in refs], weights) if config.adain_keys else k[n]
    vi = adain_to_mixture(v[n], [v[j] for j in refs], weights) if config.adain_values else v[n]
    if not config.share_attention:
        return softmax_attention(qi, ki, vi)
    keys = torch.cat([ki] + [config.shared_score_scale * k[j] for j in refs], dim=-2)
    values = torch.cat([vi] + [v[j] for j in refs], dim=-2)
    logits = qi @ keys.transpose(-1, -2) / math.sqrt(qi.shape[-1])
    tokens = q.shape[-2]
    for j, weight in enumerate(weights):
        logits[..., tokens * (j + 1):tokens * (j + 2)] += config.shared_score_shift + (
            math.log(weight) if weight > 0 else -math.inf)
    return logits.softmax(-1) @ values


def family_config(pipe, config, gates: bool = False):
    """The knobs an oracle on `pipe` applies: those `config` leaves to the family set to its values (data, not
    rules: the oracles take them as the package resolves them). An oracle that cannot stop sharing on the way
    (`gates` False: it sees no timestep) refuses a config whose `share_until` would. A stand-in config (the oracle's
    own tests) is taken as it is."""
    from stylealigned.backbones import backbone_for

    if not hasattr(config, "resolved"):
        return config
    config = backbone_for(pipe).resolve(config)
    assert gates or config.share_until == 0, "this oracle shares at every step: give share_until=0"
    return config


def paper_config(config):
    """`config` with the knobs left to the family at the paper's values, as the attention functions take them when
    called directly; a stand-in config as it is."""
    return config.resolved() if hasattr(config, "resolved") else config


def self_attention(q, k, v, groups, config, weights=(1.0,)):
    """Shared self-attention of a (batch, heads, tokens, dim) batch split into `groups` guidance groups, each
    starting with len(weights) references (the paper's one, or several mixed by `weights`); knobs left to the
    family take the paper's values."""
    config = paper_config(config)
    batch, _, tokens, _ = q.shape
    per_group = batch // groups
    out = torch.empty_like(q)
    weights = [w / sum(weights) for w in weights]
    for g in range(groups):
        r = g * per_group
        if len(weights) > 1:
            for n in range(r, r + per_group):
                out[n] = several_references(q, k, v, r, n, len(weights), weights, config)
            continue
        for i in range(per_group):
            n = r + i
            if config.full_attention_share:
                keys = torch.cat([k[r + j] for j in range(per_group)], dim=-2)
                values = torch.cat([v[r + j] for j in range(per_group)], dim=-2)
                out[n] = softmax_attention(q[n], keys, values)
                continue
            qi = adain(q[n], q[r]) if config.adain_queries else q[n]
            ki = adain(k[n], k[r]) if config.adain_keys else k[n]
            vi = adain(v[n], v[r]) if config.adain_values else v[n]
            if not config.share_attention:
                out[n] = softmax_attention(qi, ki, vi)
                continue
            ref_k = adain(k[r], k[r]) if config.adain_keys else k[r]
            ref_v = adain(v[r], v[r]) if config.adain_values else v[r]
            scale = 1.0 if i == 0 else config.shared_score_scale
            keys, values = torch.cat([ki, scale * ref_k], dim=-2), torch.cat([vi, ref_v], dim=-2)
            out[n] = softmax_attention(qi, keys, values, shift_from=tokens, shift=config.shared_score_shift)
    return out


class OracleProcessor:
    """A diffusers attention processor running the oracle, for end-to-end comparisons on a pipeline."""

    def __init__(self, config, groups, weights=(1.0,)):
        self.config, self.groups, self.weights = paper_config(config), groups, weights

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        shape = hidden_states.shape
        x = hidden_states.flatten(2).transpose(1, 2) if len(shape) == 4 else hidden_states
        batch, tokens, _ = x.shape

        def heads(t):
            return t.view(batch, tokens, attn.heads, -1).transpose(1, 2)

        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        out = self_attention(q, k, v, self.groups, self.config, self.weights)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def shared_group_norm(norm: nn.GroupNorm, groups: int):
    """The paper's shared GroupNorm: concatenate the reference along height, normalise, keep the image's half."""
    original = norm.forward

    def forward(x):
        per_group = x.shape[0] // groups
        refs = torch.cat([x[g * per_group].expand_as(x[:per_group]) for g in range(groups)])
        height = x.shape[-2]
        return original(torch.cat([x, refs], dim=-2))[..., :height, :]

    return forward


def install(pipe, config, groups, weights=(1.0,)):
    """Put the oracle on the UNet's shared self-attention layers (and GroupNorms if shared), K = len(weights)
    references per guidance group."""
    from stylealigned.apply import layers_to_share
    from stylealigned.backbones import backbone_for

    processors = dict(pipe.unet.attn_processors)
    for name in layers_to_share(backbone_for(pipe), config):
        processors[f"{name}.processor"] = OracleProcessor(config, groups, weights)
    pipe.unet.set_attn_processor(processors)
    if config.share_group_norm:
        for module in pipe.unet.modules():
            if isinstance(module, nn.GroupNorm):
                module.forward = shared_group_norm(module, groups)
