"""The method's math as pure tensor functions: AdaIN over tokens and attention shared with a reference.

Layout: a batch of images is split into G guidance groups (2 with classifier-free guidance, else 1) of M images;
the first K images of each group (usually K = 1) are that group's references, mixed by weights that sum to 1.
Per-layer tensors are (G, M, heads, tokens, head_dim).

On transformers an image's tokens are text and image tokens: `image` (a slice of the token axis) says which are
image tokens, the only ones normalised and shared. `rotate` applies the layer's rotary embedding at an image's own
positions (text and image tokens); `rotate_shared` rotates the reference's image-token keys at the positions
targets see them at. Both are None on models without RoPE. `kernel` runs the attention (None: torch's SDPA), e.g.
the attention backend a user chose; it is passed down, never kept. Nothing here knows about diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import StyleAlignedConfig

EPS = 1e-5
ALL = slice(None)
Stats = tuple[Tensor, Tensor]
Rotation = Callable[[Tensor], Tensor] | None
# attention over (batch, heads, tokens, head_dim) with keywords attn_mask and scale, as SDPA takes them; one whose
# `takes_masks` attribute is not true gets key biases as a head channel (`channel_bias`), never a mask
Kernel = Callable[..., Tensor]


def token_stats(x: Tensor) -> Stats:
    """Mean and std over tokens (dim -2) per head and channel; unbiased variance + EPS under the root.

    Two passes in float32 or wider (torch.var_mean's scalar float64 loop on CPUs costs more than a small layer's
    attention). A layer with a single token (a 1x1 bottleneck at tiny sizes) has no unbiased variance; it gets 0,
    not NaN.
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = wide.mean(-2, keepdim=True)
    var = (wide - mean).square_().sum(-2, keepdim=True) / max(x.shape[-2] - 1, 1)
    return mean.to(x.dtype), (var + EPS).sqrt_().to(x.dtype)


def adain(x: Tensor, stats: Stats, ref_stats: Stats, out: Tensor | None = None) -> Tensor:
    """Renormalise x from its own token statistics to the reference's: (x - mu) / sigma * sigma_ref + mu_ref,
    written into `out` if given (x itself is fine; through a copy where autograd records, which out= cannot).

    Centred first, as written: folding mu into one shift (x * gain + (mu_ref - mu * gain)) cancels catastrophically
    in float32 where the mean outweighs the spread.
    """
    (mean, std), (ref_mean, ref_std) = stats, ref_stats
    gain = ref_std / std
    if (torch.compiler.is_compiling()  # dynamo traces no out= into a strided view
            or torch.is_grad_enabled() and (x.requires_grad or gain.requires_grad)):
        renormalised = torch.addcmul(ref_mean, x - mean, gain)
        return renormalised if out is None else out.copy_(renormalised)
    centred = torch.sub(x, mean, out=out)
    return torch.addcmul(ref_mean, centred, gain, out=centred)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None,
              kernel: Kernel | None = None) -> Tensor:
    """Fused scaled-dot-product attention over (..., heads, tokens, head_dim), leading dims flattened for the kernel.

    `mask` (boolean: True attends, or additive) broadcasts against (..., heads, queries, keys); `scale` multiplies
    the logits (None: 1 / sqrt(head_dim)). Runs `kernel`, or torch's SDPA.
    """
    lead = q.shape[:-3]
    if mask is not None and mask.ndim > 4:
        mask = mask.expand(*lead, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])
    kernel = kernel or F.scaled_dot_product_attention
    out = kernel(q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:]), v.reshape(-1, *v.shape[-3:]),
                 attn_mask=mask, scale=scale)
    return out.reshape(*lead, *out.shape[-3:])


def for_rows(rotate: Rotation, rows: slice) -> Rotation:
    """`rotate` for the images `rows` of each group: a rotation at positions of each image's own (one with a
    `rows(rows)` method, e.g. Z-Image's, whose image positions follow each caption's length) restricted to them;
    any other rotation is the same for every image."""
    return rotate.rows(rows) if hasattr(rotate, "rows") else rotate


def rotates_per_target(rotate: Rotation) -> bool:
    """Whether `rotate` turns the shared keys into per-target keys at each target's own positions (one with a true
    `per_target`, e.g. Z-Image's), so that it depends on which targets a call holds."""
    return getattr(rotate, "per_target", False)


