"""Slow, explicit, loop-per-image oracle of StyleAligned on Z-Image (`ZImageTransformer2DModel`).

Z-Image's attention layers: `noise_refiner.N.attention` over one image's tokens [image patches, image padding],
`context_refiner.N.attention` over the caption alone (never shared), `layers.N.attention` over [image patches, image
padding, caption (padded to a multiple of 32), batch padding] with the batch padding masked. Per group (image 0 the
reference, as the stock model computes it alone; or the first K images, references mixed by weights): a target's
image-patch queries / keys / values are AdaIN-normalised to the reference's image patches (to the weighted mixture of
the references' token distributions), after the q/k norms, before RoPE; with sharing on, every target query also
attends to each reference's image patches: its un-normalised keys rotated at the TARGET's own image positions
(column + W under "shifted", the same for every reference) and scaled, the shift and the log of the reference's
weight added to those logits, and its values. The image's t position is one past its
caption's padded length, so a target and its reference may sit at different t. Positions are rebuilt here from the
caption lengths and the image grid, rotated with the model's frequency tables; no code is shared with the package.
"""

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.transformers.transformer_z_image import RopeEmbedder

from tests.oracle import adain_to_mixture, family_config
from tests.oracle_dit import installed

EPS = 1e-5
MULTIPLE = 32  # Z-Image pads captions and images to a multiple of 32 tokens


def adain(x, ref):
    """(x - mean(x)) / std(x) * std(ref) + mean(ref), statistics over tokens (dim -2), unbiased variance + EPS."""
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + EPS).sqrt()
    ref_mean, ref_std = ref.mean(-2, keepdim=True), (ref.var(-2, keepdim=True) + EPS).sqrt()
    return (x - mean) / std * ref_std + ref_mean


def padded(length):
    return length + (-length) % MULTIPLE


@dataclass
class Context:
    """What the transformer pre-hook learns at each call, read by the processors."""

    images: int                              # images per guidance group: the batch is groups x images
    groups: int = 1
    caption_lengths: list = field(default_factory=list)  # padded caption length of each batch row
    grid: tuple = (0, 0)                     # image patches (rows, columns)
    tables: list = field(default_factory=list)  # the model's complex frequency tables, one per (t, row, column) axis


def frequencies(context, ids):
    """(tokens, dim / 2) complex rotation of position ids (tokens, 3) from the model's tables."""
    return torch.cat([table[ids[:, axis]] for axis, table in enumerate(context.tables)], dim=-1)


def rope(x, freqs):
    """(heads, tokens, dim) rotated pairwise as complex numbers by `freqs` (tokens, dim / 2), in fp32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


def image_ids(context, row, column_shift=0):
    """Position ids (t, row, column) of one batch row's image patches: t one past its padded caption."""
    rows, columns = context.grid
    h, w = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
    t = torch.full_like(h, context.caption_lengths[row] + 1)
    return torch.stack([t, h, w + column_shift], dim=-1).flatten(0, 1)


def row_ids(context, row, tokens, joint):
    """(ids, valid): the position ids of a layer's `tokens` for one batch row, and how many are not batch padding.
    Image padding sits at (0, 0, 0); caption token j at (j + 1, 0, 0)."""
    patches = context.grid[0] * context.grid[1]
    ids = torch.zeros(tokens, 3, dtype=torch.long)
    ids[:patches] = image_ids(context, row)
    valid = padded(patches)
    if joint:
        caption = context.caption_lengths[row]
        ids[valid:valid + caption, 0] = torch.arange(1, caption + 1)
        valid += caption
    return ids, valid


def attend(q, k, v, valid, shared=(), shift=0.0):
    """softmax(q k^T / sqrt(d)) v over own keys (those past `valid` masked out) and each reference's shared keys
    and values, `shared` [(keys, values, log weight)], the logits toward them + shift + log weight; built
    explicitly."""
    keys = torch.cat([k] + [keys for keys, _, _ in shared], dim=-2)
    values = torch.cat([v] + [values for _, values, _ in shared], dim=-2)
    logits = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits[..., valid:k.shape[-2]] = -math.inf
    start = k.shape[-2]
    for shared_keys, _, log_weight in shared:
        logits[..., start:start + shared_keys.shape[-2]] += shift + log_weight
        start += shared_keys.shape[-2]
    return logits.softmax(-1) @ values