def rotated(x: Tensor, rotate: Rotation, overwrite: bool = False) -> Tensor:
    """x with the rotary embedding applied (unchanged on models without RoPE); into x itself if `overwrite`."""
    if rotate is None:
        return x
    return x.copy_(rotate(x)) if overwrite else rotate(x)


def on_tokens(x: Tensor, tokens: slice, fn: Callable[[Tensor, Tensor | None], Tensor],
              overwrite: bool = False) -> Tensor:
    """x with `fn(part, out)` applied to the given slice of its token axis (dim -2) only, `fn` writing into `out`:
    the slice of x itself if `overwrite`, else of a copy of x (None when every token is taken: fn's new tensor)."""
    if tokens == ALL and not overwrite:
        return fn(x, None)
    out = x if overwrite else x.clone()
    fn(x[..., tokens, :], out[..., tokens, :])
    return out


def attend_with_reference(q: Tensor, k: Tensor, v: Tensor, ref_k: Tensor, ref_v: Tensor,
                          score_scale: float = 1.0, score_shift: float = 0.0, mask: Tensor | None = None,
                          shared_bias: Tensor | None = None, kernel: Kernel | None = None) -> Tensor:
    """Targets (G, T, H, N, D) attend to their own tokens and to their group's shared reference tokens (G, H, R, D),
    or each target to its own (G, T, H, R, D) (`per_target`).

    The reference keys are multiplied by `score_scale`; `score_shift`, and `shared_bias` (R,) per shared key if
    given, are added to the logits toward them (no logits tensor is built). On the CPU without a mask or per-key
    biases under torch's SDPA this is `merged_attention`, else one fused call over the keys side by side
    (`key_biased_attention`).
    `mask` (G, T, 1, N, N), boolean (True attends) or additive, masks the targets' own keys; the shared keys are
    never masked.
    """
    targets = q.shape[1]
    ref_k = ref_k * score_scale if score_scale != 1.0 else ref_k
    if shared_bias is None and mask is None and kernel is None and merges(q, k, v, ref_k, ref_v):
        return merged_attention(q, k, v, ref_k, ref_v, score_shift)
    keys = torch.cat([k, per_target(ref_k, targets)], dim=-2)
    values = torch.cat([v, per_target(ref_v, targets)], dim=-2)
    key_bias = None
    if score_shift != 0.0 or shared_bias is not None:
        key_bias = torch.zeros(keys.shape[-2], dtype=q.dtype, device=q.device)
        key_bias[k.shape[-2]:] = score_shift if shared_bias is None else shared_bias + score_shift
    return key_biased_attention(q, keys, values, key_bias, mask, kernel)


def per_target(shared: Tensor, targets: int) -> Tensor:
    """Shared keys or values (G, H, R, D), the same for every target, or (G, T, H, R, D), each target's own (keys
    rotated at each target's positions), as a (G, T, H, R, D) view."""
    return shared if shared.ndim == 5 else shared[:, None].expand(shared.shape[0], targets, *shared.shape[1:])


def key_biased_attention(q: Tensor, keys: Tensor, values: Tensor, key_bias: Tensor | None = None,
                         mask: Tensor | None = None, kernel: Kernel | None = None) -> Tensor:
    """Attention where `key_bias` (keys,), finite, is added to every query's logit toward each key (None: no bias).

    The bias goes in as one broadcast mask row, or as a head channel where that keeps a faster kernel
    (`channel_bias`); no (queries x keys) tensor is built. `mask` (..., 1, N, N'), boolean (True attends) or
    additive, covers the first N' keys; keys past it are never masked (the model's own mask, extended: the only
    case with a full mask).
    """
    if mask is None:
        if key_bias is None:
            return attention(q, keys, values, kernel=kernel)
        if channel_bias(q, kernel):
            return bias_in_channel(q, keys, values, key_bias, kernel)
        return attention(q, keys, values, key_bias.to(q.dtype).view(1, 1, 1, -1), kernel=kernel)
    own = mask.to(q.dtype) if mask.is_floating_point() else torch.zeros(
        mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    extra = keys.shape[-2] - own.shape[-1]
    shared = torch.zeros((*own.shape[:-1], extra), dtype=q.dtype, device=q.device)
    bias = torch.cat([own, shared], dim=-1)
    if key_bias is not None:
        bias = bias + key_bias
    return attention(q, keys, values, bias, kernel=kernel)


def merges(*tensors: Tensor) -> bool:
    """Whether targets' attention over their own and the shared keys, under torch's SDPA, runs as
    `merged_attention`: on the CPU, whose flash kernel also returns each query's log-sum-exp, unless autograd records
    (that output carries no gradient)."""
    recording = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    return tensors[0].device.type == "cpu" and not recording


def merged_attention(q: Tensor, k: Tensor, v: Tensor, ref_k: Tensor, ref_v: Tensor, shift: float = 0.0) -> Tensor:
    """Targets (G, T, H, N, D) attend to their own keys and to their group's shared keys (`per_target`), `shift` added
    to every logit toward the shared ones: exactly, as two fused calls merged by their log-sum-exps,
    own + sigmoid(lse_shared + shift - lse_own) * (shared - own), in float32 or wider.

    No keys are concatenated (the shared ones are expanded over the targets, not copied) and no mask is read: on the
    CPU both cost more than the second call and the merge (benchmarks/attention.py). No autograd (`merges`).
    """
    groups, targets = q.shape[:2]
    own, own_lse = _cpu_flash(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))
    own, own_lse = own.unflatten(0, (groups, targets)), own_lse.unflatten(0, (groups, targets))
    in_place = own.dtype == own_lse.dtype
    merged = []
    for group in range(groups):
        shared, shared_lse = _cpu_flash(q[group], *(per_target(x, targets)[group] for x in (ref_k, ref_v)))
        weight = torch.sigmoid(shared_lse - own_lse[group] + shift)[..., None]
        if in_place:  # float32 and wider: into the own attention's output
            own[group].lerp_(shared, weight)
        else:  # half precision: merged in float32
            merged.append(torch.lerp(own[group].to(weight.dtype), shared.to(weight.dtype), weight).to(q.dtype))
    return own if in_place else torch.stack(merged)