class ZImageOracleProcessor:
    """Oracle processor for Z-Image's `Attention` in `noise_refiner` (image alone) or `layers` (image + caption)."""

    def __init__(self, config, context, joint, weights):
        self.config, self.context, self.joint = config, context, joint
        self.weights = [w / sum(weights) for w in weights]

    def normalised(self, x, rows, references, image):
        """x's image patches AdaIN-ed in place to those of the batch `rows` `references` (their mixture by weight
        when several)."""
        refs = [rows[j][:, image] for j in references]
        x[:, image] = adain(x[:, image], refs[0]) if len(refs) == 1 else adain_to_mixture(x[:, image], refs,
                                                                                         self.weights)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        config, context = self.config, self.context
        batch, tokens, _ = hidden_states.shape

        def heads(t):
            return t.unflatten(-1, (attn.heads, -1))

        q = attn.norm_q(heads(attn.to_q(hidden_states))).transpose(1, 2)
        k = attn.norm_k(heads(attn.to_k(hidden_states))).transpose(1, 2)
        v = heads(attn.to_v(hidden_states)).transpose(1, 2)
        image = slice(0, context.grid[0] * context.grid[1])
        shift = context.grid[1] if config.reference_positions == "shifted" else 0
        out = []
        for row in range(batch):
            ids, valid = row_ids(context, row, tokens, self.joint)
            freqs = frequencies(context, ids)
            assert torch.equal(freqs[:valid], freqs_cis[row, :valid]), "the oracle's positions are not the model's"
            first = row - row % context.images
            references = range(first, first + len(self.weights))
            if row in references:
                out.append(attend(rope(q[row], freqs), rope(k[row], freqs), v[row], valid))
                continue
            qi, ki, vi = q[row].clone(), k[row].clone(), v[row].clone()
            for flag, x, ref in (("adain_queries", qi, q), ("adain_keys", ki, k), ("adain_values", vi, v)):
                if getattr(config, flag):
                    self.normalised(x, ref, references, image)
            qi, ki = rope(qi, freqs), rope(ki, freqs)
            if not config.share_attention:
                out.append(attend(qi, ki, vi, valid))
                continue
            at_target = frequencies(context, image_ids(context, row, shift))  # every reference at these positions
            shared = [(config.shared_score_scale * rope(k[j][:, image], at_target), v[j][:, image],
                       math.log(w) if w > 0 else -math.inf) for j, w in zip(references, self.weights)]
            shared = attend(qi, ki, vi, valid, shared, config.shared_score_shift)
            if not config.text_sees_reference:  # caption (and padding) queries: own keys only
                shared[:, image.stop:] = attend(qi, ki, vi, valid)[:, image.stop:]
            out.append(shared)
        out = torch.stack(out).transpose(1, 2).flatten(2).to(hidden_states.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def install(pipe, config, layer_names, images, weights=(1.0,)):
    """Put oracle processors on the named attention modules of `pipe.transformer`; `images` per guidance group
    (the pipeline batches [cond..., uncond...]: the batch is 2 x images with guidance, else images), the first
    len(`weights`) of each group its references, mixed by those weights. Returns undo()."""
    config = family_config(pipe, config, gates=True)
    transformer = pipe.transformer
    model = transformer.config
    context = Context(images=images, tables=RopeEmbedder.precompute_freqs_cis(
        model.axes_dims, model.axes_lens, theta=model.rope_theta))
    assert not any(name.startswith("context_refiner") for name in layer_names), "captions are never shared"

    def read_call(call):
        images, captions = call["x"], call["cap_feats"]
        patch = call.get("patch_size", 2)
        context.groups = len(images) // context.images
        assert context.groups * context.images == len(images)
        context.caption_lengths = [padded(len(caption)) for caption in captions]
        context.grid = (images[0].shape[-2] // patch, images[0].shape[-1] // patch)

    processors = {name: ZImageOracleProcessor(config, context, name.startswith("layers."), weights)
                  for name in layer_names}
    return installed(transformer, processors, read_call, config,
                     lambda call: 1.0 - float(torch.as_tensor(call["t"]).min()))  # passed 1 - sigma