def _cpu_flash(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """SDPA's CPU flash kernel over (batch, heads, tokens, head_dim): the output and each query's log-sum-exp."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)


def channel_bias(q: Tensor, kernel: Kernel | None = None) -> bool:
    """Whether a key bias goes in as a head channel (`bias_in_channel`) rather than an additive mask row.

    Yes on CUDA in half precision, where the flash kernel (the fastest there) takes no mask, and under a `kernel`
    that takes no masks. No elsewhere: SDPA's CPU and fp32 kernels take the row as a broadcast bias, and on the
    CPU the row measures faster than the channel's padding (benchmarks/attention.py).
    """
    if kernel is not None and not getattr(kernel, "takes_masks", False):
        return True
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def bias_in_channel(q: Tensor, keys: Tensor, values: Tensor, key_bias: Tensor, kernel: Kernel | None = None) -> Tensor:
    """`key_bias` as one more head channel: 1 in every query, bias x sqrt(D) in each key, so that q.k / sqrt(D)
    gains exactly the bias; zero channels pad the head to a multiple of 8 (what fused kernels take), values are
    zero-padded alike and the padding sliced off the output. SDPA's scale stays 1 / sqrt(D) of the real head."""
    dim = q.shape[-1]
    pad = 8 - dim % 8
    q, keys, values = (F.pad(x, (0, pad)) for x in (q, keys, values))
    q[..., dim] = 1
    keys[..., dim] = key_bias.to(q.dtype) * dim**0.5
    return attention(q, keys, values, scale=dim**-0.5, kernel=kernel)[..., :dim]


def full_attention_share(q: Tensor, k: Tensor, v: Tensor, kernel: Kernel | None = None) -> Tensor:
    """The paper's ablation: every image attends to all tokens of all images in its group."""
    groups, images, heads, tokens, dim = q.shape

    def joined(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(groups, heads, images * tokens, dim)

    out = attention(joined(q), joined(k), joined(v), kernel=kernel)
    return out.reshape(groups, heads, images, tokens, dim).transpose(1, 2)


@dataclass
class Reference:
    """One layer's view of the references: the shared keys and values, and the AdaIN statistics of targets."""

    key: Tensor | None  # (G, H, R, D): the references' image-token keys side by side, rotated where targets see
    value: Tensor | None  # them (a cache keeps per-target ones unrotated); both None if targets do not attend to them
    query_stats: Stats | None
    key_stats: Stats | None
    value_stats: Stats | None
    key_bias: Tensor | None = None  # (R,): log of the weight of each shared key's reference; None for one reference
    inputs: Tensor | None = None  # (G, [K,] R, C): in a cache that keeps them instead of keys and values, the layer's
    # input at the kept references' image tokens


def mixture_stats(x: Tensor, weights: Tensor) -> Stats:
    """Mean and std of the weighted mixture of K references' token distributions, from their tokens x
    (G, K, H, N, D) and each one's `token_stats`: mean = sum w_k mu_k, var = sum w_k (sigma_k^2 + (mu_k - mean)^2)
    (weights sum to 1)."""
    mean, std = token_stats(x)
    w = weights.view(1, -1, 1, 1, 1)
    mixed = (w * mean).sum(1)
    var = (w * (std.square() + (mean - mixed[:, None]).square())).sum(1)
    return mixed, var.sqrt()


def kept(weights: tuple[float, ...]) -> int | list[int]:
    """The references of non-zero weight, as an index into the reference axis: an int (the axis dropped) for one."""
    index = [i for i, weight in enumerate(weights) if weight > 0]
    return index[0] if len(index) == 1 else index


def shared_tokens(k: Tensor, v: Tensor, rotate_shared: Rotation = None) -> tuple[Tensor, Tensor]:
    """The keys and values targets attend to, from the kept references' image-token keys and values (before RoPE):
    (G, H, R, D) for one reference; (G, K, H, R, D) for several, laid side by side as (G, H, K R, D). A rotation
    `per_target` (`rotates_per_target`) takes the keys side by side, as it does in the chunks after a cache."""
    per_target = rotates_per_target(rotate_shared)
    key = k if per_target else rotated(k, rotate_shared)
    if k.ndim == 5:
        key, v = (x.transpose(1, 2).flatten(2, 3) for x in (key, v))
    return (rotated(key, rotate_shared) if per_target else key), v


def make_reference(q: Tensor, k: Tensor, v: Tensor, config: StyleAlignedConfig, image: slice = ALL,
                   rotate_shared: Rotation = None, weights: tuple[float, ...] = (1.0,),
                   keys: bool = True) -> Reference:
    """Collect what targets need from the K references' (G, K, H, N, D) queries, keys and values (before RoPE),
    mixed by `weights` (K non-negative numbers, normalised here); (G, H, N, D) stands for one reference.
    `keys` False leaves the shared keys and values out (a cache where targets do not attend to the references).

    References of weight 0 drop out exactly; with one left, this is the single-reference method to the bit.
    Knobs `config` leaves to the family (a config not resolved by `Backbone.resolve`) take the paper's values.
    """
    if config.adain_queries is None:
        config = config.resolved()
    if q.ndim == 4:
        q, k, v = q[:, None], k[:, None], v[:, None]
    index = kept(weights)
    q, k, v = (x[:, index][..., image, :] for x in (q, k, v))
    stats, bias = token_stats, None
    if not isinstance(index, int):
        w = torch.tensor([weights[i] for i in index], dtype=torch.float64)
        w = (w / w.sum()).to(q.device, q.dtype)
        stats, bias = partial(mixture_stats, weights=w), w.log().repeat_interleave(k.shape[-2])
    key, value = shared_tokens(k, v, rotate_shared) if keys else (None, None)
    return Reference(
        key=key, value=value,
        query_stats=stats(q) if config.adain_queries else None,
        key_stats=stats(k) if config.adain_keys else None,
        value_stats=stats(v) if config.adain_values else None,
        key_bias=bias,
    )


def align_targets(q: Tensor, k: Tensor, v: Tensor, ref: Reference, config: StyleAlignedConfig, image: slice = ALL,
                  rotate: Rotation = None, mask: Tensor | None = None, overwrite: bool = False,
                  kernel: Kernel | None = None) -> Tensor:
    """Targets (G, T, H, N, D), before RoPE: AdaIN of their image tokens to the reference's, RoPE, then attention
    to their own tokens and, per the config, to the reference's shared tokens.

    `overwrite`: normalise and rotate q, k, v in place (a processor's own projections), so that no second copy of
    them is alive while the targets attend.
    """

    def normalised(x: Tensor, ref_stats: Stats | None) -> Tensor:
        if ref_stats is None:
            return x
        ref_stats = (ref_stats[0][:, None], ref_stats[1][:, None])
        return on_tokens(x, image, lambda part, out: adain(part, token_stats(part), ref_stats, out), overwrite)

    q, k, v = normalised(q, ref.query_stats), normalised(k, ref.key_stats), normalised(v, ref.value_stats)
    q, k = rotated(q, rotate, overwrite), rotated(k, rotate, overwrite)
    if not config.share_attention:
        return attention(q, k, v, mask, kernel=kernel)
    if config.text_sees_reference or image == ALL:
        return attend_with_reference(q, k, v, ref.key, ref.value, config.shared_score_scale,
                                     config.shared_score_shift, mask, ref.key_bias, kernel)
    out = torch.empty_like(q)
    for rows in text_rows(image, q.shape[-2]):  # text queries: their own keys only
        out[..., rows, :] = attention(q[..., rows, :], k, v, query_rows(mask, rows), kernel=kernel)
    out[..., image, :] = attend_with_reference(q[..., image, :], k, v, ref.key, ref.value, config.shared_score_scale,
                                               config.shared_score_shift, query_rows(mask, image), ref.key_bias, kernel)
    return out


def query_rows(mask: Tensor | None, rows: slice) -> Tensor | None:
    """The rows of a (..., queries or 1, keys) mask for the queries `rows` (a mask broadcast over queries as is)."""
    return mask if mask is None or mask.shape[-2] == 1 else mask[..., rows, :]


def text_rows(image: slice, tokens: int) -> list[slice]:
    """The token slices outside the image tokens `image` of `tokens` (before it, after it, or both)."""
    start, stop, _ = image.indices(tokens)
    return [rows for rows in (slice(0, start), slice(stop, tokens)) if rows.stop > rows.start]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, rotate: Rotation = None, mask: Tensor | None = None,
                        kernel: Kernel | None = None) -> Tensor:
    """The references (G, H, N, D) attend to their own tokens only: the stock model's attention."""
    return attention(rotated(q, rotate), rotated(k, rotate), v, mask, kernel=kernel)


def shared_attention(q: Tensor, k: Tensor, v: Tensor, config: StyleAlignedConfig, image: slice = ALL,
                     rotate: Rotation = None, rotate_shared: Rotation = None, mask: Tensor | None = None,
                     overwrite: bool = False, weights: tuple[float, ...] = (1.0,),
                     kernel: Kernel | None = None) -> Tensor:
    """Attention of (G, M, H, N, D) images (before RoPE) where the first K = len(weights) of each group are the
    references, mixed by `weights` (`make_reference`).

    Each reference attends to itself only, exactly as if generated alone (in the paper's formulation it also
    sees a copy of itself, which leaves its softmax unchanged); targets follow `align_targets` (`overwrite`: their
    rows of q, k, v are overwritten). `mask` (G, M, 1, N, N) is the model's own attention mask, if any.
    """
    if config.full_attention_share:
        return full_attention_share(q, k, v, kernel)
    count = len(weights)
    ref_q, ref_k, ref_v = q[:, :count], k[:, :count], v[:, :count]
    ref_out = reference_attention(ref_q, ref_k, ref_v, for_rows(rotate, slice(None, count)),
                                  None if mask is None else mask[:, :count], kernel)
    if q.shape[1] == count:
        return ref_out
    ref = make_reference(ref_q, ref_k, ref_v, config, image, rotate_shared, weights)
    targets = align_targets(q[:, count:], k[:, count:], v[:, count:], ref, config, image,
                            for_rows(rotate, slice(count, None)), None if mask is None else mask[:, count:],
                            overwrite, kernel)
    return torch.cat([ref_out, targets], dim=1)
